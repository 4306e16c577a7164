"""The apps under benchmark, as uvicorn factories (``uvicorn --factory benchmarks._apps:NAME``).

Each serves the same endpoints on the database in ``DATABASE_URL``, with a pool of
`POOL_SIZE`: ``/select/{id}`` (one indexed SELECT), ``/tx/{id}`` (a transaction of an
INSERT and a SELECT) and ``/nodb`` (no database: the framework's ceiling).
"""

from __future__ import annotations

import os
from typing import Any

import anyio
from fastapi import FastAPI

import fastapi_dbpool as _package
from fastapi_dbpool import CancellationMiddleware, ConnectionDep, DBPool, TransactionDep

POOL_SIZE = 8
#: The endpoints' statements, less their parameter (each driver has its own placeholder)
SELECT = "SELECT id, name FROM bench_items WHERE id = "
INSERT = "INSERT INTO bench_log (item_id) VALUES "
#: The package directory a server must import (benchmarks.instructions --revisions): measuring
#: another copy, found first on the path, would compare a version with itself.
PACKAGE = "BENCH_PACKAGE"
_imported = os.path.dirname(os.path.realpath(_package.__file__))
if os.environ.get(PACKAGE) and _imported != os.path.realpath(os.environ[PACKAGE]):
    raise RuntimeError(f"fastapi_dbpool imported from {_imported}, not from {os.environ[PACKAGE]}")
# The loop watchdog pings the loop 40 times a second whatever the load. Under valgrind
# (benchmarks.instructions) the server runs 50x slower, so those pings would be counted
# 50x per request, and each batch of requests, taking over 0.1 s there, would be reported
# as a stall, with its stack: a cost of the instrument, not of the code.
WATCHDOG = None if os.environ.get("BENCH_WATCHDOG") == "off" else 0.1


#: Where benchmarks.contenders puts the URL of its PgBouncer, when pgbouncer is installed.
PGBOUNCER_URL = "BENCH_PGBOUNCER_URL"


def _fastapi_dbpool(
    url: str | None = None, otel_metrics: bool | None = None, **settings: Any
) -> FastAPI:
    db = DBPool(
        url or os.environ["DATABASE_URL"],
        min_size=POOL_SIZE,
        max_size=POOL_SIZE,
        watchdog=WATCHDOG,
        **settings,
    )
    if otel_metrics is not None:  # True: with its histograms
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader

        from fastapi_dbpool import otel

        provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
        otel.instrument(db, meter_provider=provider, histograms=otel_metrics)
    app = FastAPI(lifespan=db.lifespan)

    @app.get("/select/{item_id}")
    async def select(item_id: int, conn: ConnectionDep) -> Any:
        cur = await conn.execute("SELECT id, name FROM bench_items WHERE id = %s", (item_id,))
        return await cur.fetchone()

    @app.get("/tx/{item_id}")
    async def tx(item_id: int, tx: TransactionDep) -> Any:
        await tx.execute("INSERT INTO bench_log (item_id) VALUES (%s)", (item_id,))
        cur = await tx.execute("SELECT id, name FROM bench_items WHERE id = %s", (item_id,))
        return await cur.fetchone()

    _nodb(app)
    return app


def _nodb(app: FastAPI) -> None:
    @app.get("/nodb")
    async def nodb() -> int:
        return 1


def fastapi_dbpool() -> FastAPI:
    """fastapi_dbpool, without the cancellation middleware."""
    return _fastapi_dbpool()


def fastapi_dbpool_middleware() -> FastAPI:
    """fastapi_dbpool behind CancellationMiddleware (its default 30 s deadline)."""
    app = _fastapi_dbpool()
    app.add_middleware(CancellationMiddleware)
    return app


def fastapi_dbpool_pgbouncer() -> FastAPI:
    """fastapi_dbpool behind CancellationMiddleware, through PgBouncer in transaction mode."""
    app = _fastapi_dbpool(os.environ[PGBOUNCER_URL], transaction_pooler=True)
    app.add_middleware(CancellationMiddleware)
    return app


class _PassThrough:
    """A pure ASGI middleware that does nothing: the cost of a middleware layer as such."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


def fastapi_dbpool_passthrough() -> FastAPI:
    """fastapi_dbpool behind a middleware that does nothing."""
    app = _fastapi_dbpool()
    app.add_middleware(_PassThrough)
    return app


class _ScopeOnly:
    """A pure ASGI middleware that only runs the request in an anyio CancelScope.

    The least that a middleware able to cancel a request the anyio way (so that shielded
    cleanup, the pool's and FastAPI's, stays shielded) must do for every request.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self.cancel_scope: Any = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self.cancel_scope is None:  # as the middleware does: the backend's class, looked up once
            self.cancel_scope = type(anyio.CancelScope())
        with self.cancel_scope():
            await self.app(scope, receive, send)


def fastapi_dbpool_scope_only() -> FastAPI:
    """fastapi_dbpool behind a middleware that only enters an anyio CancelScope."""
    app = _fastapi_dbpool()
    app.add_middleware(_ScopeOnly)
    return app


def fastapi_dbpool_otel() -> FastAPI:
    """fastapi_dbpool with its OpenTelemetry metrics on (the SDK, a reader never read)."""
    return _fastapi_dbpool(otel_metrics=True)


def fastapi_dbpool_otel_no_histograms() -> FastAPI:
    """fastapi_dbpool with its OpenTelemetry gauges and counters only."""
    return _fastapi_dbpool(otel_metrics=False)
