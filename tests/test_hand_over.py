"""While every connection is out, a release hands its connection straight to a waiting checkout.

The hand-over skips psycopg_pool's return path, so it must keep what that path guarantees:
no pool slot lost to a cancellation, max_lifetime and drain() obeyed, the waiting counted.
"""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from fastapi import FastAPI

from fastapi_dbpool import DBPool, PoolExhaustedError, PoolNotRunningError

from .conftest import Server, make_db, needs_pool_internals, pid_of, timers_started

pytestmark = pytest.mark.anyio


async def _take(db: DBPool, got: dict[str, int], name: str) -> None:
    async with db.connection(timeout=5) as conn:
        got[name] = await pid_of(conn)


async def _until_waiting(db: DBPool, count: int) -> None:
    async with asyncio.timeout(5):
        while db.stats().requests_waiting < count:
            await asyncio.sleep(0.01)


@asynccontextmanager
async def _one_waiting(
    db: DBPool, got: dict[str, int], name: str
) -> AsyncIterator[tuple[Any, int, asyncio.Task[None]]]:
    """The only connection held (with its backend pid) while a checkout `name` waits for it;
    released on exit. The waiter records the pid it gets in `got[name]`."""
    async with db.connection() as conn:
        pid = await pid_of(conn)
        waiter = asyncio.create_task(_take(db, got, name))
        await _until_waiting(db, 1)
        yield conn, pid, waiter


@pytest.mark.parametrize("given", ["connection", "turn", "turn, then cancelled in psycopg_pool"])
async def test_a_checkout_cancelled_as_it_is_handed_over_to_passes_it_on(
    database_url: str, app_name: str, server: Server, given: str
) -> None:
    """A waiter handed a connection (or, when the released one was broken, its turn to ask
    psycopg_pool for a new one) and cancelled before it took it, or while it waited for
    psycopg_pool: the next waiter gets it, rather than wait out its timeout for a slot
    nobody holds."""
    in_pool = given == "turn, then cancelled in psycopg_pool"
    connected = asyncio.Event()  # until set, a replacement connection is not ready
    connections: list[Any] = []

    async def configure(conn: Any) -> None:
        connections.append(conn)
        if len(connections) > 1:  # a replacement
            await connected.wait()

    if not in_pool:
        connected.set()
    db = make_db(database_url, app_name, min_size=1, max_size=1, configure=configure)
    got: dict[str, int] = {}
    async with db.lifespan(FastAPI()):
        async with _one_waiting(db, got, "second") as (conn, first, second):
            third = asyncio.create_task(_take(db, got, "third"))
            await _until_waiting(db, 2)
            if given != "connection":
                conn.pgconn.finish()  # broken: it goes back to psycopg_pool, which replaces it
        if in_pool:
            async with asyncio.timeout(5):
                while db.pool.get_stats().get("requests_waiting", 0) < 1:
                    await asyncio.sleep(0.001)
        second.cancel()  # else right after the release handed it over, synchronously
        with pytest.raises(asyncio.CancelledError):
            await second
        connected.set()
        async with asyncio.timeout(4):  # well before the third one's own 5 s timeout
            await third
        assert "second" not in got
        assert (got["third"] == first) is (given == "connection")
        assert server.wait_until(lambda states: states == ["idle"]) == ["idle"]
        assert db.stats().requests_waiting == 0
        async with db.connection(timeout=1) as conn:  # the one slot is still there
            assert await pid_of(conn) == got["third"]


@pytest.mark.parametrize("why", ["max_lifetime", "drain"])
async def test_a_connection_psycopg_pool_would_replace_is_not_handed_over(
    database_url: str, app_name: str, server: Server, why: str
) -> None:
    """psycopg_pool closes a connection past max_lifetime, or older than a drain(), when it
    comes back; one handed straight to the next request would never come back while the
    app stays busy."""
    lifetime = {"max_lifetime": 0.5} if why == "max_lifetime" else {}
    db = make_db(database_url, app_name, min_size=1, max_size=1, **lifetime)
    got: dict[str, int] = {}
    async with db.lifespan(FastAPI()):
        async with _one_waiting(db, got, "next") as (_, old, waiter):
            if why == "drain":
                await db.pool.drain()
            else:
                await asyncio.sleep(0.6)
        await waiter
        assert got["next"] != old
        assert server.wait_until(lambda states: len(states) == 1) == ["idle"]  # old one closed
        pids = [r[0] for r in server.query(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s", app_name
        )]  # fmt: skip
        assert pids == [got["next"]]


async def test_waiters_are_told_at_shutdown_not_left_to_time_out(
    database_url: str, app_name: str
) -> None:
    db = make_db(database_url, app_name, min_size=1, max_size=1, acquire_timeout=20)
    app = FastAPI()
    errors: list[BaseException] = []

    async def wait_for_one() -> Any:
        try:
            async with db.connection():
                pass
        except PoolNotRunningError as ex:
            errors.append(ex)

    async with asyncio.timeout(10):  # not the 20 s of acquire_timeout
        async with db.lifespan(app):
            holder = await db._running().acquire(for_request=False)
            waiter = asyncio.create_task(wait_for_one())
            await _until_waiting(db, 1)
        await waiter
    assert len(errors) == 1
    assert holder.conn.closed


