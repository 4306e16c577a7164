"""Statements wait on the socket with psycopg's protocol, but start no timer each."""

import asyncio
import time
from typing import Any

import psycopg
import pytest
from fastapi import FastAPI

from fastapi_dbpool import _connection, _wait

from .conftest import Server, make_db, needs_fast_wait, timers_started

pytestmark = pytest.mark.anyio


async def test_a_statement_too_big_for_the_socket_is_sent_and_read_whole(
    database_url: str, app_name: str
) -> None:
    """Megabytes each way: the socket blocks on write and on read, the two waits here."""
    db = make_db(database_url, app_name, min_size=1, max_size=1)
    big = "x" * 8_000_000
    async with db.lifespan(FastAPI()), db.connection() as conn:
        cur = await conn.execute("SELECT length(%s::text), repeat('y', 8000000)", (big,))
        row = await cur.fetchone()
        assert row is not None
        assert row[0] == len(big)
        assert row[1] == "y" * 8_000_000


async def test_pipeline_mode_copy_and_notifies_run_through_the_same_waits(
    database_url: str, app_name: str
) -> None:
    """The other protocols that wait on the socket: many statements in flight at once,
    COPY in both directions, and a LISTEN answered by a notification."""
    db = make_db(database_url, app_name, min_size=2, max_size=2)
    async with db.lifespan(FastAPI()), db.connection() as conn, db.connection() as other:
        async with conn.pipeline():
            cursors = [await conn.execute("SELECT %s::int * 2", (n,)) for n in range(200)]
        assert [(await cur.fetchone()) for cur in cursors] == [(n * 2,) for n in range(200)]

        await conn.execute("CREATE TEMP TABLE copied (n int, t text)")
        async with conn.cursor() as cur:
            async with cur.copy("COPY copied FROM STDIN") as copy:
                for n in range(20_000):
                    await copy.write_row((n, "x" * 50))
            out = bytearray()
            async with cur.copy("COPY copied TO STDOUT") as copy:
                async for chunk in copy:
                    out += chunk
        assert out.count(b"\n") == 20_000

        await conn.execute("LISTEN fastapi_dbpool_wait")
        await other.execute("NOTIFY fastapi_dbpool_wait, 'hello'")
        async with asyncio.timeout(5):
            notified = [n async for n in conn.notifies(stop_after=1)]
        assert [n.payload for n in notified] == ["hello"]


@needs_fast_wait
def test_the_fast_wait_is_taken_only_if_psycopgs_poll_answers_as_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A `_ready` that kept its name and changed its answers would have statements wait on
    a wrong state: the import-time self-test tries it on a socket pair."""
    assert _wait._ready_works()
    monkeypatch.setattr(_wait, "_ready", lambda fileno, state: 0)  # "nothing ready", always
    assert not _wait._ready_works()


@pytest.fixture(params=["fast", "psycopg"])
def wait_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each scenario on the package's own wait and on psycopg's, its fallback."""
    if request.param == "fast":
        if not _connection.FAST_WAIT and needs_fast_wait.args[0]:
            pytest.skip(needs_fast_wait.kwargs["reason"])
        assert _connection.FAST_WAIT, "the installed psycopg no longer takes the fast wait"
    else:
        monkeypatch.setattr(_connection, "FAST_WAIT", False)
    return str(request.param)


async def _sleep_until_closed(db: Any, out: asyncio.Future[Any]) -> BaseException:
    async with db.connection() as conn:
        out.set_result(conn)
        try:
            await conn.execute("SELECT pg_sleep(5)")
        except BaseException as ex:
            return ex
    raise AssertionError("pg_sleep(5) returned although its connection was closed")


@pytest.mark.parametrize("close", ["close", "finish"])
async def test_a_connection_closed_under_a_waiting_statement_wakes_it(
    database_url: str, app_name: str, server: Server, wait_path: str, close: str
) -> None:
    """psycopg #608 (its test_concurrent_close and test_socket_closed): a task waits on a
    statement while another closes the connection. The selector drops the closed socket
    silently: without a wake-up the task waits forever, and its reader stays registered on
    a descriptor number that the next connection gets."""
    db = make_db(database_url, app_name, min_size=1, max_size=2)
    async with db.lifespan(FastAPI()):
        out: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        waiter = asyncio.create_task(_sleep_until_closed(db, out))
        conn = await out
        states = await asyncio.to_thread(server.wait_until, lambda s: "active" in s)
        assert states.count("active") == 1
        if close == "close":
            await conn.close()
        else:
            conn.pgconn.finish()  # not through psycopg: only the 0.1 s sweep can see it
        async with asyncio.timeout(3):  # before pg_sleep(5) could end it
            error = await waiter
        assert isinstance(error, psycopg.OperationalError), repr(error)
        if close == "close":  # "connection socket closed", with psycopg's OSError cause
            assert isinstance(error.__cause__, OSError), repr(error.__cause__)
        # The pool replaces the connection and keeps serving; so do new connections, which
        # may get the closed one's descriptor number.
        async with db.connection(timeout=5) as again:
            assert await (await again.execute("SELECT 2")).fetchone() == (2,)
        async with await psycopg.AsyncConnection.connect(database_url) as plain:
            assert await (await plain.execute("SELECT 3")).fetchone() == (3,)
    # PostgreSQL ends the closed connection's backend once its sleep notices
    assert await asyncio.to_thread(server.wait_until, lambda s: s == [], 15) == []


@needs_fast_wait
async def test_waits_share_one_sweep_and_leave_nothing_behind(
    database_url: str, app_name: str
) -> None:
    """The sweep is one timer per loop while anything waits, not one per wait, and lets
    go of a connection as soon as its wait ends."""
    db = make_db(database_url, app_name, min_size=1, max_size=1)
    async with db.lifespan(FastAPI()), db.connection() as conn:
        await conn.execute("SELECT 1")
        await asyncio.sleep(2 * _wait.SWEEP_INTERVAL)  # the sweep armed by that statement ends
        monkeypatched = pytest.MonkeyPatch()
        timers = timers_started(monkeypatched)
        started = time.monotonic()
        for _ in range(50):
            await conn.execute("SELECT pg_sleep(0.001)")
        elapsed = time.monotonic() - started
        monkeypatched.undo()
        assert 1 <= len(timers) <= elapsed / _wait.SWEEP_INTERVAL + 1
        assert set(timers) == {_wait.SWEEP_INTERVAL}
        assert conn not in _wait._sweep_for(asyncio.get_running_loop()).waits


@pytest.mark.parametrize("how", ["close", "finish"])
async def test_a_stream_on_a_connection_closed_under_it_raises_never_ends_short(
    database_url: str, app_name: str, how: str
) -> None:
    """The fast wait ran psycopg's generator before it asked for the socket, as psycopg's
    own wait does first: on a closed connection the generator found no more results, and
    `cursor.stream()` ended after 1 row of 3 without an error (psycopg's test_stream_close)."""
    db = make_db(database_url, app_name, min_size=1, max_size=1)
    async with db.lifespan(FastAPI()), db.connection() as conn:
        rows: list[Any] = []

        async def stream() -> None:
            async for row in conn.cursor().stream("SELECT generate_series(1, 3)"):
                rows.append(row)
                if how == "close":
                    await conn.close()
                else:
                    conn.pgconn.finish()

        with pytest.raises(psycopg.OperationalError):
            await stream()
        assert rows == [(1,)]
        with pytest.raises(psycopg.OperationalError):  # psycopg's error, not "can't change"
            await conn.set_autocommit(False)
