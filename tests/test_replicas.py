"""Reads routed to real streaming replicas (``pg_basebackup -R``), writes to the primary.

The servers are a primary and two replicas made by the tests (tests/_replication.py);
each answer says which server ran it (its socket directory) and whether it was a standby.
"""

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from typing import Annotated, Any

import psycopg
import pytest
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from psycopg import AsyncConnection

from fastapi_dbpool import ConfigurationError, DBPool, ReadReplicas, health_router

from ._replication import Cluster, cluster
from .conftest import running

pytestmark = pytest.mark.anyio

_WHERE = "SELECT current_setting('unix_socket_directories'), pg_is_in_recovery()"


@pytest.fixture(scope="module")
def servers() -> Iterator[Cluster]:
    with cluster(replicas=2) as made:
        made.primary.execute("CREATE TABLE notes (id serial PRIMARY KEY, body text)")
        for node in made.replicas:
            made.wait_replayed(node)
        yield made


def reader_app(servers: Cluster, app_name: str, **kwargs: Any) -> tuple[FastAPI, ReadReplicas]:
    primary = DBPool(
        servers.primary.url, name=f"{app_name}_p", writable=True, min_size=1, max_size=4
    )
    replicas = [
        DBPool(node.url, name=f"{app_name}_r{i}", min_size=1, max_size=4, acquire_timeout=2)
        for i, node in enumerate(servers.replicas, 1)
    ]
    reader = ReadReplicas(primary, *replicas, check_interval=0.2, **kwargs)
    app = FastAPI(lifespan=reader.lifespan)
    app.include_router(health_router())
    Write = Annotated[AsyncConnection[Any], Depends(primary.get_transaction)]
    Read = Annotated[AsyncConnection[Any], Depends(reader.get_read_transaction)]

    @app.exception_handler(psycopg.Error)
    async def failed(request: Request, exc: psycopg.Error) -> JSONResponse:
        return JSONResponse({"error": type(exc).__name__}, status_code=500)

    @app.get("/where")
    async def where(conn: Read) -> list[Any]:
        row = await (await conn.execute(_WHERE)).fetchone()
        return list(row or ())

    @app.post("/notes")
    async def write(body: str, tx: Write) -> list[Any]:
        await tx.execute("INSERT INTO notes (body) VALUES (%s)", (body,))
        row = await (await tx.execute(_WHERE)).fetchone()
        return list(row or ())

    @app.post("/through-reader")
    async def write_through_reader(conn: Read) -> None:
        await conn.execute("INSERT INTO notes (body) VALUES ('never')")

    @app.post("/write-then-read")
    async def write_then_read(body: str, tx: Write, conn: Read) -> int:
        await tx.execute("INSERT INTO notes (body) VALUES (%s)", (body,))
        cur = await conn.execute("SELECT count(*) FROM notes WHERE body = %s", (body,))
        return int((await cur.fetchone() or (0,))[0])

    return app, reader


def sockets(servers: Cluster) -> tuple[str, list[str]]:
    return str(servers.primary.socket_dir), [str(n.socket_dir) for n in servers.replicas]


async def test_reads_spread_over_the_replicas_and_writes_reach_the_primary(
    servers: Cluster, app_name: str
) -> None:
    app, reader = reader_app(servers, app_name)
    primary_socket, replica_sockets = sockets(servers)

    async with running(app) as client:
        assert reader.lag() == {f"{app_name}_r1": 0.0, f"{app_name}_r2": 0.0}

        async def one(n: int) -> tuple[str, Any]:
            if n % 4 == 0:
                answer = await client.post("/notes", params={"body": f"{app_name}-{n}"})
                return "write", (answer.status_code, *answer.json())
            answer = await client.get("/where")
            return "read", (answer.status_code, *answer.json())

        results = await asyncio.gather(*(one(n) for n in range(200)))
        ready = (await client.get("/readyz")).json()

    writes = Counter(r for kind, r in results if kind == "write")
    reads = Counter(r for kind, r in results if kind == "read")
    assert writes == {(200, primary_socket, False): 50}
    assert set(reads) == {(200, s, True) for s in replica_sockets}, reads
    assert min(reads.values()) >= 50  # the fit replicas taken in turn
    assert ready["status"] == "ready"
    rows = servers.primary.execute(f"SELECT count(*) FROM notes WHERE body LIKE '{app_name}-%'")
    assert rows == [(50,)]


