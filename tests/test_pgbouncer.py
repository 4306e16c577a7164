"""Behind a real PgBouncer in transaction mode: the guarantees hold, nothing leaks to others.

PgBouncer runs each transaction (each autocommit statement) on whichever server backend
is free, shared with every other client of the same database and user. What one client
leaves in a session (a statement_timeout, a search_path, a prepared statement, a lock)
is then another client's surprise.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import psycopg
import pytest
from fastapi import FastAPI, HTTPException
from psycopg.rows import dict_row

from benchmarks import _pgbouncer
from benchmarks._pgbouncer import PgBouncer
from fastapi_dbpool import (
    CancellationMiddleware,
    ConfigurationError,
    ConnectionDep,
    DBPool,
    SessionStateError,
    TransactionDep,
    deadline,
)

from .conftest import Server, make_db, serve

pytestmark = pytest.mark.anyio


def pooled(bouncer: PgBouncer, app_name: str, **kwargs: Any) -> DBPool:
    kwargs.setdefault("transaction_pooler", True)
    kwargs.setdefault("max_size", 8)
    return make_db(bouncer.url, app_name, **kwargs)


def plain_client(bouncer: PgBouncer) -> psycopg.Connection[Any]:
    """Another client of the same database and user, through the same PgBouncer."""
    return psycopg.connect(bouncer.url, autocommit=True, prepare_threshold=None)


async def test_an_undecided_pool_behind_a_pooler_takes_the_safe_mode_and_says_so(
    database_url: str, app_name: str, pgbouncer: PgBouncer, caplog: pytest.LogCaptureFixture
) -> None:
    """Left undecided behind PgBouncer in transaction mode, the pool warned and stayed in
    session mode: 5 and 9 of 50 requests then answered 500 (DuplicatePreparedStatement)."""
    caplog.set_level(logging.WARNING, "fastapi_dbpool")
    for db in (
        make_db(database_url, app_name),  # direct: nothing to say
        pooled(pgbouncer, app_name),  # in the mode already
        pooled(pgbouncer, app_name, transaction_pooler=False),  # the user said: session pooler
    ):
        async with db.lifespan(FastAPI()):
            pass
    assert not [r for r in caplog.records if "pooler" in r.getMessage()]
    undecided = pooled(pgbouncer, app_name, transaction_pooler=None)
    async with serve(counter_app(undecided), undecided) as client:
        answers = await asyncio.gather(
            *(client.get(f"/add/{i}") if i % 2 else client.post(f"/tx/{i}") for i in range(300))
        )
        assert [a.status_code for a in answers] == [200] * 300
        async with undecided.connection() as conn:
            with pytest.raises(SessionStateError):
                await conn.execute("SET work_mem = '64MB'")
            assert (await (await conn.execute("SELECT 1")).fetchone()) == (1,)
    warnings = [r.getMessage() for r in caplog.records if "pooler" in r.getMessage()]
    assert len(warnings) == 1
    assert "running in transaction-pooler mode" in warnings[0]
    assert "transaction_pooler=True (DBPOOL_TRANSACTION_POOLER=1)" in warnings[0]
    assert "False if it pools by session" in warnings[0]


async def test_an_undecided_pool_with_startup_options_stays_and_warns(
    database_url: str, app_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Startup options are refused in transaction-pooler mode: a pooler that lets them through
    keeps the pool as it is, with the choice named."""
    if _pgbouncer.binary() is None:
        pytest.skip("Debian's pgbouncer is not installed: apt-get install pgbouncer (.ci/run does)")
    caplog.set_level(logging.WARNING, "fastapi_dbpool")
    settings = "ignore_startup_parameters = options\n"
    with _pgbouncer.running(database_url, settings=settings) as bouncer:
        db = pooled(
            bouncer, app_name, transaction_pooler=None, kwargs={"options": "-c work_mem=64MB"}
        )
        async with db.lifespan(FastAPI()), db.connection() as conn:
            await conn.execute("SET work_mem = '32MB'")  # session mode: not refused
    (warning,) = [r.getMessage() for r in caplog.records if "pooler" in r.getMessage()]
    assert "stays in session mode" in warning
    assert "startup parameter `options`" in warning
    assert "transaction_pooler=True (DBPOOL_TRANSACTION_POOLER=1)" in warning


