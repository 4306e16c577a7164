"""The connection class the pool hands out: psycopg's, plus an owner check on every I/O.

Every statement, fetch, COPY, commit and rollback of a psycopg connection goes through
`AsyncConnection.wait()`, so overriding it is the one place to check who is using the
connection, and the one place to stop a running query on the server when its task is
cancelled.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import math
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.lowlevel
from psycopg import AsyncConnection, AsyncCursor, AsyncTransaction, OperationalError, waiting
from psycopg.abc import PQGen
from psycopg.pq import TransactionStatus
from psycopg.rows import TupleRow, tuple_row

from . import _cleanup, _interrupted_begin, _network, _wait
from ._connect_errors import RecordingConnect
from .errors import (
    ConfigurationError,
    ConnectionInUseError,
    ConnectionLostError,
    ConnectionReleasedError,
)

if TYPE_CHECKING:
    from ._deadline import RequestControl
    from ._state import PoolRuntime

RV = TypeVar("RV")
_INTERRUPTED = (asyncio.CancelledError, KeyboardInterrupt, SystemExit)
# The fast wait replaces psycopg's only where AsyncConnection.wait() is the one it knows;
# any other signature gets psycopg's own wait, with whatever arguments psycopg passes.
_WAIT_PARAMS = inspect.signature(AsyncConnection.wait).parameters
FAST_WAIT = _wait.SUPPORTED and list(_WAIT_PARAMS) == ["self", "gen", "interval", "timeout"]
_interval = getattr(_WAIT_PARAMS.get("interval"), "default", None)
# how often psycopg checks on a waiting statement (0.1 s in every release so far)
_WAIT_INTERVAL: float = _interval if isinstance(_interval, float) else 0.1
# Without the fast wait: psycopg's own socket wait, the one its AsyncConnection.wait calls,
# with the package's cancellation handling around it instead of psycopg's, which is not
# shielded (under anyio its cancel request is cancelled, and the connection closed).
PLAIN_WAIT = list(inspect.signature(waiting.wait_async).parameters)[:3] == [
    "gen",
    "fileno",
    "interval",
]
_COUNTS_CANCELS = hasattr(asyncio.Task, "cancelling")  # Python 3.11+
#: Bound on each cleanup step when no DBPool setting applies (DBPool's release_timeout default).
CLEANUP_TIMEOUT = 5.0


def cancels_of(task: asyncio.Task[Any] | None) -> int:
    """How many cancellations `task` has been asked for (0 where Python cannot say: 3.10)."""
    return task.cancelling() if task is not None and _COUNTS_CANCELS else 0


async def deliver_lost_cancellation() -> None:
    """Deliver the cancellation a wait swallowed (`cancels_of` grew during it).

    On Python 3.11, ``asyncio.wait_for`` drops a cancellation that lands as the awaited
    future completes (CPython gh-86296), and psycopg_pool 3.3.0 and 3.3.1 can hand a
    connection to a waiter cancelled at that moment and drop its ``CancelledError``
    (psycopg #1275, #1345). psycopg 3.3.0's waits and psycopg_pool's (3.3.3's too) use
    ``wait_for``: a ``task.cancel()`` would be ignored, the cancelled work run on and commit.
    A plain cancellation (``task.cancel()``, ``asyncio.timeout``) is raised here, after the
    wait; an anyio scope's is delivered here too (anyio would deliver it again only at the
    next await that blocks, after psycopg has sent the next statement, a COMMIT maybe).
    """
    if anyio.current_effective_deadline() != -math.inf:
        raise asyncio.CancelledError()
    await anyio.lowlevel.checkpoint_if_cancelled()


class LeaseState(enum.Enum):
    ACTIVE = "active"
    RELEASING = "releasing"
    ENDED = "ended"


class Lease:
    """One checkout of one connection by one task (a request's, or `db.connection()`'s)."""

    __slots__ = (
        "cleanup_timeout",
        "conn",
        "control",
        "helper",
        "hold_timer",
        "orm",
        "previous",
        "route",
        "runtime",
        "shared",
        "since",
        "state",
        "stream",
        "task",
    )

    def __init__(
        self,
        conn: GuardedConnection,
        task: asyncio.Task[Any] | None,
        shared: bool,
        cleanup_timeout: float,
        control: RequestControl | None = None,
        stream: bool = False,
        runtime: PoolRuntime | None = None,
        route: str | None = None,
    ):
        self.runtime = runtime  # the pool it came from
        self.route = route  # the FastAPI route template it was checked out for, if any
        self.since = time.monotonic()  # when it was handed out
        self.previous: Lease | None = None  # the request's lease of another pool, if any
        self.conn = conn
        self.task = task
        self.shared = shared
        self.cleanup_timeout = cleanup_timeout
        self.control = control  # the request whose deadline this checkout obeys
        self.state = LeaseState.ACTIVE
        self.stream = stream  # StreamTransactionDep's: held until the response is sent
        self.hold_timer: asyncio.TimerHandle | None = None  # DBPool(hold_warning=)
        #: whether the running task, not the owner, may act for it (an ORM's cleanup task)
        self.helper: Callable[[], bool] | None = None
        self.orm: Any = None  # the ORM's connection on it, while one is open (sqlalchemy.py)

    def __repr__(self) -> str:
        name = self.task.get_name() if self.task else None
        return f"<Lease {self.state.value} task={name!r} conn={self.conn!r}>"


# The lease of the request running in this context, the latest first (`Lease.previous`:
# those of its other pools). Tasks spawned by a request copy their context, so they can
# tell "my request's connection, after the request ended".
request_lease: ContextVar[Lease | None] = ContextVar("fastapi_dbpool_request_lease", default=None)


def request_lease_of(runtime: PoolRuntime) -> Lease | None:
    """This request's latest lease of the pool `runtime`, whatever its state."""
    lease = request_lease.get()
    while lease is not None and lease.runtime is not runtime:
        lease = lease.previous
    return lease


