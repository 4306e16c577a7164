"""Prometheus metrics for a `DBPool` (install ``fastapi_dbpool[prometheus]``).

::

    from prometheus_client import CollectorRegistry, make_asgi_app
    from fastapi_dbpool.prometheus import DBPoolCollector

    registry = CollectorRegistry()
    registry.register(DBPoolCollector(db))
    app.mount("/metrics", make_asgi_app(registry))

Every metric carries a ``pool`` label (the pool's name). Nothing is reported while the
pool is not running. Collection only reads tallies: it may run in any thread.
"""

from __future__ import annotations

from collections.abc import Iterator

try:
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.registry import Collector
except ImportError as ex:  # pragma: no cover - depends on the environment
    raise ImportError(
        "fastapi_dbpool.prometheus needs prometheus-client: "
        "pip install 'fastapi_dbpool[prometheus]'"
    ) from ex

from ._connect_errors import CAUSES
from ._lifespan import DBPool

__all__ = ["DBPoolCollector"]

_PREFIX = "fastapi_dbpool_"


class DBPoolCollector(Collector):
    """Exposes `DBPool.stats()` at each scrape, in Prometheus' naming conventions."""

    def __init__(self, db: DBPool) -> None:
        self.db = db

    def collect(self) -> Iterator[Metric]:
        runtime = self.db._runtime
        if runtime is None:
            return
        stats = self.db._snapshot(runtime)
        label = [stats.name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(_PREFIX + name, doc, labels=["pool"])
            family.add_metric(label, value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(_PREFIX + name, doc, labels=["pool"])
            family.add_metric(label, value)
            return family

        yield gauge("pool_min_connections", "min_size of the pool.", stats.pool_min)
        yield gauge("pool_max_connections", "max_size of the pool.", stats.pool_max)
        yield gauge("pool_connections", "Connections open, in use or idle.", stats.pool_size)
        yield gauge("pool_available_connections", "Idle connections.", stats.pool_available)
        yield gauge("pool_waiting_requests", "Requests waiting for a connection.",
                    stats.requests_waiting)  # fmt: skip
        histogram = HistogramMetricFamily(
            _PREFIX + "acquire_wait_seconds",
            "Time a checkout waited for a connection.",
            labels=["pool"],
        )
        histogram.add_metric(
            label,
            [(repr(b), float(n)) for b, n in stats.acquire_wait_buckets]
            + [("+Inf", float(stats.checkouts))],
            sum_value=stats.acquire_wait_seconds,
        )
        yield histogram
        yield counter("exhausted", "Requests answered 503: no connection in time.",
                      stats.exhausted)  # fmt: skip
        yield counter("deadline_exceeded", "Checkouts cut by the request's deadline (504).",
                      stats.deadline_exceeded)  # fmt: skip
        yield counter("cancelled_requests", "Requests cut by CancellationMiddleware.",
                      stats.cancelled_requests)  # fmt: skip
        yield counter("discarded_connections", "Connections closed instead of returned.",
                      stats.discarded_on_release)  # fmt: skip
        yield counter("connection_errors", "Failed attempts to open a connection.",
                      stats.connection_errors)  # fmt: skip
        by_cause = CounterMetricFamily(
            _PREFIX + "connection_failures",
            "Failed attempts to open a connection, by cause (the package's count).",
            labels=["pool", "cause"],
        )
        for cause in CAUSES:
            by_cause.add_metric([*label, cause], stats.connection_errors_by_cause.get(cause, 0))
        yield by_cause
        yield counter("loop_stalls", "Times the event loop was blocked past the watchdog's "
                      "threshold.", stats.loop_stalls)  # fmt: skip
        yield gauge("loop_worst_lag_seconds", "Longest event-loop stall seen.",
                    stats.worst_loop_lag_seconds)  # fmt: skip
