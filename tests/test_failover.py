"""A writable pool (``DBPool(writable=True)``) through a real failover: it never serves a
read-only server, ``/readyz`` says why while there is no writable one, and writes come
back once a replica is promoted (``pg_promote()``)."""

import asyncio
import time
from collections import Counter
from typing import Any

import psycopg
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from fastapi_dbpool import DBPool, PoolOpenError, health_router

from ._replication import Cluster, cluster
from .conftest import running

pytestmark = pytest.mark.anyio


def writer_app(db: DBPool) -> tuple[FastAPI, Counter[str]]:
    """An app writing through `db`; the psycopg errors its requests raised, by class."""
    app = FastAPI(lifespan=db.lifespan)
    app.include_router(health_router())
    errors: Counter[str] = Counter()

    @app.exception_handler(psycopg.Error)
    async def failed(request: Request, exc: psycopg.Error) -> JSONResponse:
        errors[type(exc).__name__] += 1
        return JSONResponse({"error": type(exc).__name__}, status_code=500)

    @app.post("/notes")
    async def write(body: str, tx: db.TransactionDep) -> str:  # type: ignore[name-defined]
        await tx.execute("INSERT INTO notes (body) VALUES (%s)", (body,))
        row = await (
            await tx.execute("SELECT current_setting('unix_socket_directories')")
        ).fetchone()
        return str((row or ("",))[0])

    return app, errors


async def until(check: Any, timeout: float) -> float:
    """Seconds until the async `check()` is true; fails the test after `timeout`."""
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < timeout, "not within the bound"
        await asyncio.sleep(0.1)
    return time.monotonic() - started


def multi_host(servers: Cluster, attrs: str) -> str:
    hosts = f"{servers.primary.socket_dir},{servers.replicas[0].socket_dir}"
    return f"postgresql://postgres@/postgres?host={hosts}&target_session_attrs={attrs}"


async def test_a_writable_pool_refuses_to_open_on_a_standby() -> None:
    with cluster(replicas=1) as servers:
        db = DBPool(servers.replicas[0].url, writable=True, min_size=1, open_timeout=3)
        with pytest.raises(PoolOpenError, match="connected server is read-only"):
            async with db.lifespan(FastAPI()):
                pass
        plain = DBPool(servers.replicas[0].url, min_size=1)  # not writable: opens as before
        async with plain.lifespan(FastAPI()):
            pass


@pytest.mark.parametrize(
    ("attrs", "writable"),
    [("any", True), ("read-write", False)],
    ids=["writable-pool", "libpq-read-write"],
)
async def test_writes_come_back_after_promotion_never_through_the_standby(
    app_name: str, attrs: str, writable: bool
) -> None:
    """Either way the standby is refused, and /readyz names it as the cause."""
    with cluster(replicas=1) as servers:
        servers.primary.execute("CREATE TABLE notes (id serial PRIMARY KEY, body text)")
        servers.wait_replayed(servers.replicas[0])
        db = DBPool(
            multi_host(servers, attrs),
            name=app_name,
            writable=writable,
            min_size=2,
            max_size=4,
            acquire_timeout=1,
        )
        app, errors = writer_app(db)
        statuses: Counter[int] = Counter()
        async with running(app) as client:

            async def wrote() -> bool:
                answer = await client.post("/notes", params={"body": app_name})
                statuses[answer.status_code] += 1
                return answer.status_code == 200

            assert await wrote()
            await asyncio.to_thread(servers.primary.stop)

            async def unready_read_only() -> bool:
                await wrote()
                ready = await client.get("/readyz")
                return ready.status_code == 503 and "read-only" in ready.json()["reason"]

            await until(unready_read_only, 15)
            servers.replicas[0].execute("SELECT pg_promote()")
            recovered_in = await until(wrote, 15)
            ready = await client.get("/readyz")
        assert ready.status_code == 200, ready.json()
        assert recovered_in < 10
        # while there was no writable server: 503s, never a write refused as read-only
        assert "ReadOnlySqlTransaction" not in errors
        assert set(statuses) <= {200, 500, 503}
        assert statuses[200] >= 2
        rows = servers.replicas[0].execute(f"SELECT count(*) FROM notes WHERE body = '{app_name}'")
        assert rows[0][0] == statuses[200]  # every 200 is a row on the new primary


async def test_a_server_turned_read_only_under_the_pool_is_left(app_name: str) -> None:
    """SQLSTATE 25006 on connections made before: every one is replaced, none read-only."""
    with cluster(replicas=0) as servers:
        primary = servers.primary
        primary.execute("CREATE TABLE notes (id serial PRIMARY KEY, body text)")
        db = DBPool(primary.url, name=app_name, writable=True, min_size=2, acquire_timeout=1)
        app, errors = writer_app(db)
        async with running(app) as client:
            assert (await client.post("/notes", params={"body": "a"})).status_code == 200
            primary.execute("ALTER SYSTEM SET default_transaction_read_only = on")
            primary.execute("SELECT pg_reload_conf()")
            await asyncio.sleep(0.5)  # the backends read the new setting between statements
            refused = await client.post("/notes", params={"body": "b"})
            assert refused.json() == {"error": "ReadOnlySqlTransaction"}

            async def unready() -> bool:
                ready = await client.get("/readyz")
                return ready.status_code == 503 and "read-only" in ready.json()["reason"]

            await until(unready, 10)
            assert (await client.post("/notes", params={"body": "c"})).status_code == 503
            primary.execute("ALTER SYSTEM RESET default_transaction_read_only")
            primary.execute("SELECT pg_reload_conf()")

            async def wrote() -> bool:
                answer = await client.post("/notes", params={"body": "d"})
                return answer.status_code == 200

            await until(wrote, 10)
        assert errors == {"ReadOnlySqlTransaction": 1}  # the one statement that found out