async def test_a_write_through_the_reader_is_refused_on_replica_and_primary(
    servers: Cluster, app_name: str
) -> None:
    app, _ = reader_app(servers, app_name)
    async with running(app) as client:
        refused = await client.post("/through-reader")
        assert refused.json() == {"error": "ReadOnlySqlTransaction"}
    # every replica lagging past the bound: the reader falls back to the primary, READ ONLY
    app, reader = reader_app(servers, app_name, max_replica_lag=0.5)
    primary_socket, _ = sockets(servers)
    for node in servers.replicas:
        node.execute("SELECT pg_wal_replay_pause()")
    try:
        async with running(app) as client:
            servers.primary.execute("INSERT INTO notes (body) VALUES ('behind')")
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and any(
                lag is not None and lag <= 0.5 for lag in reader.lag().values()
            ):
                await asyncio.sleep(0.1)
            assert all(lag is not None and lag > 0.5 for lag in reader.lag().values())
            assert (await client.get("/where")).json() == [primary_socket, False]
            refused = await client.post("/through-reader")
            assert refused.json() == {"error": "ReadOnlySqlTransaction"}
            assert reader.replicas[0].stats().replica_lag_seconds == reader.lag()[f"{app_name}_r1"]
    finally:
        for node in servers.replicas:
            node.execute("SELECT pg_wal_replay_resume()")
            servers.wait_replayed(node)
    never = servers.primary.execute("SELECT count(*) FROM notes WHERE body = 'never'")
    assert never == [(0,)]


async def test_a_request_that_writes_reads_its_own_writes(servers: Cluster, app_name: str) -> None:
    app, _ = reader_app(servers, app_name)
    async with running(app) as client:
        seen = await client.post("/write-then-read", params={"body": f"{app_name}-ryw"})
    assert seen.json() == 1  # the reader shared the writer's transaction, on the primary


async def test_a_replica_stopped_mid_load_sends_reads_elsewhere(
    servers: Cluster, app_name: str
) -> None:
    app, reader = reader_app(servers, app_name)
    _, replica_sockets = sockets(servers)
    stopped = servers.replicas[1]
    statuses: list[int] = []
    where: Counter[str] = Counter()
    try:
        async with running(app) as client:

            async def reads(n: int) -> None:
                for _ in range(n):
                    answer = await client.get("/where")
                    statuses.append(answer.status_code)
                    if answer.status_code == 200:
                        where[answer.json()[0]] += 1

            await asyncio.gather(*(reads(10) for _ in range(8)))
            assert set(where) == set(replica_sockets)
            statuses.clear()
            where.clear()

            async def stop_under_load() -> None:
                while sum(where.values()) < 40:  # stopped while 8 clients read on
                    await asyncio.sleep(0.01)
                await asyncio.to_thread(stopped.stop)

            await asyncio.gather(stop_under_load(), *(reads(40) for _ in range(8)))
            failed_while_noticing = len([s for s in statuses if s != 200])
            statuses.clear()
            where.clear()
            await asyncio.gather(*(reads(10) for _ in range(8)))
            ready = (await client.get("/readyz")).json()
            assert reader.lag()[f"{app_name}_r2"] is None
    finally:
        await asyncio.to_thread(stopped.start)
        await asyncio.to_thread(stopped.wait_streaming)
    # at most the reads that were on the stopped server when it stopped (8 at a time)
    assert failed_while_noticing <= 8
    assert statuses == [200] * 80  # once noticed: every read served
    assert set(where) == {replica_sockets[0]}
    assert ready["status"] == "ready"
    assert f"pool '{app_name}_r2'" in ready["degraded"]


async def test_lag_and_each_pool_in_one_prometheus_collector(
    servers: Cluster, app_name: str
) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from fastapi_dbpool.prometheus import DBPoolCollector

    app, reader = reader_app(servers, app_name)
    registry = CollectorRegistry()
    registry.register(DBPoolCollector(reader.primary, *reader.replicas))
    async with running(app):
        deadline = time.monotonic() + 10
        while set(reader.lag().values()) != {0.0} and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        text = generate_latest(registry).decode()
    lag_lines = [
        line for line in text.splitlines() if line.startswith("fastapi_dbpool_replica_lag")
    ]
    assert lag_lines == [
        f'fastapi_dbpool_replica_lag_seconds{{pool="{app_name}_r1"}} 0.0',
        f'fastapi_dbpool_replica_lag_seconds{{pool="{app_name}_r2"}} 0.0',
    ]
    assert text.count("# HELP fastapi_dbpool_pool_connections ") == 1
    for name in ("p", "r1", "r2"):
        assert f'fastapi_dbpool_pool_connections{{pool="{app_name}_{name}"}} 1.0' in text


async def test_a_restarted_replica_of_an_idle_primary_reads_as_caught_up(
    servers: Cluster, app_name: str
) -> None:
    """After a restart a standby's receive position starts at its WAL segment's beginning,
    behind its replay position: measured as 'received != replayed', it looked lagging by
    the age of its last transaction, growing for as long as the primary stayed idle."""
    app, reader = reader_app(servers, app_name)
    node = servers.replicas[1]
    async with running(app):
        await asyncio.to_thread(node.stop)
        await asyncio.to_thread(node.start)
        await asyncio.to_thread(node.wait_streaming)
        deadline = time.monotonic() + 5
        while reader.lag()[f"{app_name}_r2"] != 0.0 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert reader.lag()[f"{app_name}_r2"] == 0.0