def held_lease(runtime: PoolRuntime) -> Lease | None:
    """The lease of `runtime`'s pool this request's task holds now, to share between its
    dependencies."""
    lease = request_lease_of(runtime)
    if (
        lease is not None
        and lease.state is LeaseState.ACTIVE
        and lease.task is asyncio.current_task()
        and not lease.stream
    ):
        return lease
    return None


def _of_this_request(conn: AsyncConnection[Any]) -> Lease | None:
    """This request's lease of `conn`, if it ever had one (any pool)."""
    lease = request_lease.get()
    while lease is not None and lease.conn is not conn:
        lease = lease.previous
    return lease


class GuardedConnection(AsyncConnection[Any]):
    """`psycopg.AsyncConnection` that refuses use from outside the lease it is out on.

    Raises `ConnectionReleasedError` when a request's connection is used after that
    request ended, and `ConnectionInUseError` when a task other than the owner uses it
    while it is out (unless the lease is shared). When the task running a query is
    cancelled, the query is cancelled on the server under a shielded, bounded scope and
    its result drained, so the connection stays usable and PostgreSQL stops working.
    """

    _dbpool_lease: Lease | None = None
    _dbpool_timeout_ms: int | None = None  # statement_timeout as we last set it (None: not)
    _dbpool_base_timeout_ms: int | None = None  # the session's own statement_timeout
    # (setting, low, high): budgets between low and high need no change of that setting
    _dbpool_timeout_fits: tuple[int, float, float] | None = None
    _dbpool_gen: object = None  # the statement being waited for
    _dbpool_cancelled_gen: object = None  # the statement the middleware cancelled on the server
    _dbpool_cancel_done: Any = None  # set once the middleware's cancel request was delivered
    _dbpool_poller: Any = None  # a select.poll() on the socket, for the liveness check
    _dbpool_returned_to: object = None  # the pool runtime that knows it was given back
    _dbpool_local_timeouts = False  # deadlines per transaction, not per session (_pooler)
    _dbpool_orm_tx: AsyncTransaction | None = None  # the ORM's transaction (sqlalchemy.py)

    def _dbpool_check_owner(self) -> None:
        lease = self._dbpool_lease
        if lease is not None:
            if lease.task is asyncio.current_task() or lease.state is LeaseState.RELEASING:
                return
            mine = _of_this_request(self)
            if mine is lease:
                if lease.shared or (lease.helper is not None and lease.helper()):
                    return
                raise ConnectionInUseError(same_request=True)
            if mine is not None:
                raise ConnectionReleasedError()
            raise ConnectionInUseError(same_request=False)
        if _of_this_request(self) is not None:
            raise ConnectionReleasedError()

    async def wait(self, gen: PQGen[RV], *args: Any, **kwargs: Any) -> RV:
        lease = self._dbpool_lease
        if lease is None or lease.task is not asyncio.current_task():
            self._dbpool_check_owner()  # the owner's own statements need no further check
        if self._dbpool_cancel_done is not None and not self._dbpool_cancel_done.is_set():
            # A cancel request names a backend, not a statement: one still in flight from
            # another task would cancel this statement (a ROLLBACK, the next request's query).
            await self._dbpool_cancel_done.wait()
        self._dbpool_gen = gen
        try:
            plain = not args and kwargs.get("timeout") is None
            if plain and FAST_WAIT:
                return await _wait.wait(gen, self)
            task = asyncio.current_task()
            cancels = cancels_of(task)
            if plain and PLAIN_WAIT:
                fileno = self.pgconn.socket
                result = await waiting.wait_async(gen, fileno, interval=_WAIT_INTERVAL)
            else:
                result = await super().wait(gen, *args, **kwargs)
            if cancels_of(task) > cancels:
                await deliver_lost_cancellation()
            return result
        except _INTERRUPTED:
            # psycopg's own wait may have stopped the query already; if not, do it shielded
            if self.pgconn.transaction_status == TransactionStatus.ACTIVE:
                lease = self._dbpool_lease
                timeout = lease.cleanup_timeout if lease else CLEANUP_TIMEOUT
                await _cleanup.cancel_running_query(
                    self,
                    gen,
                    _WAIT_INTERVAL,
                    timeout,
                    send_cancel=self._dbpool_cancelled_gen is not gen,
                )
            raise
        except OperationalError as ex:
            # a broken connection, not a statement's own error (QueryCanceled...) nor one
            # closed on purpose
            if not self.broken or isinstance(ex, ConnectionLostError):
                raise
            raise self._dbpool_lost(ex) from ex

    def _dbpool_lost(self, ex: OperationalError) -> ConnectionLostError:
        silence = _network.silence_of(self)
        silence.connection_lost(ex)
        target = silence.target
        lease = self._dbpool_lease
        runtime = lease.runtime if lease is not None else None
        retry_after = runtime.settings.retry_after if runtime is not None else 1
        return ConnectionLostError(target, retry_after, ex)

    async def close(self) -> None:
        await super().close()
        if self.closed:
            _wait.wake_closed(self)  # a task waiting on it would wait forever (psycopg #608)

    if not _interrupted_begin.UNDONE_BY_PSYCOPG:

        def transaction(  # type: ignore[override]
            self, savepoint_name: str | None = None, force_rollback: bool = False
        ) -> AbstractAsyncContextManager[AsyncTransaction]:
            """psycopg's, with a BEGIN interrupted by a cancellation undone (psycopg < 3.3.7)."""
            lease = self._dbpool_lease
            timeout = lease.cleanup_timeout if lease else CLEANUP_TIMEOUT
            return _interrupted_begin.transaction(self, timeout, savepoint_name, force_rollback)