def test_the_mode_from_the_environment_and_what_it_refuses(pgbouncer: PgBouncer) -> None:
    environ = {"DATABASE_URL": pgbouncer.url, "DBPOOL_TRANSACTION_POOLER": "yes"}
    assert DBPool.from_env(environ)._settings.transaction_pooler is True
    with pytest.raises(ConfigurationError, match=r"DBPOOL_TRANSACTION_POOLER='maybe'.*1/0"):
        DBPool.from_env({**environ, "DBPOOL_TRANSACTION_POOLER": "maybe"})
    with pytest.raises(ConfigurationError, match="startup parameter `options`"):
        DBPool(pgbouncer.url + " options='-c search_path=x'", transaction_pooler=True)
    with pytest.raises(ConfigurationError, match="startup parameter `options`"):
        DBPool(pgbouncer.url, transaction_pooler=True, kwargs={"options": "-c work_mem=64MB"})


def counter_app(db: DBPool) -> FastAPI:
    app = FastAPI(lifespan=db.lifespan)

    @app.get("/add/{n}")
    async def add(n: int, conn: ConnectionDep) -> int:
        row = await (await conn.execute("SELECT %s::int + 1", [n])).fetchone()
        assert row is not None
        return int(row[0])

    @app.post("/tx/{n}")
    async def tx(n: int, tx: TransactionDep) -> int:
        await tx.execute("SELECT %s::int", [n])
        row = await (await tx.execute("SELECT %s::int * 2", [n])).fetchone()
        assert row is not None
        return int(row[0])

    return app


async def test_300_concurrent_requests_meet_no_prepared_statement(
    app_name: str, pgbouncer: PgBouncer
) -> None:
    async def statuses(db: DBPool) -> list[int]:
        async with serve(counter_app(db), db) as client:
            answers = await asyncio.gather(
                *(client.get(f"/add/{i}") if i % 2 else client.post(f"/tx/{i}") for i in range(300))
            )
        return [a.status_code for a in answers]

    # psycopg's default (prepare after 5 runs) is what users hit without the mode
    without = await statuses(pooled(pgbouncer, app_name + "_x", transaction_pooler=False))
    assert without.count(500) > 0
    assert await statuses(pooled(pgbouncer, app_name)) == [200] * 300


def deadline_app(db: DBPool) -> FastAPI:
    app = FastAPI(lifespan=db.lifespan)

    @app.get("/tx-timeout", dependencies=[deadline(1.1)])
    async def tx_timeout(tx: TransactionDep) -> str:
        row = await (await tx.execute("SHOW statement_timeout")).fetchone()
        assert row is not None
        return str(row["statement_timeout"])

    @app.get("/own-tx-timeout", dependencies=[deadline(1.1)])
    async def own_tx_timeout(conn: ConnectionDep) -> str:
        async with conn.transaction():
            row = await (await conn.execute("SHOW statement_timeout")).fetchone()
        assert row is not None
        return str(row["statement_timeout"])

    @app.get("/timeout", dependencies=[deadline(1.1)])
    async def autocommit_timeout(conn: ConnectionDep) -> str:
        row = await (await conn.execute("SHOW statement_timeout")).fetchone()
        assert row is not None
        return str(row["statement_timeout"])

    app.add_middleware(CancellationMiddleware, timeout=10)
    return app