async def test_reads_without_the_readers_lifespan_say_why_they_all_go_to_the_primary(
    database_url: str, app_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """With lifespan(primary, replica) the pools opened but nothing measured the lag: every
    read went to the primary, with no word of it (and the docs suggested that lifespan)."""
    import httpx

    import fastapi_dbpool

    primary = DBPool(database_url, name=f"{app_name}_p", min_size=1, max_size=1)
    replica = DBPool(database_url, name=f"{app_name}_r", min_size=1, max_size=1)
    reader = ReadReplicas(primary, replica)
    app = FastAPI()

    @app.get("/read")
    async def read(
        conn: Annotated[AsyncConnection[Any], Depends(reader.get_read_transaction)],
    ) -> str:
        row = await (await conn.execute("SELECT current_setting('application_name')")).fetchone()
        return str(row[0]) if row else ""

    def unmeasured() -> list[Any]:
        return [
            r for r in caplog.records if getattr(r, "dbpool_event", "") == "replicas_unmeasured"
        ]

    transport = httpx.ASGITransport(app=app)
    with caplog.at_level("WARNING", logger="fastapi_dbpool"):
        async with (
            fastapi_dbpool.lifespan(primary, replica)(app),
            httpx.AsyncClient(transport=transport, base_url="http://test") as client,
        ):
            answers = [(await client.get("/read")).json() for _ in range(3)]
        assert answers == [primary.name] * 3  # every read on the primary...
        (warning,) = unmeasured()  # ...and said so, once
        assert "lifespan=reader.lifespan" in warning.getMessage()
        caplog.clear()
        reader._warned_unmeasured = False  # under its own lifespan it has no cause to warn
        async with (
            reader.lifespan(app),
            httpx.AsyncClient(transport=transport, base_url="http://test") as client,
        ):
            assert (await client.get("/read")).status_code == 200
        assert unmeasured() == []


async def test_read_sessions_run_on_the_replicas_read_only_and_see_the_requests_writes(
    servers: Cluster, app_name: str
) -> None:
    """SQLAlchemy sessions routed as ReadDep is: on a replica in a READ ONLY transaction,
    refused a write; on the request's own primary connection after a write session."""
    pytest.importorskip("sqlalchemy", reason="fastapi_dbpool[sqlalchemy] is not installed")
    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError
    from sqlalchemy.ext.asyncio import AsyncSession

    from fastapi_dbpool.sqlalchemy import Sessions

    primary = DBPool(
        servers.primary.url, name=f"{app_name}_p", writable=True, min_size=1, max_size=4
    )
    replicas = [
        DBPool(node.url, name=f"{app_name}_r{i}", min_size=1, max_size=4)
        for i, node in enumerate(servers.replicas, 1)
    ]
    reader = ReadReplicas(primary, *replicas, check_interval=0.2)
    orm = Sessions(primary, reader=reader)
    Read = Annotated[AsyncSession, orm.read_session_dependency]
    Write = Annotated[AsyncSession, orm.session_dependency]
    app = FastAPI(lifespan=reader.lifespan)

    @app.exception_handler(DBAPIError)
    async def failed(request: Request, exc: DBAPIError) -> JSONResponse:
        return JSONResponse({"error": type(exc.orig).__name__}, status_code=500)

    @app.get("/where")
    async def where(session: Read) -> list[Any]:
        return list((await session.execute(text(_WHERE))).one())

    @app.post("/through-reader")
    async def through_reader(session: Read) -> None:
        await session.execute(text("INSERT INTO notes (body) VALUES ('never')"))

    @app.post("/write-then-read")
    async def write_then_read(body: str, write: Write, read: Read) -> list[Any]:
        await write.execute(text("INSERT INTO notes (body) VALUES (:b)"), {"b": body})
        seen = await read.execute(text("SELECT count(*) FROM notes WHERE body = :b"), {"b": body})
        return [seen.scalar_one(), *(await read.execute(text(_WHERE))).one()]

    primary_socket, replica_sockets = sockets(servers)
    async with running(app) as client:
        reads: Counter[tuple[Any, ...]] = Counter(
            [tuple((await client.get("/where")).json()) for _ in range(20)]
        )
        refused = (await client.post("/through-reader")).json()
        mine = (await client.post("/write-then-read", params={"body": f"{app_name}-s"})).json()
    assert set(reads) == {(s, True) for s in replica_sockets}, reads
    assert refused == {"error": "ReadOnlySqlTransaction"}  # psycopg's, in SQLAlchemy's
    assert mine == [1, primary_socket, False]  # its own write, on its own primary connection
    rows = servers.primary.execute(f"SELECT count(*) FROM notes WHERE body = '{app_name}-s'")
    assert rows == [(1,)]
    assert servers.primary.execute("SELECT count(*) FROM notes WHERE body = 'never'") == [(0,)]
    with pytest.raises(ConfigurationError, match="reader's primary"):
        Sessions(replicas[0], reader=reader)
    with pytest.raises(ConfigurationError, match="has no read sessions"):
        _ = Sessions(replicas[0]).read_session_dependency
