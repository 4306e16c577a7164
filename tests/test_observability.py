"""OpenTelemetry metrics, route attribution and structured logs, from a real pool: the
figures of db.stats(), Prometheus and OpenTelemetry agree after the same traffic."""

import asyncio
import json
import logging
import time
from typing import Any

import pytest
from fastapi import FastAPI
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from psycopg.conninfo import make_conninfo

from fastapi_dbpool import CancellationMiddleware, ConnectionDep, DBPool, otel
from fastapi_dbpool._metrics import WAIT_BUCKETS
from fastapi_dbpool.errors import ConfigurationError
from fastapi_dbpool.prometheus import DBPoolCollector

from .conftest import make_db, serve

pytestmark = pytest.mark.anyio


def routes_app(db: DBPool, slow: float = 0.6) -> FastAPI:
    app = FastAPI()
    app.add_middleware(CancellationMiddleware, timeout_header="X-Request-Timeout")

    @app.get("/items/{item_id}")
    async def item(item_id: int, conn: ConnectionDep) -> int:
        row = await (await conn.execute("SELECT %s::int", (item_id,))).fetchone()
        assert row is not None
        return int(row[0])

    @app.get("/report")
    async def report(conn: ConnectionDep) -> None:
        await conn.execute("SELECT pg_sleep(%s)", (slow,))

    @app.get("/stall")
    async def stall() -> None:
        time.sleep(0.3)  # noqa: ASYNC251 (the loop stall the watchdog must report)

    return app


