"""The lifespan: eager single open on the app's loop, clear errors, clean shutdown."""

import asyncio
import functools
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from fastapi_dbpool import (
    ConfigurationError,
    ConnectionDep,
    DBPool,
    PoolNotRunningError,
    PoolOpenError,
    WrongEventLoopError,
)

from .conftest import Server, forward_to_server, make_db, serve

pytestmark = pytest.mark.anyio


def one_query_app(db: DBPool | None = None) -> FastAPI:
    app = FastAPI(lifespan=db.lifespan if db else None)

    @app.get("/one")
    async def one(conn: ConnectionDep) -> int:
        row = await (await conn.execute("SELECT 1")).fetchone()
        assert row is not None
        return int(row[0])

    return app


async def test_the_pool_opens_eagerly_and_closes_on_shutdown(
    database_url: str, server: Server, app_name: str
) -> None:
    db = make_db(database_url, app_name, min_size=2, max_size=4)
    async with db.lifespan(FastAPI()):
        # min_size connections are up before any request arrives
        assert server.states() == ["idle", "idle"]
    assert server.wait_until(lambda s: s == []) == []


async def test_concurrent_first_requests_share_one_pool(
    database_url: str, server: Server, app_name: str
) -> None:
    """Failure 1: a lazily created pool, raced by the first requests, was duplicated."""
    db = make_db(database_url, app_name, min_size=1, max_size=5)
    app = FastAPI()
    pools: set[int] = set()
    peak: list[int] = []

    @app.get("/first")
    async def first(conn: ConnectionDep) -> None:
        pools.add(id(db.pool))
        await conn.execute("SELECT pg_sleep(0.05)")
        peak.append(len(server.states()))

    async with serve(app, db) as client:
        results = await asyncio.gather(*(client.get("/first") for _ in range(50)))
        assert [r.status_code for r in results] == [200] * 50
        assert len(server.states()) <= 5
    assert len(pools) == 1
    assert max(peak) <= 5


async def test_an_unreachable_database_fails_startup_with_a_clear_error() -> None:
    db = DBPool("postgresql://app:hunter2@127.0.0.1:1/appdb", open_timeout=3)
    with pytest.raises(PoolOpenError) as info:
        async with db.lifespan(FastAPI()):
            pytest.fail("startup must not succeed")
    message = str(info.value)
    assert "127.0.0.1" in message
    assert "appdb" in message
    assert "hunter2" not in message
    # tried until open_timeout, as a server still starting needs; then named for what it is
    assert "still failing: " in message
    assert "(refused)" in message
    assert "nothing listens at the server's address" in message


async def test_a_misconfigured_database_fails_startup_at_once_with_a_hint_that_fits(
    database_url: str,
) -> None:
    """A wrong password or database failed in 0.6 s, but told the user to "raise
    open_timeout", which could not help."""
    db = DBPool(database_url, kwargs={"dbname": "no_such_db"}, open_timeout=30)
    started = time.monotonic()
    with pytest.raises(PoolOpenError, match="no_such_db") as info:
        async with db.lifespan(FastAPI()):
            pytest.fail("startup must not succeed")
    assert time.monotonic() - started < 15  # not tried again until open_timeout
    assert "the database or the role does not exist" in str(info.value)
    assert "open_timeout" not in str(info.value).split("within")[1]


_STARTS_LATE = """
import asyncio, logging, sys, time
from fastapi_dbpool import DBPool

logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
db = DBPool(sys.argv[1], min_size=1, max_size=1, open_timeout=30)

async def main() -> None:
    started = time.monotonic()
    async with db.open(), db.connection() as conn:
        await conn.execute("SELECT 1")
        print(f"opened after {time.monotonic() - started:.1f}s")

asyncio.run(main())
"""


