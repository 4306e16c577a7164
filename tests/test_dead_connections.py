"""Dead connections are replaced, not served, and without waiting out a backoff."""

import asyncio

import pytest
from fastapi import FastAPI

from fastapi_dbpool import ConnectionDep

from .conftest import Server, make_db, pid_of, serve

pytestmark = pytest.mark.anyio


async def test_terminated_backends_are_replaced_without_failing_a_request(
    database_url: str, server: Server, app_name: str
) -> None:
    # With psycopg_pool's check= alone, the first request waits through a reconnect
    # backoff and fails with PoolTimeout; a 2 s acquire timeout leaves no room for that.
    db = make_db(database_url, app_name, min_size=3, max_size=3, acquire_timeout=2)
    app = FastAPI()

    @app.get("/pid")
    async def pid(conn: ConnectionDep) -> int:
        return await pid_of(conn)

    async with serve(app, db) as client:
        server.wait_until(lambda s: s == ["idle"] * 3)
        before = {(await client.get("/pid")).json() for _ in range(3)}
        assert server.terminate_idle() == 3
        await asyncio.sleep(0.1)
        results = [await client.get("/pid") for _ in range(10)]
        assert [r.status_code for r in results] == [200] * 10
        assert not ({r.json() for r in results} & before)
        results = await asyncio.gather(*(client.get("/pid") for _ in range(10)))
        assert [r.status_code for r in results] == [200] * 10
        assert len(server.states()) <= 3
