"""OpenTelemetry metrics for `DBPool`s (install ``fastapi_dbpool[otel]``).

::

    from fastapi_dbpool import otel

    otel.instrument(db)  # or otel.instrument(db, replica), meter_provider=...

The database client connection metrics of OpenTelemetry's semantic conventions, each
with the pool's name as ``db.client.connection.pool.name``:

- ``db.client.connection.count`` (``db.client.connection.state``: ``idle`` or ``used``),
  ``db.client.connection.max``, ``db.client.connection.idle.max``,
  ``db.client.connection.idle.min``, ``db.client.connection.pending_requests``, and the
  counter ``db.client.connection.timeouts`` (checkouts that got no connection in time:
  503s and 504s): read from `DBPool.stats()` at each collection;
- the histograms ``db.client.connection.create_time``, ``db.client.connection.wait_time``
  and ``db.client.connection.use_time`` (seconds, the buckets of the Prometheus collector;
  wait and use with the route template as ``http.route``): given each value by the same
  call that counts it for `DBPool.stats()`, so the two always agree;

and the rest of what `DBPool.stats()` and the Prometheus collector have, which the
conventions do not name: ``fastapi_dbpool.pool.exhausted`` (503s),
``fastapi_dbpool.pool.deadline_exceeded`` (504s while waiting),
``fastapi_dbpool.requests.cancelled``, ``fastapi_dbpool.connection.discarded``,
``fastapi_dbpool.connection.errors``, ``fastapi_dbpool.connection.failures`` (by cause, as
``error.type``), ``fastapi_dbpool.loop.stalls``, ``fastapi_dbpool.loop.worst_lag`` and
``fastapi_dbpool.replica.lag``.

Only ``opentelemetry-api`` is needed here; the SDK, its readers and exporters are the
app's. Without a meter provider set, OpenTelemetry's API records nothing.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from importlib.metadata import version

try:
    from opentelemetry import metrics
    from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation
except ImportError as ex:  # pragma: no cover - depends on the environment
    raise ImportError(
        "fastapi_dbpool.otel needs opentelemetry-api: pip install 'fastapi_dbpool[otel]'"
    ) from ex

from ._connect_errors import CAUSES
from ._dbpool import DBPool
from ._metrics import WAIT_BUCKETS, PoolStats
from .errors import ConfigurationError

__all__ = ["instrument"]

POOL = "db.client.connection.pool.name"
STATE = "db.client.connection.state"
ROUTE = "http.route"
_instrumented: weakref.WeakSet[DBPool] = weakref.WeakSet()


class _Recorder:
    """The histograms, told each value as `DBPool` counts it (a `_metrics.Observer`)."""

    def __init__(self, meter: metrics.Meter) -> None:
        def histogram(name: str, description: str) -> metrics.Histogram:
            return meter.create_histogram(
                name, "s", description, explicit_bucket_boundaries_advisory=WAIT_BUCKETS
            )

        self.create_time = histogram(
            "db.client.connection.create_time", "The time it took to create a new connection"
        )
        self.wait_time = histogram(
            "db.client.connection.wait_time",
            "The time it took to obtain an open connection from the pool",
        )
        self.use_time = histogram(
            "db.client.connection.use_time",
            "The time between borrowing a connection and returning it to the pool",
        )

    def waited(self, pool: str, route: str | None, seconds: float) -> None:
        self.wait_time.record(seconds, _attributes(pool, route))

    def held(self, pool: str, route: str | None, seconds: float) -> None:
        self.use_time.record(seconds, _attributes(pool, route))

    def created(self, pool: str, seconds: float) -> None:
        self.create_time.record(seconds, {POOL: pool})


def _attributes(pool: str, route: str | None) -> dict[str, str]:
    return {POOL: pool} if route is None else {POOL: pool, ROUTE: route}


def instrument(
    *dbs: DBPool, meter_provider: MeterProvider | None = None, histograms: bool = True
) -> None:
    """Report the connection metrics of each of `dbs` through OpenTelemetry.

    `meter_provider`: the global one (``metrics.set_meter_provider``) by default. Call it
    once per pool, at start-up; a pool instrumented twice would count its histograms
    twice, and raises `ConfigurationError`. Works before or after the pool opens, and
    across restarts of the lifespan.

    `histograms=False` leaves out the create, wait and use time histograms: OpenTelemetry's
    Python SDK records each value in Python, two per request, which costs a one-query
    request about 15% more instructions (``python -m benchmarks.instructions --set
    observability``); the gauges and counters are read only at collection and cost a
    request nothing. The Prometheus collector has the same histograms at no cost per
    request.
    """
    if not dbs or len({db.name for db in dbs}) != len(dbs):
        raise ConfigurationError(
            "otel.instrument() takes one or more DBPools, each of its own name=."
        )
    for db in dbs:
        if db in _instrumented:
            raise ConfigurationError(
                f"DBPool {db.name!r} is instrumented already: call otel.instrument() once."
            )
    meter = metrics.get_meter("fastapi_dbpool", version("fastapi_dbpool"), meter_provider)
    recorder = _Recorder(meter) if histograms else None
    for db in dbs:
        _instrumented.add(db)
        if recorder is not None:
            db._observers.append(recorder)

    def observe(
        value: Callable[[PoolStats], Iterable[tuple[float, dict[str, str]]]],
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            for db in dbs:
                runtime = db._runtime
                if runtime is not None:  # nothing is reported of a pool that is not running
                    for figure, attributes in value(db._snapshot(runtime)):
                        yield Observation(figure, attributes)

        return callback

    def per_pool(
        value: Callable[[PoolStats], float],
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        return observe(lambda s: [(value(s), {POOL: s.name})])

    def gauge(name: str, unit: str, description: str, value: Callable[[PoolStats], int]) -> None:
        meter.create_observable_up_down_counter(name, [per_pool(value)], unit, description)

    meter.create_observable_up_down_counter(
        "db.client.connection.count",
        [
            observe(
                lambda s: [
                    (s.pool_available, {POOL: s.name, STATE: "idle"}),
                    (s.pool_size - s.pool_available, {POOL: s.name, STATE: "used"}),
                ]
            )
        ],
        "{connection}",
        "The number of connections that are currently in state described by the state attribute",
    )
    gauge("db.client.connection.max", "{connection}",
          "The maximum number of open connections allowed", lambda s: s.pool_max)  # fmt: skip
    gauge("db.client.connection.idle.max", "{connection}",
          "The maximum number of idle open connections allowed", lambda s: s.pool_max)  # fmt: skip
    gauge("db.client.connection.idle.min", "{connection}",
          "The minimum number of idle open connections allowed", lambda s: s.pool_min)  # fmt: skip
    gauge("db.client.connection.pending_requests", "{request}",
          "The number of current pending requests for an open connection",
          lambda s: s.requests_waiting)  # fmt: skip
    meter.create_observable_counter(
        "db.client.connection.timeouts",
        [per_pool(lambda s: s.timeouts)],
        "{timeout}",
        "The number of connection timeouts that have occurred trying to obtain a connection "
        "from the pool",
    )
    # The rest of what db.stats() and the Prometheus collector have, which the semantic
    # conventions do not name.
    for name, unit, description, value in _COUNTERS:
        meter.create_observable_counter(name, [per_pool(value)], unit, description)
    meter.create_observable_counter(
        "fastapi_dbpool.connection.failures",
        [
            observe(
                lambda s: [
                    (
                        s.connection_errors_by_cause.get(cause, 0),
                        {POOL: s.name, "error.type": cause},
                    )
                    for cause in CAUSES
                ]
            )
        ],
        "{attempt}",
        "Failed attempts to open a connection, by cause (error.type)",
    )
    meter.create_observable_gauge(
        "fastapi_dbpool.loop.worst_lag",
        [per_pool(lambda s: s.worst_loop_lag_seconds)],
        "s",
        "Longest event-loop stall seen",
    )
    meter.create_observable_gauge(
        "fastapi_dbpool.replica.lag",
        [
            observe(
                lambda s: (
                    []
                    if s.replica_lag_seconds is None
                    else [(s.replica_lag_seconds, {POOL: s.name})]
                )
            )
        ],
        "s",
        "A read replica's lag, as last measured by ReadReplicas (absent while unknown)",
    )


_COUNTERS: list[tuple[str, str, str, Callable[[PoolStats], int]]] = [
    ("fastapi_dbpool.pool.exhausted", "{request}",
     "Requests answered 503: no connection in time", lambda s: s.exhausted),
    ("fastapi_dbpool.pool.deadline_exceeded", "{request}",
     "Checkouts cut by the request's deadline (504)", lambda s: s.deadline_exceeded),
    ("fastapi_dbpool.requests.cancelled", "{request}",
     "Requests cut by CancellationMiddleware", lambda s: s.cancelled_requests),
    ("fastapi_dbpool.connection.discarded", "{connection}",
     "Connections closed instead of returned", lambda s: s.discarded_on_release),
    ("fastapi_dbpool.connection.errors", "{attempt}",
     "Failed attempts to open a connection (psycopg_pool's count)",
     lambda s: s.connection_errors),
    ("fastapi_dbpool.connection.cancel_failures", "{request}",
     "Cancel requests that could not be delivered (the server stopped answering)",
     lambda s: s.cancel_failures),
    ("fastapi_dbpool.connection.lost", "{connection}",
     "Connections that broke under a statement (503)", lambda s: s.connections_lost),
    ("fastapi_dbpool.loop.stalls", "{stall}",
     "Times the event loop was blocked past the watchdog's threshold", lambda s: s.loop_stalls),
]  # fmt: skip