async def test_a_users_reset_sees_every_return(database_url: str, app_name: str) -> None:
    """psycopg_pool runs the user's `reset` on each connection that comes back; with one set,
    nothing is handed over past it."""
    resets: list[int] = []

    async def reset(conn: Any) -> None:
        resets.append(conn.info.backend_pid)

    db = make_db(database_url, app_name, min_size=1, max_size=1, reset=reset)
    got: dict[str, int] = {}
    async with db.lifespan(FastAPI()):
        async with _one_waiting(db, got, "next") as (_, pid, waiter):
            pass  # waiting in psycopg_pool's queue
        await waiter
    assert got["next"] == pid
    assert resets[:1] == [pid]


@needs_pool_internals
async def test_waits_for_a_hand_over_share_one_timer(
    database_url: str, app_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An asyncio timer per waiting checkout (under load, every checkout) would leave a
    cancelled entry in the loop's heap for the whole acquire_timeout."""
    db = make_db(database_url, app_name, min_size=1, max_size=1)
    got: dict[str, int] = {}
    async with db.lifespan(FastAPI()):
        async with db.connection():
            delays = timers_started(monkeypatch)
            waiters = [asyncio.create_task(_take(db, got, f"w{n}")) for n in range(5)]
            await _until_waiting(db, 5)
        await asyncio.gather(*waiters)
        monkeypatch.undo()
        assert len(got) == 5
        assert len([d for d in delays if d > 4]) <= 1  # the waits' 5 s, on one timer at most


async def test_a_checkout_waiting_in_psycopg_pool_is_served_before_later_ones(
    database_url: str, app_name: str
) -> None:
    """A checkout that queued in psycopg_pool while the pool grew is served before one that
    came after all connections were out (issue: under sustained load the later ones took
    every released connection, and the earlier ones timed out with 503s)."""
    db = make_db(database_url, app_name, min_size=1, max_size=2)
    got: dict[str, int] = {}
    release = asyncio.Event()

    async def _hold(db: DBPool, got: dict[str, int], name: str) -> None:
        async with db.connection(timeout=5) as conn:
            got[name] = await pid_of(conn)
            await release.wait()

    async with db.lifespan(FastAPI()):
        async with db.connection() as conn:
            first = await pid_of(conn)
            # both ask psycopg_pool, which grows by one connection: one of them waits in it
            early = [asyncio.create_task(_hold(db, got, name)) for name in ("b", "c")]
            async with asyncio.timeout(5):
                while len(got) < 1 or db.pool.get_stats().get("requests_waiting", 0) < 1:
                    await asyncio.sleep(0.01)
            (waiting_in_pool,) = {"b", "c"} - set(got)
            late = asyncio.create_task(_take(db, got, "d"))  # every connection out
            await _until_waiting(db, 2)
        async with asyncio.timeout(4):
            while waiting_in_pool not in got and "d" not in got:
                await asyncio.sleep(0.01)
        assert got.get(waiting_in_pool) == first  # the released connection went to it
        assert "d" not in got
        release.set()
        await asyncio.gather(*early, late)
        assert "d" in got


async def test_no_checkout_waits_for_a_hand_over_beside_an_idle_connection(
    database_url: str, app_name: str, server: Server
) -> None:
    """A released connection that served a checkout asking psycopg_pool left the replacement
    psycopg_pool was connecting for that checkout to nobody: it stayed idle while the next
    waiter waited for a hand-over until its timeout. After an outage every replacement
    connects at once, and in the network lab the line waited beside eight idle connections
    for 5 s (tests/test_network.py)."""
    connected = asyncio.Event()  # until set, a replacement connection is not ready
    connections: list[Any] = []

    async def configure(conn: Any) -> None:
        connections.append(conn)
        if len(connections) > 2:
            await connected.wait()

    db = make_db(database_url, app_name, min_size=2, max_size=2, configure=configure)
    got: dict[str, int] = {}
    done = asyncio.Event()

    async def hold(name: str) -> None:
        async with db.connection(timeout=5) as conn:
            got[name] = await pid_of(conn)
            await done.wait()

    async with db.lifespan(FastAPI()):
        runtime = db._running()
        broken = await runtime.acquire(for_request=False)
        kept = await runtime.acquire(for_request=False)
        gives_up = asyncio.create_task(_take_within(db, 0.3))  # waits, then asks and fails
        second = asyncio.create_task(hold("second"))
        third = asyncio.create_task(_take_within(db, 3.0, got, "third"))
        await _until_waiting(db, 3)
        broken.conn.pgconn.finish()
        await runtime.release(broken)  # psycopg_pool connects its replacement, slowly
        with pytest.raises(PoolExhaustedError):
            await gives_up
        async with asyncio.timeout(5):  # the second asks psycopg_pool in its place
            while db.pool.get_stats().get("requests_waiting", 0) < 2:
                await asyncio.sleep(0.01)
        await runtime.release(kept)  # psycopg_pool gives it to the second
        async with asyncio.timeout(5):
            while "second" not in got:
                await asyncio.sleep(0.01)
        connected.set()  # the replacement is the third's: it must not wait for the second
        async with asyncio.timeout(1):
            await third
        assert got["third"] != got["second"]
        done.set()
        await second
        assert db.stats().requests_waiting == 0
    assert server.wait_until(lambda states: states == []) == []


async def _take_within(
    db: DBPool, timeout: float, got: dict[str, int] | None = None, name: str = ""
) -> None:
    async with db.connection(timeout=timeout) as conn:
        if got is not None:
            got[name] = await pid_of(conn)
