"""db.stats() and the Prometheus exposition count what happened, from a real pool."""

import asyncio
import collections
import contextlib
import dataclasses
import json
import time

import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from fastapi_dbpool import (
    CancellationMiddleware,
    ConnectionDep,
    DBPool,
    PoolNotRunningError,
    PoolStats,
)
from fastapi_dbpool.prometheus import DBPoolCollector, metrics_router

from .conftest import make_db, serve

pytestmark = pytest.mark.anyio


def busy_app(db: DBPool) -> FastAPI:
    app = FastAPI()
    app.add_middleware(CancellationMiddleware, timeout_header="X-Request-Timeout")

    @app.get("/query")
    async def query(conn: ConnectionDep) -> None:
        await conn.execute("SELECT 1")

    @app.get("/sleep")
    async def sleep(conn: ConnectionDep) -> None:
        await conn.execute("SELECT pg_sleep(1)")

    @app.get("/suicide")
    async def suicide(conn: ConnectionDep) -> None:
        # the connection breaks: it must be discarded, not returned
        with contextlib.suppress(Exception):
            await conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")

    @app.get("/stats")
    async def stats():  # type: ignore[no-untyped-def]  # as a user writes it, no annotation
        return db.stats()

    @app.get("/stats/typed")
    async def typed_stats() -> PoolStats:
        return db.stats()

    @app.get("/block")
    async def block() -> None:
        time.sleep(0.3)  # noqa: ASYNC251 (a stall for the watchdog to count)

    registry = CollectorRegistry()
    registry.register(DBPoolCollector(db))
    app.include_router(metrics_router(registry))
    return app


async def test_stats_and_prometheus_count_what_happened(database_url: str, app_name: str) -> None:
    db = make_db(database_url, app_name, min_size=1, max_size=1, acquire_timeout=0.2)
    async with serve(busy_app(db), db) as client:
        for _ in range(5):
            assert (await client.get("/query")).status_code == 200
        # one request holds the only connection: one 503, one deadline while waiting
        holder = asyncio.create_task(client.get("/sleep"))
        await asyncio.sleep(0.1)
        assert (await client.get("/query")).status_code == 503
        cut = await client.get("/query", headers={"X-Request-Timeout": "0.1"})
        assert cut.status_code == 504
        assert (await holder).status_code == 200
        # a request cut by its deadline mid-query
        assert (await client.get("/sleep", headers={"X-Request-Timeout": "0.2"})).status_code == 504
        assert (await client.get("/suicide")).status_code == 200
        assert (await client.get("/block")).status_code == 200
        await asyncio.sleep(0.1)

        stats = db.stats()
        assert stats.name == app_name
        assert stats.checkouts == 5 + 1 + 1 + 1  # /query x5, /sleep x2, /suicide
        assert stats.exhausted == 1
        assert stats.deadline_exceeded == 1
        assert stats.cancelled_requests == 1  # the 504 mid-query; the other was the pool's
        assert stats.discarded_on_release == 1
        assert stats.loop_stalls == 1
        assert stats.worst_loop_lag_seconds >= 0.25
        assert stats.acquire_wait_buckets[-1] == (5.0, stats.checkouts)  # +Inf is checkouts
        assert stats.pool_max == 1
        # what a route returns, as FastAPI serialises it by default
        expected = json.loads(json.dumps(dataclasses.asdict(stats)))
        for path in ("/stats", "/stats/typed"):
            served = await client.get(path)
            assert served.status_code == 200, served.text
            assert served.json() == expected

        text = (await client.get("/metrics")).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    value: dict[tuple[str, str | None], float] = collections.defaultdict(float)
    for sample in (s for f in families.values() for s in f.samples):  # summed over routes
        value[sample.name, sample.labels.get("le")] += sample.value
    for sample in (s for f in families.values() for s in f.samples):
        assert sample.labels["pool"] == app_name
    assert value["fastapi_dbpool_exhausted_total", None] == 1
    assert value["fastapi_dbpool_deadline_exceeded_total", None] == 1
    assert value["fastapi_dbpool_cancelled_requests_total", None] == 1
    assert value["fastapi_dbpool_discarded_connections_total", None] == 1
    assert value["fastapi_dbpool_loop_stalls_total", None] == 1
    assert value["fastapi_dbpool_acquire_wait_seconds_count", None] == stats.checkouts
    assert value["fastapi_dbpool_acquire_wait_seconds_bucket", "+Inf"] == stats.checkouts
    assert value["fastapi_dbpool_pool_max_connections", None] == 1
    assert families["fastapi_dbpool_acquire_wait_seconds"].type == "histogram"
    assert families["fastapi_dbpool_pool_available_connections"].type == "gauge"
    with pytest.raises(PoolNotRunningError):
        db.stats()
    assert "postgres" not in text


async def test_a_deadline_that_runs_out_in_the_pool_is_counted_once(
    database_url: str, app_name: str
) -> None:
    """When the loop is late, the pool's wait and the middleware's deadline come due in the
    same turn: the request was counted both as a deadline in the pool and as cut."""
    db = make_db(database_url, app_name, min_size=1, max_size=1, acquire_timeout=5)
    async with serve(busy_app(db), db) as client:
        holder = asyncio.create_task(client.get("/sleep"))
        await asyncio.sleep(0.1)
        cut = asyncio.create_task(client.get("/query", headers={"X-Request-Timeout": "0.1"}))
        async with asyncio.timeout(5):
            while db.stats().requests_waiting < 1:
                await asyncio.sleep(0.005)
        time.sleep(0.2)  # noqa: ASYNC251 (the loop is late: both are due at once)
        assert (await cut).status_code == 504
        assert (await holder).status_code == 200
        stats = db.stats()
        assert (stats.deadline_exceeded, stats.cancelled_requests) == (1, 0)
