"""A connection that needs nothing goes back to psycopg_pool's idle deque as it is released.

The direct return skips psycopg_pool's worker task, so it must do exactly what that task
does for such a connection, and leave every other return to psycopg_pool: a user's reset,
an expired connection, a client waiting inside psycopg_pool.
"""

import asyncio
from typing import Any

import pytest
from fastapi import FastAPI

from fastapi_dbpool import DBPool
from fastapi_dbpool._pool_internals import can_return_now, returns_now_as_it_should

from .conftest import Server, make_db, needs_pool_internals, pid_of

pytestmark = pytest.mark.anyio


def _idle_in_pool(db: DBPool) -> int:
    return db.pool.get_stats().get("pool_available", 0)


@needs_pool_internals
async def test_the_installed_psycopg_pool_takes_direct_returns(
    database_url: str, app_name: str
) -> None:
    """If a psycopg_pool release changes what `return_now` relies on, every return quietly
    goes through its worker again (correct, but slower): this says so."""
    db = make_db(database_url, app_name, min_size=1, max_size=1)
    async with db.lifespan(FastAPI()):
        assert can_return_now(db.pool)
        assert returns_now_as_it_should(db.pool)
        assert db._running().direct_return
        async with db.connection() as conn:  # the self-test's connection serves as before
            assert await pid_of(conn)
        assert _idle_in_pool(db) == 1


@needs_pool_internals
async def test_a_psycopg_pool_whose_fields_mean_something_else_gets_no_direct_return(
    database_url: str, app_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Names and types can stay while their meaning moves (a release keeping its idle
    connections elsewhere, with `_pool` left behind): the open-time self-test, by
    behaviour, must then leave every return to psycopg_pool."""
    import psycopg_pool

    measures = psycopg_pool.AsyncConnectionPool._get_measures

    def elsewhere(self: Any) -> dict[str, int]:
        return {**measures(self), "pool_available": 99}

    monkeypatch.setattr(psycopg_pool.AsyncConnectionPool, "_get_measures", elsewhere)
    db = make_db(database_url, app_name, min_size=1, max_size=1)
    async with db.lifespan(FastAPI()):
        assert can_return_now(db.pool)  # the names and types are all there
        assert not returns_now_as_it_should(db.pool)
        assert not db._running().direct_return
        for _ in range(2):
            async with db.connection() as conn:
                assert await pid_of(conn)


@needs_pool_internals
async def test_a_clean_connection_is_idle_in_the_pool_when_its_release_returns(
    database_url: str, app_name: str, server: Server
) -> None:
    db = make_db(database_url, app_name, min_size=2, max_size=2)
    async with db.lifespan(FastAPI()):
        pids = []
        for _ in range(3):
            async with db.connection() as conn:
                pids.append(await pid_of(conn))
                assert _idle_in_pool(db) == 1
            assert _idle_in_pool(db) == 2  # no await in between: not queued for a worker
        assert pids[0] == pids[2] != pids[1]  # at the end of the deque, as psycopg_pool puts it
        assert server.wait_until(lambda states: states == ["idle", "idle"]) == ["idle", "idle"]


async def test_a_users_reset_still_runs_on_every_return(database_url: str, app_name: str) -> None:
    resets: list[Any] = []

    async def reset(conn: Any) -> None:
        resets.append(conn)

    db = make_db(database_url, app_name, min_size=1, max_size=1, reset=reset)
    async with db.lifespan(FastAPI()):
        for _ in range(3):
            async with db.connection() as conn:
                await conn.execute("SELECT 1")
        async with asyncio.timeout(5):
            while len(resets) < 3:
                await asyncio.sleep(0.01)
        assert resets == [conn] * 3


async def test_an_expired_connection_is_closed_and_replaced_on_its_return(
    database_url: str, app_name: str, server: Server
) -> None:
    db = make_db(database_url, app_name, min_size=1, max_size=1, max_lifetime=0.5)
    async with db.lifespan(FastAPI()):
        async with db.connection() as conn:
            old = await pid_of(conn)
            await asyncio.sleep(0.6)
        async with db.connection(timeout=5) as conn:
            new = await pid_of(conn)
        assert new != old
        pids = [r[0] for r in server.query(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s", app_name
        )]  # fmt: skip
        assert pids == [new]


async def test_a_client_waiting_inside_psycopg_pool_gets_the_returned_connection(
    database_url: str, app_name: str, server: Server
) -> None:
    """One connection out, the other broken and its replacement slow to connect: a checkout
    waits inside psycopg_pool. The release must wake it with its connection, not leave it
    in the deque while the checkout waits for the replacement."""
    connected = asyncio.Event()
    connections: list[Any] = []

    async def configure(conn: Any) -> None:
        connections.append(conn)
        if len(connections) > 2:  # the replacement
            await connected.wait()

    db = make_db(database_url, app_name, min_size=2, max_size=2, configure=configure)
    async with db.lifespan(FastAPI()):
        async with db.connection() as held:
            held_pid = await pid_of(held)
            async with db.connection() as broken:
                broken.pgconn.finish()
            waiter = asyncio.create_task(_pid_of_next(db))
            async with asyncio.timeout(5):
                while db.pool.get_stats().get("requests_waiting", 0) < 1 or len(connections) < 3:
                    await asyncio.sleep(0.01)
        async with asyncio.timeout(2):  # not the waiter's own 5 s, nor the replacement's
            assert await waiter == held_pid
        connected.set()
        assert server.wait_until(lambda states: states == ["idle", "idle"]) == ["idle", "idle"]


async def _pid_of_next(db: DBPool) -> int:
    async with db.connection(timeout=5) as conn:
        return await pid_of(conn)
