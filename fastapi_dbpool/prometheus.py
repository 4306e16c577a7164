"""Prometheus metrics for a `DBPool` (install ``fastapi_dbpool[prometheus]``).

::

    from prometheus_client import CollectorRegistry
    from fastapi_dbpool.prometheus import DBPoolCollector, metrics_router

    registry = CollectorRegistry()
    registry.register(DBPoolCollector(db))
    app.include_router(metrics_router(registry))  # GET /metrics

Every metric carries a ``pool`` label (the pool's name); ``DBPoolCollector(db, replica)``
reports several pools. Nothing is reported of a pool that is not running. Collection
only reads tallies: it may run in any thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from fastapi import APIRouter, Request, Response

try:
    from prometheus_client import REGISTRY, CollectorRegistry
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.exposition import choose_encoder
    from prometheus_client.registry import Collector
except ImportError as ex:  # pragma: no cover - depends on the environment
    raise ImportError(
        "fastapi_dbpool.prometheus needs prometheus-client: "
        "pip install 'fastapi_dbpool[prometheus]'"
    ) from ex

from ._connect_errors import CAUSES
from ._dbpool import DBPool
from ._metrics import PoolStats, RouteStats
from .errors import ConfigurationError

__all__ = ["DBPoolCollector", "metrics_router"]

Buckets = tuple[tuple[float, int], ...]

_PREFIX = "fastapi_dbpool_"


class DBPoolCollector(Collector):
    """Exposes `DBPool.stats()` of each pool at each scrape, in Prometheus' conventions.

    ``DBPoolCollector(primary, replica)``: one collector for all the app's pools, each
    metric labelled by pool (two collectors would repeat each metric family).
    """

    def __init__(self, *dbs: DBPool) -> None:
        if not dbs or len({db.name for db in dbs}) != len(dbs):
            raise ConfigurationError(
                "DBPoolCollector takes one or more DBPools, each of its own name=."
            )
        self.dbs = dbs

    def collect(self) -> Iterator[Metric]:
        running = [(db, db._runtime) for db in self.dbs]
        all_stats = [db._snapshot(runtime) for db, runtime in running if runtime is not None]
        if not all_stats:
            return

        def gauge(name: str, doc: str, value: Callable[[PoolStats], float | None]) -> Metric:
            family = GaugeMetricFamily(_PREFIX + name, doc, labels=["pool"])
            for stats in all_stats:
                figure = value(stats)
                if figure is not None:
                    family.add_metric([stats.name], figure)
            return family

        def counter(name: str, doc: str, value: Callable[[PoolStats], float]) -> Metric:
            family = CounterMetricFamily(_PREFIX + name, doc, labels=["pool"])
            for stats in all_stats:
                family.add_metric([stats.name], value(stats))
            return family

        yield gauge("pool_min_connections", "min_size of the pool.", lambda s: s.pool_min)
        yield gauge("pool_max_connections", "max_size of the pool.", lambda s: s.pool_max)
        yield gauge("pool_connections", "Connections open, in use or idle.",
                    lambda s: s.pool_size)  # fmt: skip
        yield gauge("pool_available_connections", "Idle connections.",
                    lambda s: s.pool_available)  # fmt: skip
        yield gauge("pool_waiting_requests", "Requests waiting for a connection.",
                    lambda s: s.requests_waiting)  # fmt: skip

        def histogram(
            name: str,
            doc: str,
            figures: Callable[[PoolStats], Iterator[tuple[list[str], Buckets, int, float]]],
            labels: tuple[str, ...] = ("pool",),
        ) -> Metric:
            family = HistogramMetricFamily(_PREFIX + name, doc, labels=list(labels))
            for stats in all_stats:
                for values, buckets, count, total in figures(stats):
                    family.add_metric(
                        values,
                        [(repr(b), float(n)) for b, n in buckets] + [("+Inf", float(count))],
                        sum_value=total,
                    )
            return family

        def per_route(
            figures: Callable[[RouteStats], tuple[Buckets, int, float]],
        ) -> Callable[[PoolStats], Iterator[tuple[list[str], Buckets, int, float]]]:
            def rows(s: PoolStats) -> Iterator[tuple[list[str], Buckets, int, float]]:
                for route, r in s.routes.items():
                    yield ([s.name, route], *figures(r))

            return rows

        yield histogram("acquire_wait_seconds",
                        "Time a checkout waited for a connection, by route template.",
                        per_route(lambda r: (r.wait_buckets, r.checkouts, r.wait_seconds)),
                        ("pool", "route"))  # fmt: skip
        yield histogram("connection_use_seconds",
                        "Time a connection was held, from checkout to return, by route template.",
                        per_route(lambda r: (r.use_buckets, r.returns, r.use_seconds)),
                        ("pool", "route"))  # fmt: skip
        yield histogram(
            "connection_create_seconds",
            "Time it took to open a new connection.",
            lambda s: iter([([s.name], s.create_buckets, s.connections_created, s.create_seconds)]),
        )
        yield counter("timeouts", "Checkouts that got no connection in time (503 or 504).",
                      lambda s: s.timeouts)  # fmt: skip
        yield counter("exhausted", "Requests answered 503: no connection in time.",
                      lambda s: s.exhausted)  # fmt: skip
        yield counter("deadline_exceeded", "Checkouts cut by the request's deadline (504).",
                      lambda s: s.deadline_exceeded)  # fmt: skip
        yield counter("cancelled_requests", "Requests cut by CancellationMiddleware.",
                      lambda s: s.cancelled_requests)  # fmt: skip
        yield counter("discarded_connections", "Connections closed instead of returned.",
                      lambda s: s.discarded_on_release)  # fmt: skip
        yield counter("connection_errors", "Failed attempts to open a connection.",
                      lambda s: s.connection_errors)  # fmt: skip
        yield counter("cancel_failures", "Cancel requests that could not be delivered (the "
                      "server stopped answering).", lambda s: s.cancel_failures)  # fmt: skip
        yield counter("connections_lost", "Connections that broke under a statement (503).",
                      lambda s: s.connections_lost)  # fmt: skip
        by_cause = CounterMetricFamily(
            _PREFIX + "connection_failures",
            "Failed attempts to open a connection, by cause (the package's count).",
            labels=["pool", "cause"],
        )
        for stats in all_stats:
            for cause in CAUSES:
                by_cause.add_metric(
                    [stats.name, cause], stats.connection_errors_by_cause.get(cause, 0)
                )
        yield by_cause
        yield counter("loop_stalls", "Times the event loop was blocked past the watchdog's "
                      "threshold.", lambda s: s.loop_stalls)  # fmt: skip
        yield gauge("loop_worst_lag_seconds", "Longest event-loop stall seen.",
                    lambda s: s.worst_loop_lag_seconds)  # fmt: skip
        yield gauge("replica_lag_seconds", "A read replica's lag, as last measured by "
                    "ReadReplicas (absent while unknown).",
                    lambda s: s.replica_lag_seconds)  # fmt: skip


def metrics_router(registry: CollectorRegistry = REGISTRY, path: str = "/metrics") -> APIRouter:
    """``GET /metrics``: `registry` in Prometheus's text format (or OpenMetrics, if asked).

    ``app.include_router(metrics_router(registry))``. prometheus_client's ASGI app, mounted
    with ``app.mount("/metrics", ...)``, answers ``/metrics`` with a 307 to ``/metrics/``,
    which scrapers configured for ``/metrics`` do not all follow. Kept out of the OpenAPI
    schema; the endpoint is a plain ``def``, run in a worker thread, as collection may be.
    """
    router = APIRouter()

    @router.get(path, include_in_schema=False)
    def metrics(request: Request) -> Response:
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encoder(registry), media_type=content_type)

    return router
