"""When the server refuses new connections, every refusal names the real cause.

psycopg_pool opens connections in the background and only logs why one failed; the
request that waited sees a timeout. Here the server really refuses (a role's
CONNECTION LIMIT, NOLOGIN, a closed port), and the exhaustion warning, /readyz,
db.stats() and the Prometheus counter must say why, while the 503 body stays generic.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry, generate_latest
from psycopg.conninfo import make_conninfo

from fastapi_dbpool import ConnectionDep, PoolOpenError, health_router
from fastapi_dbpool._connect_errors import classify
from fastapi_dbpool.prometheus import DBPoolCollector

from .conftest import Server, make_db, serve

pytestmark = pytest.mark.anyio


@pytest.fixture
def role(server: Server, app_name: str) -> Iterator[str]:
    """A role of the test's own, which a test can limit or lock out."""
    server.query(f"CREATE ROLE {app_name} LOGIN CONNECTION LIMIT 1")
    try:
        yield app_name
    finally:
        server.query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", app_name
        )
        server.query(f"DROP ROLE {app_name}")


async def test_a_refusing_server_is_named_in_every_refusal(
    database_url: str,
    app_name: str,
    role: str,
    server: Server,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "fastapi_dbpool")
    db = make_db(make_conninfo(database_url, user=role), app_name, max_size=3, acquire_timeout=0.5)
    app = FastAPI(lifespan=db.lifespan)
    app.include_router(health_router(probe_timeout=0.5))

    @app.get("/hold")
    async def hold(conn: ConnectionDep) -> None:
        await conn.execute("SELECT pg_sleep(2)")

    @app.get("/ping")
    async def ping(conn: ConnectionDep) -> None:
        await conn.execute("SELECT 1")

    registry = CollectorRegistry()
    registry.register(DBPoolCollector(db))
    async with serve(app, db) as client:
        holder = asyncio.create_task(client.get("/hold"))  # the role's one connection
        await asyncio.sleep(0.2)
        refused = await client.get("/ping")
        assert refused.status_code == 503
        assert "too many" not in refused.text  # the client's body stays generic

        warnings = [r.getMessage() for r in caplog.records if "exhausted" in r.getMessage()]
        assert len(warnings) == 1
        assert "new connections fail: " in warnings[0]
        assert f'too many connections for role "{role}"' in warnings[0]
        assert "CONNECTION LIMIT" in warnings[0]  # the hint fits the cause...
        assert "raise max_size if" not in warnings[0]  # ...and is not the busy-pool one

        ready = await client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["reason"].startswith("no connection within 0.5s: new connections fail")
        assert "too many connections for role" in ready.json()["reason"]

        stats = db.stats()
        assert stats.last_connection_error is not None
        assert stats.last_connection_error.endswith("(too_many_connections)")
        assert stats.connection_errors_by_cause["too_many_connections"] >= 1
        assert stats.connection_errors >= stats.connection_errors_by_cause["too_many_connections"]
        exposed = generate_latest(registry).decode()
        line = next(
            x
            for x in exposed.splitlines()
            if x.startswith("fastapi_dbpool_connection_failures_total")
            and 'cause="too_many_connections"' in x
        )
        assert float(line.rsplit(" ", 1)[1]) >= 1
        assert (await holder).status_code == 200

        # the server takes connections again: once one opens, the failure is history
        server.query(f"ALTER ROLE {role} CONNECTION LIMIT -1")
        for _ in range(20):  # psycopg_pool retries in the background, backing off
            await asyncio.gather(client.get("/hold"), client.get("/ping"))
            if db.stats().last_connection_error is None:
                break
        assert db.stats().last_connection_error is None
        answers = await asyncio.gather(client.get("/hold"), client.get("/ping"))
        assert [a.status_code for a in answers] == [200, 200]
        assert (await client.get("/readyz")).status_code == 200


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _refusal(conninfo: str) -> psycopg.OperationalError:
    try:
        psycopg.connect(conninfo, connect_timeout=3).close()
    except psycopg.OperationalError as ex:
        return ex
    raise AssertionError(f"{conninfo} connected")


def test_real_refusals_are_classified(database_url: str, role: str, server: Server) -> None:
    closed = _refusal(f"host=127.0.0.1 port={_free_port()} dbname=x")
    assert classify(closed) == "refused"
    server.query(f"ALTER ROLE {role} NOLOGIN")
    assert classify(_refusal(make_conninfo(database_url, user=role))) == "authentication"
    assert classify(_refusal(make_conninfo(database_url, dbname="no_such_db"))) == "missing"


async def test_a_failing_kwargs_callable_fails_startup_with_pool_open_error(
    database_url: str, app_name: str
) -> None:
    def secrets() -> dict[str, Any]:
        raise RuntimeError("the vault is sealed")

    db = make_db(database_url, app_name, kwargs=secrets)
    with pytest.raises(
        PoolOpenError, match=r"kwargs= or password failed \(RuntimeError: the vault"
    ):
        async with db.lifespan(FastAPI()):
            pass