async def test_a_server_that_comes_up_after_the_app_is_waited_for(database_url: str) -> None:
    """With the server down at startup (docker compose, Kubernetes start order) the app
    exited 0.77 s after start, without trying again."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]  # nothing listens there until the "server" is up
    url = psycopg.conninfo.make_conninfo(database_url, host="127.0.0.1", port=free)
    script = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _STARTS_LATE, url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip

    await asyncio.sleep(2)  # the app has tried, and found nothing
    forward = functools.partial(forward_to_server, database_url)
    server = await asyncio.start_server(forward, "127.0.0.1", free)
    try:
        out, err = await asyncio.wait_for(script.communicate(), 60)
    finally:
        server.close()
    assert script.returncode == 0, err.decode()[-3000:]
    assert out.decode().startswith("opened after")
    waits = [line for line in err.decode().splitlines() if "cannot be reached yet" in line]
    assert waits  # each wait logged
    assert all("refused" in w for w in waits)


def test_no_lifespan_is_an_immediate_error(database_url: str) -> None:
    """`TestClient(app)` without `with` never runs the lifespan."""
    app = one_query_app()
    client = TestClient(app)
    with pytest.raises(PoolNotRunningError, match=r"lifespan=db\.lifespan"):
        client.get("/one")


def test_testclient_as_context_manager_runs_the_lifespan(database_url: str, app_name: str) -> None:
    db = make_db(database_url, app_name)
    app = one_query_app(db)
    for _ in range(2):  # a DBPool can run again after a clean shutdown
        with TestClient(app) as client:
            assert client.get("/one").json() == 1
    with pytest.raises(PoolNotRunningError):
        TestClient(app).get("/one")


def test_composes_inside_a_user_lifespan(database_url: str, app_name: str) -> None:
    db = make_db(database_url, app_name)
    events: list[str] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        events.append("user start")
        async with db.lifespan(app):
            yield {"mine": 1}
        events.append("user stop")

    app = FastAPI(lifespan=lifespan)

    @app.get("/one")
    async def one(conn: ConnectionDep) -> int:
        row = await (await conn.execute("SELECT 1")).fetchone()
        assert row is not None
        return int(row[0])

    with TestClient(app) as client:
        assert client.get("/one").json() == 1
    assert events == ["user start", "user stop"]


async def test_one_dbpool_cannot_run_twice_at_once(database_url: str, app_name: str) -> None:
    db = make_db(database_url, app_name)
    async with db.lifespan(FastAPI()):
        with pytest.raises(ConfigurationError, match="one DBPool per app"):
            async with db.lifespan(FastAPI()):
                pytest.fail("must not start")


async def test_use_from_another_event_loop_is_an_error_not_a_hang(
    database_url: str, app_name: str
) -> None:
    """Failure 4: psycopg_pool used from a second loop waits until PoolTimeout."""
    db = make_db(database_url, app_name, acquire_timeout=30)
    app = one_query_app()
    caught: list[BaseException] = []

    async def from_other_loop() -> None:
        try:
            async with db.connection():
                pass
        except BaseException as ex:
            caught.append(ex)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=True)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            try:
                await client.get("/one")
            except BaseException as ex:
                caught.append(ex)

    async with db.lifespan(app):
        thread = threading.Thread(target=asyncio.run, args=(from_other_loop(),))
        thread.start()
        await asyncio.to_thread(thread.join, 10)
    assert [type(e) for e in caught] == [WrongEventLoopError, WrongEventLoopError]
    assert "event loop" in str(caught[0])
    assert "lifespan" in str(caught[0])


async def test_connections_still_out_at_shutdown_are_closed_and_logged(
    database_url: str, server: Server, app_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    db = make_db(database_url, app_name, min_size=1, max_size=2, close_timeout=2)
    started = asyncio.Event()
    outcome: list[BaseException] = []

    async def stuck_job() -> None:
        try:
            async with db.connection() as conn:
                started.set()
                await conn.execute("SELECT pg_sleep(60)")
        except BaseException as ex:
            outcome.append(ex)

    async with db.lifespan(FastAPI()):
        job = asyncio.create_task(stuck_job())
        await started.wait()
        await asyncio.sleep(0.1)
        assert "active" in server.states()
    assert server.wait_until(lambda s: s == [], timeout=5) == []
    await asyncio.wait_for(job, 5)
    assert len(outcome) == 1  # the job saw its connection go, it did not hang
    assert any("still checked out at shutdown" in r.getMessage() for r in caplog.records)


async def test_a_cancelled_startup_leaves_nothing_open(
    database_url: str, server: Server, app_name: str
) -> None:
    db = make_db(database_url, app_name, min_size=3, max_size=3)

    async def start() -> None:
        async with db.lifespan(FastAPI()):
            await asyncio.sleep(60)

    task = asyncio.create_task(start())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert server.wait_until(lambda s: s == []) == []
    logging.getLogger(__name__).debug("startup cancelled cleanly")


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_callable_connection_kwargs_are_resolved_for_every_connection(
    database_url: str, server: Server, app_name: str, kind: str
) -> None:
    """psycopg_pool takes kwargs= as a callable (e.g. rotating credentials); we add ours."""
    calls: list[int] = []

    def sync_kwargs() -> dict[str, Any]:
        calls.append(1)
        return {"application_name": app_name}

    async def async_kwargs() -> dict[str, Any]:
        return sync_kwargs()

    source = sync_kwargs if kind == "sync" else async_kwargs
    db = DBPool(database_url, min_size=2, max_size=2, kwargs=source)
    app = one_query_app()
    async with serve(app, db) as client:
        assert (await client.get("/one")).json() == 1
        assert server.states() == ["idle", "idle"]  # both pool connections got the name
        async with db.connection() as conn:
            assert conn.autocommit
    assert len(calls) == 3  # the startup check, then each of the two pool connections


async def test_a_connection_returned_just_before_shutdown_is_closed(
    database_url: str, app_name: str, server: Server
) -> None:
    """psycopg_pool queues a returned connection for a worker, and close() discards the
    queued task without closing the connection: its server session stayed open."""
    db = make_db(database_url, app_name, min_size=2, max_size=2)
    app = FastAPI()
    async with db.lifespan(app):
        for _ in range(2):
            async with db.connection() as conn:
                await conn.execute("SELECT 1")
    assert server.wait_until(lambda states: not states, timeout=3.0) == []


async def test_a_shutdown_cancelled_with_every_task_on_its_loop_leaves_no_backend(
    database_url: str, app_name: str, server: Server
) -> None:
    """What an event loop being torn down does (asyncio.Runner, pytest-asyncio): it cancels
    every task at once, the app's and psycopg_pool's workers alike. psycopg_pool's close had
    taken the idle connections out of the pool already, and left them open."""
    db = make_db(database_url, app_name, min_size=3, max_size=3)
    opened = asyncio.Event()

    async def run_app() -> None:
        async with db.lifespan(FastAPI()):
            opened.set()
            await asyncio.Event().wait()

    before = asyncio.all_tasks()  # the test runner's own tasks, this one included
    app_task = asyncio.create_task(run_app())
    await opened.wait()
    assert await asyncio.to_thread(server.states) == ["idle", "idle", "idle"]
    others = asyncio.all_tasks() - before
    assert app_task in others
    assert len(others) > 1  # psycopg_pool's workers
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)
    assert await asyncio.to_thread(server.wait_until, lambda states: states == []) == []


def _job_script() -> str:
    page = (Path(__file__).parent.parent / "docs" / "dependencies.md").read_text()
    (script,) = re.findall(r'```python title="job\.py"\n(.*?)```', page, re.S)
    return str(script)


def test_a_job_outside_fastapi_runs_the_pool_as_documented(
    database_url: str, tmp_path: Path
) -> None:
    """`async with db.lifespan(None)` failed with AttributeError ('NoneType' object has no
    attribute 'state'): a cron job or a worker needed a dummy FastAPI()."""
    (tmp_path / "job.py").write_text(_job_script())
    env = {**os.environ, "DATABASE_URL": database_url}
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS job_runs")
    try:
        first = subprocess.run(
            [sys.executable, "job.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip
        assert first.returncode == 0, first.stderr[-3000:]
        assert first.stdout.splitlines() == ["runs so far: 1"]
        # the same DBPool again in a second asyncio.run(), then used after its block ended
        again = subprocess.run(
            [sys.executable, "-c", _AGAIN], cwd=tmp_path, env=env, capture_output=True,
            text=True, timeout=60,
        )  # fmt: skip
        assert again.returncode == 0, again.stderr[-3000:]
        lines = again.stdout.splitlines()
        assert lines[:2] == ["runs so far: 2", "runs so far: 3"]
        assert lines[2].startswith("PoolNotRunningError: The connection pool is no longer running")
        assert "its lifespan ended at" in lines[2]
        assert "s ago" in lines[2]
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute("DROP TABLE IF EXISTS job_runs")


_AGAIN = """
import asyncio
import job
from fastapi_dbpool import PoolNotRunningError

