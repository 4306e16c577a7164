"""What a running pool has done: psycopg_pool's own figures plus those only we can count.

One source of truth: `Counters` (checkouts, waits and holds, by route) and `ConnectLog`
(connections opened, failed) are the only tallies. `DBPool.stats()`, the Prometheus
collector and the OpenTelemetry gauges read them through `snapshot`; histograms that
OpenTelemetry can only be given value by value get each value from the same call that
counts it here (`Observer`).
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ._log import error, fields

if TYPE_CHECKING:
    from ._connect_errors import ConnectLog
    from ._connection import Lease
    from ._watchdog import LoopWatchdog

#: Upper bounds (seconds) of the wait, use and create time histograms' buckets. The +Inf
#: bucket is implied: its count is the histogram's count. No bound is infinite, so a
#: `PoolStats` serialises as JSON (FastAPI refuses ``inf``).
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
#: What `PoolStats.routes` and `Holder.route` call checkouts made outside a route
#: (``db.connection()`` in a background task, the health probes).
NO_ROUTE = "(no route)"
TOP_HOLDERS = 3  # how many routes the exhaustion warning and `PoolStats.holders` name
logger = logging.getLogger("fastapi_dbpool")


def route_of(scope: Mapping[str, Any]) -> str | None:
    """The request's route template (``"/items/{item_id}"``, as declared), never its raw
    path: as many values as the app has routes. None before routing, or outside FastAPI."""
    return getattr(scope.get("route"), "path", None)


class Observer(Protocol):
    """Told each value as it is counted (`fastapi_dbpool.otel`'s histograms)."""

    def waited(self, pool: str, route: str | None, seconds: float) -> None: ...
    def held(self, pool: str, route: str | None, seconds: float) -> None: ...
    def created(self, pool: str, seconds: float) -> None: ...


class Histogram:
    """Counts per `WAIT_BUCKETS` bucket (the last: past every bound), and their sum."""

    __slots__ = ("buckets", "count", "sum")

    def __init__(self) -> None:
        self.count = 0
        self.sum = 0.0
        self.buckets = [0] * (len(WAIT_BUCKETS) + 1)

    def add(self, seconds: float) -> None:
        self.count += 1
        self.sum += seconds
        self.buckets[bisect.bisect_left(WAIT_BUCKETS, seconds)] += 1

    def cumulative(self) -> tuple[tuple[float, int], ...]:
        """(bound, count at or under it) per bound, as Prometheus and `PoolStats` give them."""
        total, out = 0, []
        for bound, count in zip(WAIT_BUCKETS, self.buckets[:-1], strict=True):
            total += count
            out.append((bound, total))
        return tuple(out)


def merged(histograms: Iterable[Histogram]) -> Histogram:
    total = Histogram()
    for h in histograms:
        total.count += h.count
        total.sum += h.sum
        total.buckets = [a + b for a, b in zip(total.buckets, h.buckets, strict=True)]
    return total


class RouteTally:
    """One route's checkouts: how long each waited for its connection, and held it."""

    __slots__ = ("use", "wait")

    def __init__(self) -> None:
        self.wait = Histogram()
        self.use = Histogram()


@dataclass
class Counters:
    """Mutable tallies, kept by the runtime on its loop (no locking needed)."""

    pool: str
    observers: list[Observer] = field(default_factory=list)  # shared with the DBPool
    routes: dict[str | None, RouteTally] = field(default_factory=dict)
    exhausted: int = 0
    deadline_exceeded: int = 0
    cancelled_requests: int = 0
    discarded_on_release: int = 0

    def _route(self, route: str | None) -> RouteTally:
        tally = self.routes.get(route)
        if tally is None:
            tally = self.routes[route] = RouteTally()
        return tally

    def waited(self, seconds: float, route: str | None) -> None:
        """A checkout for `route` got its connection after `seconds`."""
        self._route(route).wait.add(seconds)
        if self.observers:
            tell(self.observers, "waited", self.pool, route, seconds)

    def held(self, seconds: float, route: str | None) -> None:
        """A checkout for `route` gave its connection back after holding it `seconds`."""
        self._route(route).use.add(seconds)
        if self.observers:
            tell(self.observers, "held", self.pool, route, seconds)


def tell(observers: list[Observer], what: str, *args: Any) -> None:
    """Call each observer's `what`: one that raises must not fail a checkout or a return
    (and so leak its connection); it is logged, and the others are told."""
    for observer in observers:
        try:
            getattr(observer, what)(*args)
        except Exception as ex:
            why = error(ex)
            logger.warning(
                "a metrics observer failed (%s); the pool carries on. hint: check the "
                "OpenTelemetry SDK and exporter set-up",
                why,
                extra=fields("observer_failed", args[0], error=why),
            )


@dataclass(frozen=True)
class Holder:
    """A route holding connections now: how many, and the longest held so far (seconds)."""

    route: str
    connections: int
    longest_seconds: float


def top_holders(leases: Iterable[Lease], now: float, n: int = TOP_HOLDERS) -> tuple[Holder, ...]:
    """The `n` routes holding the most connections out of `leases`, the longest first on
    a tie: the answer to "who is holding the pool?" when it runs dry."""
    held: dict[str, list[float]] = {}
    for lease in leases:
        held.setdefault(lease.route or NO_ROUTE, []).append(now - lease.since)
    holders = [Holder(route, len(ages), max(ages)) for route, ages in held.items()]
    holders.sort(key=lambda h: (-h.connections, -h.longest_seconds))
    return tuple(holders[:n])


@dataclass(frozen=True)
class RouteStats:
    """One route's checkouts since the pool opened (see `PoolStats.routes`)."""

    checkouts: int
    wait_seconds: float
    wait_buckets: tuple[tuple[float, int], ...]
    returns: int
    use_seconds: float
    use_buckets: tuple[tuple[float, int], ...]


@dataclass(frozen=True)
class PoolStats:
    """A snapshot of one pool, from `DBPool.stats()`.

    Gauges: ``pool_min``, ``pool_max``, ``pool_size`` (connections open), ``pool_available``
    (idle in the pool), ``requests_waiting``. Counters since the pool opened: ``checkouts``
    (connections handed out), ``acquire_wait_seconds`` (their total wait) with
    ``acquire_wait_buckets`` (cumulative counts per `WAIT_BUCKETS` bound; the +Inf bucket
    is ``checkouts``); ``returns`` (connections given back), ``use_seconds`` (how long they
    were held in all) with ``use_buckets`` (the +Inf bucket is ``returns``);
    ``connections_created``, ``create_seconds`` with ``create_buckets`` (connections
    opened, and how long opening took); ``exhausted`` (503s), ``deadline_exceeded`` (504s
    while waiting for a connection), ``timeouts`` (the two together: checkouts that got no
    connection in time), ``cancelled_requests`` (cut by `CancellationMiddleware`),
    ``discarded_on_release`` (connections closed instead of returned),
    ``connection_errors`` (failed connection attempts) with ``connection_errors_by_cause``
    (the package's count, by cause: ``authentication``, ``too_many_connections``,
    ``read_only``, ``dns``, ``refused``, ``timeout``, ``other``), ``loop_stalls`` and
    ``worst_loop_lag_seconds`` (from the watchdog). ``last_connection_error``: why new
    connections fail, ``"<message> (<cause>)"`` without secrets, while they do; None once
    a connection opens again. ``routes``: the checkouts, waits and holds of each FastAPI
    route template (``"/items/{item_id}"``; `NO_ROUTE` for checkouts outside a route).
    ``holders``: the routes holding the most connections now (`Holder`). ``replica_lag_seconds``:
    a replica's of `ReadReplicas`, as last measured (None: not a replica, unreachable,
    or promoted). A server that stops answering (see docs/network.md): ``cancel_failures``
    (cancel requests not delivered, each connection closed), ``connections_lost``
    (connections that broke under a statement, answered 503), and ``silent_server``: why
    the server is taken as silent (naming its ``host:port``), or None while it answers.
    """

    name: str
    pool_min: int
    pool_max: int
    pool_size: int
    pool_available: int
    requests_waiting: int
    checkouts: int
    acquire_wait_seconds: float
    acquire_wait_buckets: tuple[tuple[float, int], ...]
    exhausted: int
    deadline_exceeded: int
    cancelled_requests: int
    discarded_on_release: int
    connection_errors: int
    loop_stalls: int
    worst_loop_lag_seconds: float
    connection_errors_by_cause: dict[str, int]
    last_connection_error: str | None
    returns: int
    use_seconds: float
    use_buckets: tuple[tuple[float, int], ...]
    connections_created: int
    create_seconds: float
    create_buckets: tuple[tuple[float, int], ...]
    timeouts: int
    routes: dict[str, RouteStats]
    holders: tuple[Holder, ...]
    replica_lag_seconds: float | None = None
    cancel_failures: int = 0
    connections_lost: int = 0
    silent_server: str | None = None


def snapshot(
    name: str,
    pool: dict[str, int],
    counters: Counters,
    leases: Iterable[Lease],
    watchdog: LoopWatchdog | None,
    connect_log: ConnectLog,
    replica_lag: float | None = None,
) -> PoolStats:
    """A `PoolStats` from psycopg_pool's ``get_stats()``, our tallies and the watchdog."""
    routes = dict(counters.routes)  # a copy: a metrics thread must not see it change size
    wait = merged(t.wait for t in routes.values())
    use = merged(t.use for t in routes.values())
    created = connect_log.created
    return PoolStats(
        name=name,
        pool_min=pool.get("pool_min", 0),
        pool_max=pool.get("pool_max", 0),
        pool_size=pool.get("pool_size", 0),
        pool_available=pool.get("pool_available", 0),
        requests_waiting=pool.get("requests_waiting", 0),
        checkouts=wait.count,
        acquire_wait_seconds=wait.sum,
        acquire_wait_buckets=wait.cumulative(),
        exhausted=counters.exhausted,
        deadline_exceeded=counters.deadline_exceeded,
        cancelled_requests=counters.cancelled_requests,
        discarded_on_release=counters.discarded_on_release,
        connection_errors=pool.get("connections_errors", 0),
        loop_stalls=watchdog.stalls if watchdog else 0,
        worst_loop_lag_seconds=watchdog.worst_lag if watchdog else 0.0,
        connection_errors_by_cause=dict(connect_log.by_cause),
        last_connection_error=None if connect_log.current is None else str(connect_log.current),
        returns=use.count,
        use_seconds=use.sum,
        use_buckets=use.cumulative(),
        connections_created=created.count,
        create_seconds=created.sum,
        create_buckets=created.cumulative(),
        timeouts=counters.exhausted + counters.deadline_exceeded,
        routes={
            route or NO_ROUTE: RouteStats(
                checkouts=t.wait.count,
                wait_seconds=t.wait.sum,
                wait_buckets=t.wait.cumulative(),
                returns=t.use.count,
                use_seconds=t.use.sum,
                use_buckets=t.use.cumulative(),
            )
            for route, t in routes.items()
        },
        holders=top_holders(list(leases), time.monotonic()),
        replica_lag_seconds=replica_lag,
        cancel_failures=connect_log.silence.cancel_failures,
        connections_lost=connect_log.silence.connections_lost,
        silent_server=connect_log.silence.describe(),
    )
