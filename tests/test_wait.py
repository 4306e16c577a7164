"""Statements wait on the socket with psycopg's protocol, but start no timer each."""

import asyncio

import pytest
from fastapi import FastAPI

from .conftest import make_db, timers_started

pytestmark = pytest.mark.anyio


async def test_statements_start_no_timer(
    database_url: str, app_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """psycopg's own wait starts a timer at every wait, left in the loop's heap when
    cancelled (as it does here if the installed psycopg lacks what `_wait` uses)."""
    db = make_db(database_url, app_name, min_size=1, max_size=1)
    async with db.lifespan(FastAPI()), db.connection() as conn:
        await conn.execute("SELECT 1")
        timers = timers_started(monkeypatch)
        for _ in range(20):
            await conn.execute("SELECT pg_sleep(0.001)")
        monkeypatch.undo()
        assert timers == []


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
