"""CancellationMiddleware behind a real uvicorn, over real sockets, with clients that hang up."""

import asyncio
import json

import anyio
import pytest
from fastapi import FastAPI

from benchmarks._serve import http_get, uvicorn_server
from benchmarks.cancel_storm import storm
from fastapi_dbpool import CancellationMiddleware, ConnectionDep, DBPool

from .conftest import Server, make_db, pid_of

pytestmark = pytest.mark.anyio


def slow_app(db: DBPool) -> FastAPI:
    app = FastAPI(lifespan=db.lifespan)
    app.add_middleware(CancellationMiddleware, timeout=0.5, timeout_header="X-Request-Timeout")

    @app.get("/sleep")
    async def sleep(conn: ConnectionDep) -> None:
        await conn.execute("SELECT pg_sleep(30)")

    @app.get("/pid")
    async def pid(conn: ConnectionDep) -> int:
        return await pid_of(conn)

    return app


async def test_a_client_that_hangs_up_stops_its_query_at_once(
    database_url: str, server: Server, app_name: str
) -> None:
    """uvicorn does not cancel a handler whose client left; the middleware does, server first."""
    db = make_db(database_url, app_name, min_size=1, max_size=1)
    async with uvicorn_server(slow_app(db)) as port:
        _, _, first, _ = await http_get(port, "/pid")
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        # a 30 s budget from the gateway header, so that only the hang-up can stop it
        writer.write(b"GET /sleep HTTP/1.1\r\nHost: x\r\nX-Request-Timeout: 30\r\n\r\n")
        assert "active" in await anyio.to_thread.run_sync(
            lambda: server.wait_until(lambda s: "active" in s)
        )
        writer.transport.abort()
        states = await anyio.to_thread.run_sync(lambda: server.wait_until(lambda s: s == ["idle"]))
        assert states == ["idle"]
        _, _, again, _ = await http_get(port, "/pid")
        assert again == first  # the same backend: the query was cancelled, not the connection


async def test_a_deadline_over_real_sockets_is_a_504_with_a_json_body(
    database_url: str, server: Server, app_name: str
) -> None:
    db = make_db(database_url, app_name, min_size=1, max_size=1)
    async with uvicorn_server(slow_app(db)) as port:
        status, headers, body, complete = await http_get(port, "/sleep", timeout=10)
        assert (status, headers["content-type"], complete) == (504, "application/json", True)
        assert json.loads(body) == {"detail": "The request did not complete within its deadline."}
        assert server.states() == ["idle"]


async def test_a_storm_of_cut_requests_leaks_nothing_and_commits_nothing(
    database_url: str,
) -> None:
    """1,000 requests, each cut by its deadline or its client at a random moment (waiting for
    the pool, mid pg_sleep, mid transaction, mid stream); PostgreSQL is the witness."""
    summary = await storm(database_url, requests=1000, concurrency=16)
    print(summary.line())
    assert summary.ok, (summary.line(), summary.errors[:10])
    assert sum(summary.outcomes.values()) == 1000
    assert summary.outcomes["deadline_504"] > 100
    assert summary.outcomes["deadline_stream_cut"] > 10