asyncio.run(job.nightly_job())
asyncio.run(job.nightly_job())

async def after() -> None:
    try:
        async with job.db.connection():
            pass
    except PoolNotRunningError as ex:
        print(f"PoolNotRunningError: {ex}")

asyncio.run(after())
"""


async def test_a_pool_that_never_ran_says_how_to_run_it_outside_an_app(
    database_url: str, app_name: str
) -> None:
    db = make_db(database_url, app_name)
    with pytest.raises(PoolNotRunningError, match=r"async with db\.open\(\)"):
        async with db.connection():
            pass


_DEADLINE_APP = """
import asyncio, logging, sys
from fastapi import APIRouter, Depends, FastAPI
from fastapi_dbpool import CancellationMiddleware, DBPool, deadline

logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
db = DBPool(sys.argv[1], min_size=1, max_size=1)
app = FastAPI(lifespan=db.lifespan)
if sys.argv[2] == "with":
    app.add_middleware(CancellationMiddleware)
reports = APIRouter(dependencies=[deadline(30)])

@reports.get("/report")
async def report() -> None: ...

def nested(budget: None = deadline(5)) -> None: ...

@app.post("/nested")
async def nested_route(_: None = Depends(nested)) -> None: ...

@app.get("/plain")
async def plain() -> None: ...

