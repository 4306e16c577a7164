"""A running pool: the loop check and checkout of leases (their release: `_release`)."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from psycopg_pool import AsyncConnectionPool, PoolClosed, PoolTimeout, TooManyRequests

from . import _cleanup, _failover, _long_holds
from ._connect_errors import ConnectLog
from ._connection import (
    GuardedConnection,
    Lease,
    LeaseState,
    cancels_of,
    deliver_lost_cancellation,
    request_lease,
    request_lease_of,
)
from ._deadline import RequestControl, apply_statement_timeout, current_control, timeout_fits
from ._exhaustion import ExhaustionReport
from ._hand_over import WaitingLine
from ._liveness import alive
from ._log import fields
from ._metrics import Counters, Observer
from ._pinned import Pinned
from ._release import Releases
from ._watchdog import LoopWatchdog
from .errors import (
    ConfigurationError,
    DeadlineExceededError,
    PoolExhaustedError,
    PoolNotRunningError,
    WrongEventLoopError,
)

logger = logging.getLogger("fastapi_dbpool")


@dataclass(frozen=True)
class Settings:
    """What fastapi_dbpool adds to psycopg_pool's own settings."""

    acquire_timeout: float
    open_timeout: float
    close_timeout: float
    release_timeout: float
    retry_after: int
    allow_concurrent_tasks: bool
    watchdog: float | None = None
    transaction_pooler: bool | None = None
    writable: bool = False
    hold_warning: float | None = None


