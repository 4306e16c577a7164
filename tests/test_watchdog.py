"""Failure 5: a blocked event loop silently stops the pool's background work; now it is named."""

import asyncio
import inspect
import logging
import threading
import time

import pytest
from fastapi import FastAPI

from fastapi_dbpool import ConnectionDep

from .conftest import make_db, serve

pytestmark = pytest.mark.anyio


def stall_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "fastapi_dbpool" and "was blocked for" in r.getMessage()
    ]


async def test_a_blocking_handler_is_named_once_with_its_file_and_line(
    database_url: str, app_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    db = make_db(database_url, app_name)
    app = FastAPI()

    @app.get("/blocking")
    async def blocking(conn: ConnectionDep) -> None:
        time.sleep(0.5)  # noqa: ASYNC251 (the mistake the watchdog is for)

    line = (
        next(
            n
            for n, text in enumerate(inspect.getsource(blocking).splitlines())
            if "time.sleep" in text
        )
        + blocking.__code__.co_firstlineno
    )
    caplog.set_level(logging.WARNING, logger="fastapi_dbpool")
    async with serve(app, db) as client:
        assert (await client.get("/blocking")).status_code == 200
        await asyncio.sleep(0.1)  # the watchdog reports once the loop answers again
        warnings = stall_warnings(caplog)
        assert len(warnings) == 1, warnings
        assert f"blocking() at {__file__}:{line}" in warnings[0]
        assert "blocked for 5" in warnings[0] or "blocked for 4" in warnings[0]
        assert "hint:" in warnings[0]
        watchdog = db._running().watchdog
        assert watchdog is not None
        assert watchdog.stalls == 1
        assert watchdog.worst_lag >= 0.4


async def test_a_normal_load_raises_no_warning(
    database_url: str, app_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    db = make_db(database_url, app_name)
    app = FastAPI()

    @app.get("/query")
    async def query(conn: ConnectionDep) -> None:
        await conn.execute("SELECT pg_sleep(0.01)")

    caplog.set_level(logging.WARNING, logger="fastapi_dbpool")
    async with serve(app, db) as client:
        for _ in range(5):
            results = await asyncio.gather(*(client.get("/query") for _ in range(20)))
            assert {r.status_code for r in results} == {200}
        await asyncio.sleep(0.2)
    assert stall_warnings(caplog) == []


async def test_the_watchdog_stops_with_the_lifespan_and_can_be_turned_off(
    database_url: str, app_name: str
) -> None:
    def watchdogs() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == f"{app_name}-watchdog"]

    db = make_db(database_url, app_name)
    async with db.lifespan(FastAPI()):
        assert len(watchdogs()) == 1
    assert watchdogs() == []
    off = make_db(database_url, app_name, watchdog=None)
    async with off.lifespan(FastAPI()):
        assert watchdogs() == []


async def test_stopping_returns_at_once_even_as_the_thread_wakes_to_ping() -> None:
    """stop() sets both of the thread's events; a thread that had just woken, and waited
    for the GIL while the loop's thread ran on, used to clear one of them, ping a loop
    blocked in join(), and hold shutdown for join's whole 5 s."""
    from fastapi_dbpool._watchdog import LoopWatchdog

    loop = asyncio.get_running_loop()
    slow = []
    for _ in range(30):
        watchdog = LoopWatchdog(loop, 0.004, "race")  # the thread wakes every 1 ms
        watchdog.start()
        busy_until = time.perf_counter() + 0.003
        while time.perf_counter() < busy_until:  # hold the GIL as the thread's wait ends
            pass
        started = time.perf_counter()
        watchdog.stop()
        if time.perf_counter() - started > 1.0:
            slow.append(time.perf_counter() - started)
        await asyncio.sleep(0)
    assert slow == []