app.include_router(reports)

async def main() -> None:
    async with db.lifespan(app):
        pass

asyncio.run(main())
"""


@pytest.mark.parametrize("middleware", ["with", "without"])
def test_a_deadline_the_app_cannot_enforce_is_named_at_startup(
    database_url: str, middleware: str
) -> None:
    """deadline(1) on a route of an app without CancellationMiddleware started fine; the
    first request to that route raised ConfigurationError."""
    done = subprocess.run(
        [sys.executable, "-c", _DEADLINE_APP, database_url, middleware],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    warnings = [line for line in done.stderr.splitlines() if "no CancellationMiddleware" in line]
    if middleware == "with":
        assert warnings == []
    else:
        assert len(warnings) == 1
        assert "GET /report" in warnings[0]
        assert "POST /nested" in warnings[0]
        assert "/plain" not in warnings[0]
        assert "app.add_middleware(CancellationMiddleware)" in warnings[0]


_HOLDS = """
import asyncio, logging, sys
import httpx
from fastapi import FastAPI
from fastapi_dbpool import ConnectionDep, DBPool

logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
db = DBPool(sys.argv[1], min_size=1, max_size=2, hold_warning=0.3)
app = FastAPI(lifespan=db.lifespan)

@app.get("/slow")
async def slow(conn: ConnectionDep) -> None:
    await conn.execute("SELECT 1")
    await asyncio.sleep(0.8)  # a slow call made while holding the connection

@app.get("/quick")
async def quick(conn: ConnectionDep) -> None:
    await conn.execute("SELECT 1")

async def nightly() -> None:
    async with db.connection() as conn:
        await conn.execute("SELECT 1")
        await asyncio.sleep(0.8)

async def main() -> None:
    async with db.lifespan(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            for _ in range(5):
                await client.get("/quick")
            await client.get("/slow")
        await nightly()
        await asyncio.sleep(0.5)

asyncio.run(main())
"""


def test_a_connection_held_past_hold_warning_is_named_once_with_its_route_and_place(
    database_url: str,
) -> None:
    """A connection held too long was only named once the pool ran dry."""
    done = subprocess.run(
        [sys.executable, "-c", _HOLDS, database_url], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-3000:]
    held = [line for line in done.stderr.splitlines() if "has been held for" in line]
    assert len(held) == 2, done.stderr  # once per lease: not for the quick ones
    assert "by /slow;" in held[0]  # the route: its connection was taken by FastAPI
    assert "by work outside a request, taken at " in held[1]
    assert held[1].split("taken at ")[1].startswith("<string>:")  # the script's own line...
    assert " in nightly;" in held[1]  # ...in the function that took it
