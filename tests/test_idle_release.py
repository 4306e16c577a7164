"""After a burst, the connections above min_size go back to the server within two
max_idle periods (psycopg_pool alone closes one per period: a burst's connections held
the server's slots, and locked out other workers and the next deploy, for an hour)."""

from __future__ import annotations

import asyncio

import anyio
import pytest
from fastapi import FastAPI

from fastapi_dbpool import ConnectionDep, _lifespan

from .conftest import Server, make_db, needs_pool_internals, serve

pytestmark = pytest.mark.anyio

MAX_IDLE = 1.0
BURST = 8


@pytest.mark.parametrize("ours", [True, False], ids=["released", "psycopg_pool-alone"])
async def test_a_bursts_connections_go_back_to_the_server(
    ours: bool,
    database_url: str,
    app_name: str,
    server: Server,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if ours and needs_pool_internals.args[0]:
        pytest.skip(needs_pool_internals.kwargs["reason"])
    if not ours:  # the control: what a psycopg_pool laid out otherwise does
        monkeypatch.setattr(_lifespan, "release_idle_promptly", lambda pool: False)
    db = make_db(database_url, app_name, min_size=1, max_size=BURST, max_idle=MAX_IDLE)
    app = FastAPI(lifespan=db.lifespan)

    @app.get("/slow")
    async def slow(conn: ConnectionDep) -> int:
        await conn.execute("SELECT pg_sleep(0.5)")
        return 1

    async with serve(app, db) as client:
        answers = await asyncio.gather(*(client.get("/slow") for _ in range(BURST)))
        assert [a.status_code for a in answers] == [200] * BURST
        assert len(server.states()) == BURST  # the burst opened them all
        # the documented bound, 2 x max_idle, and a margin for a busy machine
        states = await anyio.to_thread.run_sync(
            lambda: server.wait_until(lambda s: len(s) == 1, timeout=2 * MAX_IDLE + 2)
        )
        if ours:
            assert states == ["idle"]  # min_size, asked of PostgreSQL
            assert db.stats().pool_size == 1
            assert (await client.get("/slow")).status_code == 200
        else:  # one per max_idle period
            assert len(states) >= 3, states