async def run_own(conn: AsyncConnection[Any], sql: str) -> AsyncCursor[TupleRow]:
    """Run one of the package's own statements (a SET, a liveness probe) on `conn`.

    Through a plain cursor, not the connection's ``cursor_factory``: instrumentation that
    traces statements by setting one (OpenTelemetry's psycopg instrumentation) does not
    see the package's housekeeping, which would show as spans of their own, outside any
    request. Rows are tuples, whatever the user's ``row_factory``.
    """
    cur = AsyncCursor(conn, row_factory=tuple_row)
    await cur.execute(sql)
    return cur


_guarded_classes: dict[type[AsyncConnection[Any]], type[GuardedConnection]] = {}


def guarded_class(cls: type[AsyncConnection[Any]]) -> type[GuardedConnection]:
    """`cls` with the guard mixed in (the user's `connection_class` keeps working)."""
    if issubclass(cls, GuardedConnection):
        return cls
    if cls is AsyncConnection:
        return GuardedConnection
    if cls not in _guarded_classes:
        _guarded_classes[cls] = type(f"Guarded{cls.__name__}", (GuardedConnection, cls), {})
    return _guarded_classes[cls]


def check_connects_as(cls: type[Any]) -> None:
    """Refuse to open a pool whose `cls.connect` would make connections of another class.

    psycopg_pool calls ``connection_class.connect()``. Where something replaced psycopg's
    classmethod with a method bound to `AsyncConnection` (OpenTelemetry's
    ``PsycopgInstrumentor().uninstrument()`` does, up to 0.66b1 at least), every
    connection would come out unguarded.
    """
    # past the pool's own recording override, to the connect() it calls
    past: Any = super(RecordingConnect, cls) if issubclass(cls, RecordingConnect) else cls
    connect = past.connect
    made_by = getattr(connect, "__self__", cls)
    if made_by is not cls:
        raise ConfigurationError(
            f"{cls.__name__}.connect() makes {getattr(made_by, '__name__', made_by)} "
            "connections: psycopg.AsyncConnection.connect is no longer a classmethod (an "
            "instrumentation's uninstrument() can leave it so). Re-instrument, or restore "
            "it before the app starts."
        )