class PoolRuntime(Releases):
    """One opened pool, bound to the event loop that opened it."""

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        settings: Settings,
        connect_log: ConnectLog,
        observers: list[Observer],
    ) -> None:
        self.pool = pool
        self.settings = settings
        self.connect_log = connect_log  # why new connections fail, while they do
        # a session statement_timeout per deadline; never behind a transaction pooler
        self.session_timeouts = not settings.transaction_pooler
        self.loop = asyncio.get_running_loop()
        self.thread = threading.current_thread().name
        self.leases: set[Lease] = set()
        # psycopg_pool's close() drops a return still queued for its workers without
        # closing the connection; the lifespan closes what is left open (see DBPool._close).
        self.returned: weakref.WeakSet[GuardedConnection] = weakref.WeakSet()
        self.closing = False
        self._background: set[asyncio.Task[bool]] = set()
        self.exhaustion = ExhaustionReport()
        self.watchdog: LoopWatchdog | None = None
        self.counters = Counters(pool.name, observers)
        # seconds, as ReadReplicas last measured it; None: unknown, or left out of reads
        self.replica_lag: float | None = None
        self.pinned: Pinned | None = None  # rollback isolation of a test (fastapi_dbpool.testing)
        self.loop_hint = ""  # how a test started the app, for WrongEventLoopError
        # Hand-over (see _hand_over): off with a user's reset (psycopg_pool must see every
        # return) or check (every checkout), and with a psycopg_pool laid out otherwise
        # (see _pool_internals): it must not pass over the checkouts queued inside it.
        self.hand_over = False
        # Unless the user set a reset: a connection that needs nothing goes straight back to
        # psycopg_pool's idle deque, without its worker task (see _pool_internals).
        self.direct_return = False
        self.out = 0  # connections psycopg_pool handed to us and we have not given back
        self.asking = 0  # checkouts inside psycopg_pool's getconn() now
        self.round_trip = 0.0  # seconds, the fastest first statement of a new connection
        self.line = WaitingLine(self.loop, pool.name, self._pass_on)

    def pool_stats(self) -> dict[str, int]:
        """psycopg_pool's ``get_stats()``, counting checkouts waiting for a hand-over too."""
        stats = self.pool.get_stats()
        stats["requests_waiting"] = stats.get("requests_waiting", 0) + self.line.count
        return stats

    def check_loop(self) -> None:
        """Raise `WrongEventLoopError` unless called on the loop that opened the pool."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not self.loop:
            raise WrongEventLoopError(
                self.pool.name,
                opened_in=f"thread {self.thread!r}",
                used_in=f"thread {threading.current_thread().name!r}"
                if loop
                else "no running asyncio loop",
                hint=self.loop_hint,
            )

    async def acquire(
        self,
        timeout: float | None = None,
        *,
        for_request: bool,
        stream: bool = False,
        route: str | None = None,
    ) -> Lease:
        """Check out a live, idle connection, or raise `PoolExhaustedError` in time.

        A connection found dead (its server process terminated, the server restarted) is
        discarded and the next one tried at once, with no backoff, until the deadline.
        Under `CancellationMiddleware`, the request's remaining budget also bounds the wait
        (`DeadlineExceededError` when it runs out first) and becomes the connection's
        ``statement_timeout``.
        """
        if self.closing:
            raise PoolNotRunningError("the app is shutting down")
        started = time.monotonic()
        limit = self.settings.acquire_timeout if timeout is None else timeout
        by_deadline = False
        control = current_control.get()
        if control is not None and control.active:
            remaining = control.deadline - started  # math.inf when it has no deadline
            if remaining < limit:
                if remaining <= 0:
                    raise self._ran_out(control)
                limit, by_deadline = remaining, True
        else:
            control = None
        deadline = started + limit
        task = asyncio.current_task()
        held = request_lease_of(self) if for_request else None
        if held is not None and held.state is LeaseState.ACTIVE and held.task is task:
            raise ConfigurationError(
                "This request already holds a connection: StreamTransactionDep cannot be "
                "combined with ConnectionDep or TransactionDep in one request (it would need a "
                "second connection, and requests holding one while waiting for another can "
                "deadlock the pool). Use StreamTransactionDep alone."
            )
        shared = stream or (for_request and self.settings.allow_concurrent_tasks)
        cancels = cancels_of(task)
        while True:
            try:
                if self.pinned is not None:
                    conn = await self.pinned.take(max(deadline - time.monotonic(), 0.0))
                else:
                    conn = await self._checkout(deadline, limit)
            except (PoolTimeout, TooManyRequests) as ex:
                if by_deadline and isinstance(ex, PoolTimeout):
                    assert control is not None
                    raise self._ran_out(control) from ex
                self.counters.exhausted += 1
                self.exhaustion.report(self, ex)
                raise PoolExhaustedError(
                    self.pool.name, limit, self.settings.retry_after, str(ex)
                ) from ex
            except PoolClosed as ex:
                raise PoolNotRunningError("the pool is closed") from ex
            except asyncio.CancelledError:
                # CancellationMiddleware's cut and this wait's PoolTimeout come due at the same
                # deadline on timers of their own, and the cut may come first: the deadline
                # ran out here all the same (not counted again as a cut).
                if by_deadline and control is not None and time.monotonic() >= control.deadline:
                    self._ran_out(control)
                raise
            assert isinstance(conn, GuardedConnection)
            lease = Lease(
                conn, task, shared, self.settings.release_timeout, control, stream, self, route
            )
            conn._dbpool_lease = lease
            self.leases.add(lease)
            if self.settings.hold_warning is not None:
                lease.hold_timer = _long_holds.watch(
                    lease, self.settings.hold_warning, self.pool.name, for_request
                )
            if control is not None:
                if control.lease is None:  # control.hold(), for the request's one lease
                    control.lease = lease
                else:
                    control.hold(lease)
            try:
                if cancels_of(task) > cancels:  # swallowed by psycopg_pool's wait
                    await deliver_lost_cancellation()
                usable = not conn.closed if self.pinned is not None else await alive(conn)
                if usable:
                    if self.session_timeouts:
                        await self._bound_session(conn, control)
                    if for_request:
                        latest = request_lease.get()
                        if latest is not None:  # this request's leases of other pools
                            lease.previous = latest.previous if latest.runtime is self else latest
                        request_lease.set(lease)
                    self.counters.waited(lease.since - started, route)
                    return lease
            except BaseException:
                await self.release(lease)
                raise
            logger.info(
                "discarding a dead connection of pool %r",
                self.pool.name,
                extra=fields("dead_connection_discarded", self.pool.name),
            )
            _cleanup.close_now(conn)
            await self.release(lease)

    async def _bound_session(self, conn: GuardedConnection, control: RequestControl | None) -> None:
        """The request's budget as `conn`'s statement_timeout, or the session's own back.

        The budget, not what is left of it: requests of one route then share one setting,
        and a connection pays no SET round trip per request (on a slow link that round trip
        is what the deadline has to spare). The middleware's cancel still stops a statement
        at the deadline; statement_timeout is the bound where nothing else acts. A request
        left with less time than a round trip fails now (504), before it sends anything.
        """
        budget = math.inf  # no deadline, or no longer obeyed (the response ended)
        if control is not None and control.active:
            budget = control.deadline - control.start
        if budget != math.inf:
            assert control is not None
            if control.deadline - time.monotonic() < self.round_trip:
                raise self._ran_out(control)
            if not timeout_fits(conn, budget):
                first = conn._dbpool_base_timeout_ms is None
                started = time.monotonic()
                await apply_statement_timeout(conn, budget)
                if first:  # a read of the session's setting and a SET: two round trips
                    took = (time.monotonic() - started) / 2
                    self.round_trip = took if not self.round_trip else min(self.round_trip, took)
        elif conn._dbpool_timeout_ms != conn._dbpool_base_timeout_ms:
            await apply_statement_timeout(conn, None)

    def _ran_out(self, control: RequestControl) -> DeadlineExceededError:
        """The request's deadline came while it waited for a connection: count it once."""
        self.counters.deadline_exceeded += 1
        control.ran_out_in_pool = True  # not counted again as a cut by the middleware
        return DeadlineExceededError()

    async def _checkout(self, deadline: float, limit: float) -> GuardedConnection:
        """A connection from psycopg_pool, or handed over by a release while all are out."""
        # while others wait for a hand-over, join them rather than pass them in psycopg_pool
        line = self.line
        if self.hand_over and not self.closing and (self.out >= self.pool.max_size or line.count):
            conn = await line.wait(deadline, limit, self.pool.max_waiting)
            if conn is not None:
                return conn
            # None: its turn to ask psycopg_pool (a slot there is nobody else's), which
            # serves it or queues it first
        self.asking += 1
        try:
            conn = await self.pool.getconn(timeout=max(deadline - time.monotonic(), 0.0))
        except BaseException:
            self.asking -= 1
            self._offer_turns()  # the slot it asked for may be nobody's now: pass it on
            raise
        self.asking -= 1
        assert isinstance(conn, GuardedConnection)
        self.out += 1
        return conn

    @asynccontextmanager
    async def lease(
        self,
        timeout: float | None = None,
        *,
        for_request: bool,
        stream: bool = False,
        route: str | None = None,
    ) -> AsyncIterator[Lease]:
        """`acquire`, then `release` however the block exits."""
        lease = await self.acquire(timeout, for_request=for_request, stream=stream, route=route)
        try:
            yield lease
        except BaseException as exc:
            self.failed(exc)
            raise
        finally:
            await self.release(lease)

    def failed(self, exc: BaseException) -> None:
        """A block holding one of this pool's connections raised `exc`."""
        if self.settings.writable:
            _failover.saw(self.pool, exc)