async def test_deadlines_never_reach_another_clients_session(
    app_name: str, pgbouncer: PgBouncer
) -> None:
    # dict rows: the package's own statements must not depend on the user's row factory
    db = pooled(pgbouncer, app_name, kwargs={"row_factory": dict_row})
    with plain_client(pgbouncer) as other:
        before = other.execute("SHOW statement_timeout").fetchone()
        assert before == ("0",)
        async with serve(deadline_app(db), db) as client:
            for _ in range(10):  # 200 requests, 20 at a time
                answers = await asyncio.gather(
                    *(client.get(p) for p in ("/tx-timeout", "/own-tx-timeout", "/timeout") * 7)
                )
                by_path: dict[str, set[str]] = {}
                for a in answers:
                    assert a.status_code == 200, a.text
                    by_path.setdefault(a.request.url.path, set()).add(a.json())
                # in a transaction: the deadline, as a timeout local to it (~1.2 s)
                for path in ("/tx-timeout", "/own-tx-timeout"):
                    for shown in by_path[path]:
                        assert shown.endswith("ms"), shown
                        assert 0 < int(shown[:-2]) <= 1200, shown
                assert by_path["/timeout"] == {"0"}  # autocommit: no session SET
            async with db.connection() as conn:  # outside requests: the server's own
                setting = await (await conn.execute("SHOW statement_timeout")).fetchone()
                assert setting == {"statement_timeout": "0"}
        for _ in range(12):
            assert other.execute("SHOW statement_timeout").fetchone() == ("0",)
        # longer than every deadline above: a leaked timeout raises QueryCanceled here
        # (pg_sleep follows the wall clock, so its duration is no proof either way)
        assert other.execute("SELECT 1 FROM pg_sleep(1.5)").fetchone() == (1,)


async def test_the_guarantees_hold_through_the_pooler(
    database_url: str, app_name: str, pgbouncer: PgBouncer, server: Server
) -> None:
    table = f"items_{app_name}"
    server.query(f"CREATE TABLE {table} (name text)")
    db = pooled(pgbouncer, app_name, max_size=2, acquire_timeout=0.3)
    app = FastAPI(lifespan=db.lifespan)

    @app.post("/items/{name}")
    async def create(name: str, tx: TransactionDep) -> None:
        await tx.execute(f"INSERT INTO {table} VALUES (%s)", [name])

    @app.post("/refused/{name}")
    async def refused(name: str, tx: TransactionDep) -> None:
        await tx.execute(f"INSERT INTO {table} VALUES (%s)", [name])
        raise HTTPException(409)

    @app.post("/slow/{name}", dependencies=[deadline(0.5)])
    async def slow(name: str, tx: TransactionDep) -> None:
        await tx.execute(f"INSERT INTO {table} VALUES (%s)", [name])
        await tx.execute(f"SELECT pg_sleep(30), '{app_name}'")

    @app.get("/slow-autocommit", dependencies=[deadline(0.5)])
    async def slow_autocommit(conn: ConnectionDep) -> None:
        await conn.execute(f"SELECT pg_sleep(30), '{app_name}'")

    @app.get("/hold")
    async def hold(conn: ConnectionDep) -> None:
        await conn.execute("SELECT pg_sleep(1)")

    @app.get("/ping")
    async def ping(conn: ConnectionDep) -> int:
        row = await (await conn.execute("SELECT 1")).fetchone()
        assert row is not None
        return int(row[0])

    app.add_middleware(CancellationMiddleware, timeout=10)

    def names() -> list[str]:
        return sorted(r[0] for r in server.query(f"SELECT name FROM {table}"))

    def sleeping() -> list[tuple[Any, ...]]:
        return server.query(
            "SELECT pid FROM pg_stat_activity WHERE state = 'active' AND query LIKE %s "
            "AND pid <> pg_backend_pid()",
            f"%pg_sleep(30), '{app_name}'%",
        )

    async with serve(app, db) as client:
        assert (await client.post("/items/kept")).status_code == 200
        assert names() == ["kept"]  # committed before the response
        assert (await client.post("/refused/lost")).status_code == 409
        started = time.monotonic()
        assert (await client.post("/slow/cut")).status_code == 504
        assert time.monotonic() - started < 3
        for _ in range(50):  # the server-side cancel went through the pooler
            if not sleeping():
                break
            await asyncio.sleep(0.05)
        assert sleeping() == []
        assert names() == ["kept"]
        # an autocommit statement has no statement_timeout here: the middleware's cancel cuts it
        assert (await client.get("/slow-autocommit")).status_code == 504
        for _ in range(50):
            if not sleeping():
                break
            await asyncio.sleep(0.05)
        assert sleeping() == []

        holders = [asyncio.create_task(client.get("/hold")) for _ in range(2)]
        await asyncio.sleep(0.2)
        assert (await client.get("/ping")).status_code == 503
        assert [(await h).status_code for h in holders] == [200, 200]

        # the pooler drops every client connection: the pool replaces its dead ones
        pgbouncer.admin("KILL postgres")
        pgbouncer.admin("RESUME postgres")
        assert (await client.get("/ping")).json() == 1
        for _ in range(40):  # psycopg_pool's own return (no fast path) goes through a task
            stats = db.stats()
            if stats.pool_available == stats.pool_size:
                break
            await asyncio.sleep(0.05)
        assert stats.pool_available == stats.pool_size  # every slot back in the pool
    # nothing left running or in a transaction on the server, by PgBouncer and by PostgreSQL
    assert pgbouncer.pool("postgres")["sv_active"] == 0
    assert server.query(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND state IN ('active', 'idle in transaction') AND pid <> pg_backend_pid()"
    ) == [(0,)]
    server.query(f"DROP TABLE {table}")


