"""What a running pool has done: psycopg_pool's own figures plus those only we can count."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._connect_errors import ConnectLog
    from ._watchdog import LoopWatchdog

#: Upper bounds (seconds) of the acquire-wait histogram's buckets. The +Inf bucket is
#: implied: its count is `PoolStats.checkouts`. No bound is infinite, so a `PoolStats`
#: serialises as JSON (FastAPI refuses ``inf``).
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass
class Counters:
    """Mutable tallies, kept by the runtime on its loop (no locking needed)."""

    checkouts: int = 0
    acquire_wait_sum: float = 0.0
    acquire_wait_buckets: list[int] = field(
        default_factory=lambda: [0] * (len(WAIT_BUCKETS) + 1)  # the last: past every bound
    )
    exhausted: int = 0
    deadline_exceeded: int = 0
    cancelled_requests: int = 0
    discarded_on_release: int = 0

    def waited(self, seconds: float) -> None:
        self.checkouts += 1
        self.acquire_wait_sum += seconds
        self.acquire_wait_buckets[bisect.bisect_left(WAIT_BUCKETS, seconds)] += 1


@dataclass(frozen=True)
class PoolStats:
    """A snapshot of one pool, from `DBPool.stats()`.

    Gauges: ``pool_min``, ``pool_max``, ``pool_size`` (connections open), ``pool_available``
    (idle in the pool), ``requests_waiting``. Counters since the pool opened: ``checkouts``
    (connections handed out), ``acquire_wait_seconds`` (their total wait) with
    ``acquire_wait_buckets`` (cumulative counts per `WAIT_BUCKETS` bound; the +Inf bucket
    is ``checkouts``), ``exhausted``
    (503s), ``deadline_exceeded`` (504s while waiting for a connection),
    ``cancelled_requests`` (cut by `CancellationMiddleware`), ``discarded_on_release``
    (connections closed instead of returned), ``connection_errors`` (failed connection
    attempts) with ``connection_errors_by_cause`` (the package's count, by cause:
    ``authentication``,
    ``too_many_connections``, ``read_only``, ``dns``, ``refused``, ``timeout``, ``other``),
    ``loop_stalls`` and ``worst_loop_lag_seconds`` (from the watchdog).
    ``last_connection_error``: why new connections fail, ``"<message> (<cause>)"`` without
    secrets, while they do; None once a connection opens again. ``replica_lag_seconds``:
    a replica's of `ReadReplicas`, as last measured (None: not a replica, unreachable,
    or promoted).
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
    replica_lag_seconds: float | None = None


def snapshot(
    name: str,
    pool: dict[str, int],
    counters: Counters,
    watchdog: LoopWatchdog | None,
    connect_log: ConnectLog,
    replica_lag: float | None = None,
) -> PoolStats:
    """A `PoolStats` from psycopg_pool's ``get_stats()``, our counters and the watchdog."""
    return PoolStats(
        name=name,
        pool_min=pool.get("pool_min", 0),
        pool_max=pool.get("pool_max", 0),
        pool_size=pool.get("pool_size", 0),
        pool_available=pool.get("pool_available", 0),
        requests_waiting=pool.get("requests_waiting", 0),
        checkouts=counters.checkouts,
        acquire_wait_seconds=counters.acquire_wait_sum,
        acquire_wait_buckets=_cumulative(counters.acquire_wait_buckets),
        exhausted=counters.exhausted,
        deadline_exceeded=counters.deadline_exceeded,
        cancelled_requests=counters.cancelled_requests,
        discarded_on_release=counters.discarded_on_release,
        connection_errors=pool.get("connections_errors", 0),
        loop_stalls=watchdog.stalls if watchdog else 0,
        worst_loop_lag_seconds=watchdog.worst_lag if watchdog else 0.0,
        connection_errors_by_cause=dict(connect_log.by_cause),
        last_connection_error=None if connect_log.current is None else str(connect_log.current),
        replica_lag_seconds=replica_lag,
    )


def _cumulative(buckets: list[int]) -> tuple[tuple[float, int], ...]:
    total, out = 0, []
    for bound, count in zip(WAIT_BUCKETS, buckets[:-1], strict=True):
        total += count
        out.append((bound, total))
    return tuple(out)