def _otel(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    data = reader.get_metrics_data()
    assert data is not None
    return {
        m.name: list(m.data.data_points)
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    }


def _prometheus(db: DBPool) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    registry = CollectorRegistry()
    registry.register(DBPoolCollector(db))
    text = generate_latest(registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def _cumulative(point: HistogramDataPoint) -> list[int]:
    total, out = 0, []
    for count in point.bucket_counts[:-1]:
        total += count
        out.append(total)
    return out


async def test_otel_prometheus_and_stats_agree_after_the_same_traffic(
    database_url: str, app_name: str
) -> None:
    reader = InMemoryMetricReader()
    db = make_db(database_url, app_name, min_size=1, max_size=1, acquire_timeout=0.3)
    otel.instrument(db, meter_provider=MeterProvider(metric_readers=[reader]))
    with pytest.raises(ConfigurationError, match="once"):
        otel.instrument(db, meter_provider=MeterProvider())
    async with serve(routes_app(db), db) as client:
        for n in range(5):
            assert (await client.get(f"/items/{n}")).json() == n
        # /report holds the only connection: one checkout gets 503, one its deadline (504)
        holder = asyncio.create_task(client.get("/report"))
        async with asyncio.timeout(5):
            while not db.stats().holders:
                await asyncio.sleep(0.01)
        assert [(h.route, h.connections) for h in db.stats().holders] == [("/report", 1)]
        assert (await client.get("/items/7")).status_code == 503
        cut = await client.get("/items/8", headers={"X-Request-Timeout": "0.1"})
        assert cut.status_code == 504
        assert (await holder).status_code == 200
        # a request cut mid-query by its deadline, and a handler that blocks the loop
        cut = await client.get("/report", headers={"X-Request-Timeout": "0.2"})
        assert cut.status_code == 504
        assert (await client.get("/stall")).status_code == 200
        async with asyncio.timeout(5):
            while db.stats().loop_stalls < 1:
                await asyncio.sleep(0.01)

        stats = db.stats()
        points = _otel(reader)
        prom = _prometheus(db)

    pool = {"db.client.connection.pool.name": app_name}
    # the figures of the known traffic
    assert set(stats.routes) == {"/items/{item_id}", "/report"}  # templates, not raw paths
    items, report = stats.routes["/items/{item_id}"], stats.routes["/report"]
    assert (items.checkouts, items.returns, report.checkouts, report.returns) == (5, 5, 2, 2)
    assert report.use_seconds >= 0.6 + 0.2 > items.use_seconds
    assert (stats.exhausted, stats.deadline_exceeded, stats.timeouts) == (1, 1, 2)
    assert (stats.cancelled_requests, stats.loop_stalls) == (1, 1)
    assert stats.checkouts == 7 == stats.returns
    assert stats.connections_created >= 1
    assert stats.holders == ()  # nothing held once the requests are done

    # OpenTelemetry: the gauges and the counter
    def value(name: str, **attributes: str) -> float:
        (point,) = [p for p in points[name] if dict(p.attributes) == {**pool, **attributes}]
        return float(point.value)

    assert value("db.client.connection.count", **{"db.client.connection.state": "idle"}) + value(
        "db.client.connection.count", **{"db.client.connection.state": "used"}
    ) == float(stats.pool_size)
    assert value("db.client.connection.max") == stats.pool_max == 1
    assert value("db.client.connection.idle.max") == 1
    assert value("db.client.connection.idle.min") == stats.pool_min == 1
    assert value("db.client.connection.pending_requests") == stats.requests_waiting == 0
    assert value("db.client.connection.timeouts") == stats.timeouts == 2

    # OpenTelemetry's histograms, per route, against db.stats() and Prometheus
    for route, r in stats.routes.items():
        labels = frozenset({("pool", app_name), ("route", route)})
        for name, metric, count, total, buckets in [
            ("wait_time", "acquire_wait_seconds", r.checkouts, r.wait_seconds, r.wait_buckets),
            ("use_time", "connection_use_seconds", r.returns, r.use_seconds, r.use_buckets),
        ]:
            (point,) = [
                p
                for p in points[f"db.client.connection.{name}"]
                if dict(p.attributes) == {**pool, "http.route": route}
            ]
            assert point.count == count
            assert point.sum == pytest.approx(total)
            assert list(point.explicit_bounds) == list(WAIT_BUCKETS)
            assert _cumulative(point) == [n for _, n in buckets]
            assert prom[f"fastapi_dbpool_{metric}_count", labels] == count
            assert prom[f"fastapi_dbpool_{metric}_sum", labels] == pytest.approx(total)

    # every other figure of the Prometheus collector, in OpenTelemetry with the same value
    def prometheus(name: str, **labels: str) -> float:
        return prom[f"fastapi_dbpool_{name}", frozenset({("pool", app_name), *labels.items()})]

    idle = value("db.client.connection.count", **{"db.client.connection.state": "idle"})
    same = {
        "pool_min_connections": value("db.client.connection.idle.min"),
        "pool_max_connections": value("db.client.connection.max"),
        "pool_available_connections": idle,
        "pool_waiting_requests": value("db.client.connection.pending_requests"),
        "timeouts_total": value("db.client.connection.timeouts"),
        "exhausted_total": value("fastapi_dbpool.pool.exhausted"),
        "deadline_exceeded_total": value("fastapi_dbpool.pool.deadline_exceeded"),
        "cancelled_requests_total": value("fastapi_dbpool.requests.cancelled"),
        "discarded_connections_total": value("fastapi_dbpool.connection.discarded"),
        "connection_errors_total": value("fastapi_dbpool.connection.errors"),
        "loop_stalls_total": value("fastapi_dbpool.loop.stalls"),
        "loop_worst_lag_seconds": value("fastapi_dbpool.loop.worst_lag"),
    }
    for name, figure in same.items():
        assert prometheus(name) == figure, name
    assert same["loop_worst_lag_seconds"] == stats.worst_loop_lag_seconds >= 0.25
    for point in points["fastapi_dbpool.connection.failures"]:
        cause = point.attributes["error.type"]
        assert prometheus("connection_failures_total", cause=cause) == point.value == 0
    # a replica's lag: not a replica, absent from both
    assert "fastapi_dbpool.replica.lag" not in points
    assert not [key for key in prom if key[0] == "fastapi_dbpool_replica_lag_seconds"]
    (created,) = points["db.client.connection.create_time"]
    assert created.count == stats.connections_created
    assert created.sum == pytest.approx(stats.create_seconds)
    labels = frozenset({("pool", app_name)})
    assert prom["fastapi_dbpool_connection_create_seconds_count", labels] == created.count
    assert prom["fastapi_dbpool_timeouts_total", labels] == stats.timeouts


async def test_the_exhaustion_warning_names_the_route_that_holds_the_pool(
    database_url: str, app_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A slow route and a fast one under load: the pool runs dry, and the warning (and
    db.stats() meanwhile) names the slow route as the holder."""
    db = make_db(database_url, app_name, min_size=2, max_size=2, acquire_timeout=0.2)
    caplog.set_level(logging.WARNING, "fastapi_dbpool")
    async with serve(routes_app(db, slow=1.0), db) as client:
        slow = [asyncio.create_task(client.get("/report")) for _ in range(2)]
        async with asyncio.timeout(5):
            while sum(h.connections for h in db.stats().holders) < 2:
                await asyncio.sleep(0.01)
        (holder,) = db.stats().holders
        assert (holder.route, holder.connections) == ("/report", 2)
        fast = await asyncio.gather(*(client.get(f"/items/{n}") for n in range(6)))
        assert {r.status_code for r in fast} == {503}
        assert {r.status_code for r in await asyncio.gather(*slow)} == {200}
        assert (await client.get("/items/1")).status_code == 200  # served again once freed

    (record,) = [r for r in caplog.records if getattr(r, "dbpool_event", None) == "exhausted"]
    assert "held by: /report (2, longest" in record.getMessage()
    holders = record.dbpool_holders  # type: ignore[attr-defined]
    assert [(h["route"], h["connections"]) for h in holders] == [("/report", 2)]
    assert holders[0]["longest_seconds"] >= 0.2


class JSONFormatter(logging.Formatter):
    """What python-json-logger does: the message, and every attribute a record was given
    through ``extra=``, as one JSON object."""

    _STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        out = {"message": record.getMessage(), "level": record.levelname}
        out.update({k: v for k, v in vars(record).items() if k not in self._STANDARD})
        return json.dumps(out, default=str)


async def test_log_records_carry_their_figures_as_fields(database_url: str, app_name: str) -> None:
    secret = "hunter2-not-in-any-log"
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Collect()
    handler.setFormatter(JSONFormatter())
    logger = logging.getLogger("fastapi_dbpool")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        url = make_conninfo(database_url, password=secret)  # trust auth: accepted, ignored
        db = make_db(url, app_name, min_size=1, max_size=1, acquire_timeout=0.2, watchdog=0.1)
        async with serve(routes_app(db), db) as client:
            holder = asyncio.create_task(client.get("/report"))
            async with asyncio.timeout(5):
                while not db.stats().holders:
                    await asyncio.sleep(0.01)
            assert (await client.get("/items/1")).status_code == 503
            assert (await holder).status_code == 200
            assert (await client.get("/stall")).status_code == 200
            async with asyncio.timeout(5):
                while db.stats().loop_stalls < 1:
                    await asyncio.sleep(0.01)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)

    assert not [line for line in lines if secret in line]
    records = [json.loads(line) for line in lines]
    assert all(r["dbpool_pool"] == app_name for r in records)
    by_event = {r["dbpool_event"]: r for r in records}
    assert {"pool_open", "exhausted", "loop_stall", "pool_closed"} <= set(by_event)
    opened = by_event["pool_open"]
    assert opened["dbpool_stats"]["pool_max"] == 1
    assert "password" not in opened["dbpool_target"]
    exhausted = by_event["exhausted"]
    assert exhausted["dbpool_stats"]["pool_size"] == 1
    assert exhausted["dbpool_holders"][0]["route"] == "/report"
    assert exhausted["level"] == "WARNING"
    stall = by_event["loop_stall"]
    assert stall["dbpool_file"] == __file__
    assert stall["dbpool_line"] > 0
    assert stall["dbpool_lag_seconds"] >= 0.25


async def test_histograms_left_out_cost_requests_nothing(database_url: str, app_name: str) -> None:
    """otel.instrument(histograms=False): the gauges and counters, read at collection, and
    nothing recorded on the request path."""
    reader = InMemoryMetricReader()
    db = make_db(database_url, app_name, min_size=1, max_size=2)
    otel.instrument(db, meter_provider=MeterProvider(metric_readers=[reader]), histograms=False)
    assert db._observers == []  # the request path has nothing to tell
    async with serve(routes_app(db), db) as client:
        assert (await client.get("/items/3")).json() == 3
        points = _otel(reader)
    assert not {n for n in points if n.endswith("_time")}
    (max_size,) = points["db.client.connection.max"]
    assert max_size.value == 2
    with pytest.raises(ConfigurationError, match="once"):
        otel.instrument(db, meter_provider=MeterProvider())


async def test_a_failing_observer_fails_no_request_and_leaks_nothing(
    database_url: str, app_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The histograms' observer runs on the request path: if it raised, the checkout or
    the return would fail with it, and the return's cleanup would be skipped."""

    class Broken:
        def waited(self, pool: str, route: str | None, seconds: float) -> None:
            raise RuntimeError("exporter gone")

        held = waited

        def created(self, pool: str, seconds: float) -> None:
            raise RuntimeError("exporter gone")

    db = make_db(database_url, app_name, min_size=1, max_size=1)
    db._observers.append(Broken())
    caplog.set_level(logging.WARNING, "fastapi_dbpool")
    async with serve(routes_app(db), db) as client:
        for n in range(3):  # one connection: each request needs the previous one's back
            assert (await client.get(f"/items/{n}")).json() == n
        for _ in range(40):  # without the direct return, psycopg_pool's task puts it back
            stats = db.stats()
            if stats.pool_available == 1:
                break
            await asyncio.sleep(0.05)
        assert (stats.checkouts, stats.returns, stats.pool_available) == (3, 3, 1)
    failed = [r for r in caplog.records if getattr(r, "dbpool_event", None) == "observer_failed"]
    assert len(failed) >= 6  # waited and held, per request
    assert "exporter gone" in failed[0].getMessage()