async def test_session_statements_are_refused_with_the_alternative(
    app_name: str, pgbouncer: PgBouncer
) -> None:
    db = pooled(pgbouncer, app_name, max_size=2)
    async with db.lifespan(FastAPI()), db.connection() as conn:
        refused = {
            "SET search_path TO elsewhere": "SET LOCAL",
            "  /* a comment */ set statement_timeout = 5": "SET LOCAL",
            "SET SESSION work_mem = '64MB'": "ALTER ROLE",
            "LISTEN jobs": "directly",
            "PREPARE q AS SELECT 1": "prepared statements",
            "SELECT pg_advisory_lock(42)": "pg_advisory_xact_lock",
            "SELECT pg_try_advisory_lock_shared(42)": "pg_advisory_xact_lock",
            "SELECT pg_advisory_unlock_all()": "pg_advisory_xact_lock",
        }
        for statement, fix in refused.items():
            with pytest.raises(SessionStateError, match=fix):
                await conn.execute(statement)
        with pytest.raises(SessionStateError):
            await conn.cursor().executemany("SET search_path TO elsewhere", [()])
        # what works: state local to a transaction, on the backend running it
        async with conn.transaction():
            await conn.execute("SET LOCAL search_path TO elsewhere")
            assert await (await conn.execute("SHOW search_path")).fetchone() == ("elsewhere",)
            locked = await conn.execute("SELECT pg_try_advisory_xact_lock(42)")
            assert await locked.fetchone() == (True,)
    with plain_client(pgbouncer) as other:
        for _ in range(8):
            assert other.execute("SHOW search_path").fetchone() == ('"$user", public',)
        assert other.execute("SELECT pg_try_advisory_lock(42)").fetchone() == (True,)
        other.execute("SELECT pg_advisory_unlock(42)")


async def test_an_isolation_level_set_on_the_connection_survives_the_deadline(
    app_name: str, pgbouncer: PgBouncer
) -> None:
    async def serializable(conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.set_isolation_level(psycopg.IsolationLevel.SERIALIZABLE)

    db = pooled(pgbouncer, app_name, configure=serializable)
    app = FastAPI(lifespan=db.lifespan)

    @app.get("/isolation", dependencies=[deadline(2)])
    async def isolation(tx: TransactionDep) -> list[str]:
        shown = []
        for setting in ("transaction_isolation", "statement_timeout"):
            row = await (await tx.execute(f"SHOW {setting}")).fetchone()
            assert row is not None
            shown.append(str(row[0]))
        return shown

    app.add_middleware(CancellationMiddleware, timeout=10)
    async with serve(app, db) as client:
        level, timeout = (await client.get("/isolation")).json()
    assert level == "serializable"  # in the BEGIN, before the deadline's set_config
    assert timeout != "0"
