"""A running pool: the loop check, checkout and release of leases."""

from __future__ import annotations

import asyncio
import logging
import math
import select
import threading
import time
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from psycopg.pq import ConnStatus, TransactionStatus
from psycopg_pool import AsyncConnectionPool, PoolClosed, PoolTimeout, TooManyRequests

from . import _cleanup, _failover
from ._connect_errors import ConnectLog
from ._connection import (
    GuardedConnection,
    Lease,
    LeaseState,
    request_lease,
    request_lease_of,
    run_own,
)
from ._deadline import RequestControl, apply_statement_timeout, current_control, timeout_fits
from ._exhaustion import ExhaustionReport
from ._hand_over import WaitingLine
from ._log import fields
from ._metrics import Counters, Observer
from ._pinned import Pinned
from ._pool_internals import queued_in, return_now, stale
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


class PoolRuntime:
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
            assert isinstance(conn, GuardedConnection)
            lease = Lease(
                conn, task, shared, self.settings.release_timeout, control, stream, self, route
            )
            conn._dbpool_lease = lease
            self.leases.add(lease)
            if control is not None:
                if control.lease is None:  # control.hold(), for the request's one lease
                    control.lease = lease
                else:
                    control.hold(lease)
            try:
                alive = not conn.closed if self.pinned is not None else await _alive(conn)
                if alive:
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
        """The request's deadline as `conn`'s statement_timeout, or the session's own back."""
        left = math.inf  # no deadline, or no longer obeyed (the response ended)
        if control is not None and control.active:
            left = control.deadline - time.monotonic()
        if left != math.inf:
            left = max(left, 0.0)
            if not timeout_fits(conn, left):
                await apply_statement_timeout(conn, left)
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
            # None: its turn to ask psycopg_pool (a connection went back to it, or a
            # checkout waiting inside it failed), which serves it or queues it first
        try:
            conn = await self.pool.getconn(timeout=max(deadline - time.monotonic(), 0.0))
        except BaseException:
            if self.out < self.pool.max_size:
                self.line.wake_one()  # this may have been a waiter's turn: pass it on
            raise
        assert isinstance(conn, GuardedConnection)
        self.out += 1
        return conn

    def _hand_over(self, conn: GuardedConnection) -> bool:
        """Give `conn` to the first waiting checkout, if there is one and `conn` may go as is."""
        if self.closing or not _cleanup.ready_for_next(conn) or stale(self.pool, conn):
            return False
        return self.line.answer_first(conn)

    def _pass_on(self, conn: GuardedConnection) -> None:
        """A connection handed to a checkout that was cancelled before it could take it."""
        if not self._hand_over(conn):
            self._given_back(conn)
            self._give_back_later(conn)

    def _given_back(self, conn: GuardedConnection, *, wake: bool = True) -> None:
        """`conn` is on its way back to psycopg_pool: a waiter may ask it now (`wake`)."""
        self.out -= 1
        if wake:
            self.line.wake_one()
        if conn._dbpool_returned_to is not self:  # see `returned`
            conn._dbpool_returned_to = self
            self.returned.add(conn)

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

    async def release(self, lease: Lease) -> None:
        """Give `lease`'s connection back to the pool; shielded, bounded, never raises."""
        if lease.state is not LeaseState.ACTIVE:
            return
        lease.state = LeaseState.RELEASING
        self.counters.held(time.monotonic() - lease.since, lease.route)
        conn = lease.conn
        try:
            if self.pinned is not None:
                healthy = await self.pinned.give_back(self.settings.release_timeout)
            elif self.line.waiters and queued_in(self.pool):
                # checkouts that waited longer, inside psycopg_pool, are served first; the
                # ones waiting here are told once that queue is empty (or one of it fails)
                self._given_back(conn, wake=False)
                healthy = await _cleanup.give_back(self.pool, conn, self.settings.release_timeout)
            elif self.line.waiters and self._hand_over(conn):
                healthy = True
            else:
                self._given_back(conn)
                if (
                    self.direct_return
                    and _cleanup.ready_for_next(conn)
                    and return_now(self.pool, conn)
                ):
                    healthy = True
                else:
                    healthy = await _cleanup.give_back(
                        self.pool, conn, self.settings.release_timeout
                    )
            if not healthy:
                self.counters.discarded_on_release += 1
        except asyncio.CancelledError:
            if self.pinned is not None:
                raise  # its lock is released; the test's final ROLLBACK discards the rest
            # A plain task.cancel() goes through anyio's shield, which holds off only anyio's
            # own cancellation. putconn() does not await (DBPool always sets a reset), so
            # the connection was not handed back yet: finish in a task of its own.
            self._give_back_later(conn)
            raise
        finally:
            if conn._dbpool_lease is lease:
                conn._dbpool_lease = None
            lease.state = LeaseState.ENDED
            self.leases.discard(lease)
            control = lease.control
            if control is not None:
                if control.lease is lease:  # control.drop(), for the request's one lease
                    control.lease = None
                else:
                    control.drop(lease)
            # The request's context keeps its lease (see request_lease) and outlives it in
            # whatever copied it (every timer psycopg starts): keep that small and acyclic.
            lease.task = lease.control = None

    def _give_back_later(self, conn: GuardedConnection) -> None:
        task = self.loop.create_task(
            _cleanup.give_back(self.pool, conn, self.settings.release_timeout),
            name=f"{self.pool.name}-give-back",
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(self._count_late_give_back)

    def _count_late_give_back(self, task: asyncio.Task[bool]) -> None:
        if not task.cancelled() and task.exception() is None and not task.result():
            self.counters.discarded_on_release += 1


async def _alive(conn: GuardedConnection) -> bool:
    """Whether `conn` is fit to hand out, at the cost of a round trip only when in doubt.

    An idle connection has nothing to read. A terminated backend leaves its socket
    readable (an error, then end of file): only then is the server asked.
    """
    pgconn = conn.pgconn
    if conn.closed or pgconn.status != ConnStatus.OK:
        return False
    if pgconn.transaction_status != TransactionStatus.IDLE:
        return False
    if not _readable(conn):
        return True
    try:
        await run_own(conn, "")
    except Exception:
        return False
    return not conn.closed and pgconn.transaction_status == TransactionStatus.IDLE


def _readable(conn: GuardedConnection) -> bool:
    poller = conn._dbpool_poller
    if poller is None:
        if not hasattr(select, "poll"):  # select.select() fails for descriptors over 1023
            readable, _, _ = select.select([conn.pgconn.socket], [], [], 0)
            return bool(readable)
        poller = conn._dbpool_poller = select.poll()  # the socket is the same for life
        poller.register(conn.pgconn.socket, select.POLLIN)
    return bool(poller.poll(0))
