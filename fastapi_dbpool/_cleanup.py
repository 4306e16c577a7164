"""The only shielded awaits of the package: cancel on the server, roll back, give back.

Cleanup runs while the task may be cancelled again at every await (anyio cancels level-
triggered), so each step runs under ``anyio.move_on_after(timeout, shield=True)``: it is
protected from the cancellation it is cleaning up after, and bounded so that a dead
server cannot hang it. A step that runs out of time closes the connection instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio
import psycopg
from psycopg import AsyncConnection, AsyncTransaction, waiting
from psycopg.abc import PQGen
from psycopg.pq import ConnStatus, TransactionStatus
from psycopg_pool import AsyncConnectionPool

from . import _cancel_request, _fast_paths, _network, _pool_internals, _wait
from ._log import error, fields

logger = logging.getLogger("fastapi_dbpool")
RV = TypeVar("RV")
_IDLE = TransactionStatus.IDLE
_ACTIVE = TransactionStatus.ACTIVE
_RECANCEL_FIRST, _RECANCEL_MAX, _RECANCEL_FAST = 0.05, 0.5, 0.05
HINT_BROKEN = (
    "hint: the connection was broken (server restart, network, pg_terminate_backend); the "
    "pool replaces it; look further only if this repeats"
)
_HINT_SLOW = "hint: the server did not answer in time; check for lock waits or an overloaded server"


def _usable(conn: AsyncConnection[Any]) -> bool:
    return not conn.closed and conn.pgconn.status == ConnStatus.OK


def _running(conn: AsyncConnection[Any], target: object) -> bool:
    """Whether `conn` runs a statement now, `target` if given (`GuardedConnection._dbpool_gen`)."""
    return (
        _usable(conn)
        and conn.pgconn.transaction_status == _ACTIVE
        and (target is None or getattr(conn, "_dbpool_gen", None) is target)
    )


def close_now(conn: AsyncConnection[Any]) -> None:
    """Drop the connection without a round trip (libpq's ``PQfinish``).

    A task waiting on it wakes with ``OperationalError`` (see `_wait`).
    """
    if not conn.closed:
        conn.pgconn.finish()
        _wait.wake_closed(conn)


async def cancel_running_query(
    conn: AsyncConnection[Any],
    gen: PQGen[RV],
    interval: float,
    timeout: float,
    *,
    send_cancel: bool = True,
) -> None:
    """Stop the query `gen` is waiting on, on the server first, then drain its result.

    Called when the task awaiting the query was cancelled. psycopg does the same, but
    unshielded: under anyio its own cancel request is cancelled, the connection closed and
    the query left running on the server. Here it finishes, or the connection is closed:
    at once if the cancel request cannot be delivered (`cancel_on_server`), else when the
    drain outlasts `timeout`. Without `send_cancel` (the middleware has just sent one for
    this query), no cancel request is sent here unless that one was delivered and the
    statement still runs (see `_repeating_cancel`).
    """
    with anyio.move_on_after(timeout, shield=True) as scope:
        try:
            if send_cancel and not await cancel_on_server(conn, timeout):
                return
            async with _repeating_cancel(conn, timeout):
                await waiting.wait_async(gen, conn.pgconn.socket, interval=interval)
        except psycopg.errors.QueryCanceled:
            pass
        except Exception as ex:
            if not conn.closed:  # else closed by an undeliverable cancel, already logged
                logger.warning(
                    "cancelling a query of a cancelled request failed (%s); closing its "
                    "connection. %s",
                    error(ex),
                    _HINT_SLOW,
                    extra=fields("cancel_failed", error=error(ex)),
                )
                close_now(conn)
    if scope.cancelled_caught:
        logger.warning(
            "a query of a cancelled request was not stopped within %.1fs; closing its "
            "connection. %s",
            timeout,
            _network.HINT_NETWORK
            if _network.silence_of(conn).silent_for() is not None
            else _HINT_SLOW,
            extra=fields("cancel_slow", timeout_seconds=timeout),
        )
        close_now(conn)


@asynccontextmanager
async def _repeating_cancel(conn: AsyncConnection[Any], timeout: float) -> AsyncIterator[None]:
    """Send the cancel request again, backing off, until the block (the drain) ends.

    A cancel request that reaches the server before the statement does finds the backend
    idle and is ignored; the statement then runs to its end. No other statement can start
    on `conn` while it is drained, so a repeated request can only hit this one. That race
    needs the cancel to travel faster than the statement, which a cancel, on a TCP
    connection of its own, only does on a fast link: once one took `_RECANCEL_FAST` or
    longer to deliver, none is repeated (a slow link would pay a handshake each time).
    """
    drained = asyncio.Event()

    async def repeat() -> None:
        delay = _RECANCEL_FIRST
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(drained.wait(), delay)
                return
            pending = getattr(conn, "_dbpool_cancel_done", None)
            if pending is not None and not pending.is_set():
                continue  # the first request is still on its way
            if getattr(conn, "_dbpool_cancel_took", 0.0) >= _RECANCEL_FAST or conn.closed:
                return
            if not await cancel_on_server(conn, timeout):
                return
            delay = min(delay * 2, _RECANCEL_MAX)

    task = asyncio.get_running_loop().create_task(repeat())
    try:
        yield
    finally:
        drained.set()
        await task  # an in-flight cancel request must land before the next statement is sent


async def roll_back(tx: AsyncTransaction, exc: BaseException, timeout: float) -> None:
    """End `tx` with a rollback, whatever cancellation is going on around it."""
    with anyio.move_on_after(timeout, shield=True) as scope:
        try:
            await tx.__aexit__(type(exc), exc, exc.__traceback__)
        except Exception as ex:
            logger.warning(
                "rollback failed (%s: %s); closing the connection. %s",
                type(ex).__name__,
                ex,
                HINT_BROKEN,
                extra=fields("rollback_failed", error=error(ex)),
            )
            close_now(tx.connection)
    if scope.cancelled_caught:
        logger.warning(
            "rollback took over %.1fs; closing the connection. %s",
            timeout,
            _HINT_SLOW,
            extra=fields("rollback_slow", timeout_seconds=timeout),
        )
        close_now(tx.connection)


async def run_shielded(step: Callable[[], Awaitable[Any]], timeout: float, what: str) -> None:
    """Run one cleanup step of code not the package's own (an ORM's close) to its end,
    shielded and bounded; log what fails, never raise. The release that follows puts
    right whatever state it leaves the connection in."""
    with anyio.move_on_after(timeout, shield=True) as scope:
        try:
            await step()
        except Exception as ex:
            logger.warning(
                "%s failed (%s). %s",
                what,
                error(ex),
                HINT_BROKEN,
                extra=fields("cleanup_failed", error=error(ex)),
            )
    if scope.cancelled_caught:
        logger.warning(
            "%s took over %.1fs. %s",
            what,
            timeout,
            _HINT_SLOW,
            extra=fields("cleanup_slow", timeout_seconds=timeout),
        )


def ready_for_next(conn: AsyncConnection[Any]) -> bool:
    """Whether `conn` can go back as it is: idle in autocommit, nothing open, nothing pending."""
    pgconn = conn.pgconn
    pending = getattr(conn, "_dbpool_cancel_done", None)
    return (
        pgconn.transaction_status == _IDLE  # UNKNOWN once closed or broken
        and pgconn.status == ConnStatus.OK
        and conn.autocommit
        and not _blocks_open(conn)
        and not conn.lock.locked()
        and (pending is None or pending.is_set())
    )


async def quiesce(conn: AsyncConnection[Any], cancel_timeout: float) -> bool:
    """Wait until nothing runs on `conn`; whether psycopg's bookkeeping is clean for reuse."""
    pending: anyio.Event | None = getattr(conn, "_dbpool_cancel_done", None)
    if pending is not None:
        await pending.wait()  # a cancel request in flight from another task (cancel_on_server)
    if conn.pgconn.transaction_status == _ACTIVE:
        # Another task is still running a statement on it: stop it on the server and let
        # that task see QueryCanceled; the lock is free once its statement has ended.
        await _cancel_request.send_cancel(conn, cancel_timeout)
    async with conn.lock:
        pass
    return not _blocks_open(conn)


def _blocks_open(conn: AsyncConnection[Any]) -> bool:
    """Whether a `conn.transaction()` or `conn.pipeline()` block is still open in some task.

    Such a block would leave psycopg's bookkeeping wrong for the next user. A psycopg that
    keeps no such private record counts as none open, as psycopg_pool itself assumes.
    """
    if not _fast_paths.ENABLED:
        return False
    return bool(getattr(conn, "_num_transactions", 0)) or (
        getattr(conn, "_pipeline", None) is not None
    )


async def _make_idle(conn: AsyncConnection[Any], cancel_timeout: float) -> None:
    if not await quiesce(conn, cancel_timeout):
        close_now(conn)
        return
    if conn.pgconn.transaction_status != _IDLE:
        await conn.rollback()
    if not conn.autocommit:
        await conn.set_autocommit(True)


async def give_back(
    pool: AsyncConnectionPool[Any], conn: AsyncConnection[Any], timeout: float
) -> bool:
    """Return `conn` to `pool` idle, outside any transaction, in autocommit.

    A connection that cannot be brought back in `timeout` seconds is closed and the pool
    replaces it. Returns whether it went back healthy. Never raises, and never swallows a
    cancellation: callers re-raise what they were handling.
    """
    if not pool.closed and ready_for_next(conn):
        # The common case needs no await that can suspend: with the pool open and a reset
        # callback set, putconn() only queues the return (see DBPool), so no cancellation
        # can land here and neither a shield nor a timeout is needed.
        return await _putconn(pool, conn)
    healthy = False
    with anyio.move_on_after(timeout, shield=True) as scope:
        try:
            if _usable(conn):
                await _make_idle(conn, timeout)
                healthy = _usable(conn)
        except Exception as ex:
            logger.warning(
                "could not reset a returned connection (%s: %s); closing it. %s",
                type(ex).__name__,
                ex,
                HINT_BROKEN,
                extra=fields("reset_failed", pool.name, error=error(ex)),
            )
    if scope.cancelled_caught:
        logger.warning(
            "resetting a returned connection took over %.1fs; closing it. %s",
            timeout,
            _HINT_SLOW,
            extra=fields("reset_slow", pool.name, timeout_seconds=timeout),
        )
    if not healthy:
        close_now(conn)
    with anyio.move_on_after(timeout, shield=True) as scope:
        await _putconn(pool, conn)
    if scope.cancelled_caught:
        logger.warning(
            "returning a connection to the pool took over %.1fs. %s",
            timeout,
            _HINT_SLOW,
            extra=fields("return_slow", pool.name, timeout_seconds=timeout),
        )
    return healthy


async def _putconn(pool: AsyncConnectionPool[Any], conn: AsyncConnection[Any]) -> bool:
    """`pool.putconn(conn)`, or close `conn` if the pool refuses it; whether it went back."""
    try:
        await pool.putconn(conn)
        return True
    except Exception as ex:
        logger.warning(
            "could not return a connection to the pool (%s: %s); closing it. %s",
            type(ex).__name__,
            ex,
            HINT_BROKEN,
            extra=fields("return_failed", pool.name, error=error(ex)),
        )
        close_now(conn)
        return False


async def cancel_on_server(
    conn: AsyncConnection[Any], timeout: float, *, after: float = 0.0, target: object = None
) -> bool:
    """Ask PostgreSQL to stop the statement `conn` is running, if any; never raises.

    The task awaiting that statement gets `QueryCanceled` and keeps a usable connection.
    A cancel request names a backend, not a statement: until it has been delivered, the
    connection is not reset or handed to anyone else (see `_make_idle`), or it could cancel
    the next user's statement. A cancel request that cannot be delivered within `timeout`
    (a partition, a frozen server: it travels on a new TCP connection) means the
    connection cannot be reached either: it is closed at once, which also ends the wait of
    the task on it, and the server is recorded as silent (`_network`). Returns whether
    the request was delivered (or nothing was running). With `after` (a round trip to the
    server), the statement first has that long to end by itself: on a slow link a short
    statement's result lands before a cancel request could, and the cancel's handshake
    would hold the connection for nothing. With `target` (the statement a cut decided to
    stop), only that statement is cancelled: the task that sends the request runs a loop
    turn after the decision, by which time the request may have released the connection
    and the next one started a statement of its own.
    """
    done = anyio.Event()
    setattr(conn, "_dbpool_cancel_done", done)  # noqa: B010 (a GuardedConnection slot)
    silence: _network.Silence | None = None
    delivered = False
    failure: Exception | None = None
    try:
        with anyio.move_on_after(timeout, shield=True):
            try:
                if after and _running(conn, target):
                    await asyncio.sleep(after)
                if _running(conn, target):
                    silence = _network.silence_of(conn)
                    silence.cancel_sent(id(done))
                    started = time.monotonic()
                    await _cancel_request.send_cancel(conn, timeout)
                    setattr(conn, "_dbpool_cancel_took", time.monotonic() - started)  # noqa: B010
                delivered = True
            except Exception as ex:
                failure = ex
    finally:
        done.set()
        if silence is not None:
            silence.cancel_ended(id(done))
    if silence is None:
        return delivered
    if delivered:
        silence.answered()
    elif not conn.closed:
        silence.cancel_failed(failure, timeout)
        close_now(conn)
    return delivered


async def cancel_and_close(conn: AsyncConnection[Any], timeout: float) -> None:
    """At shutdown: stop whatever `conn` runs on the server, then close it."""
    await cancel_on_server(conn, timeout)
    close_now(conn)


async def close_pool(pool: AsyncConnectionPool[Any], timeout: float) -> None:
    """Close `pool` within about `timeout` seconds, even if the caller is being cancelled.

    If psycopg_pool's close is interrupted all the same (a native ``task.cancel()``, or its
    workers cancelled under it, as an event loop being torn down does to every task), the
    connections it had idle are closed here: psycopg_pool takes them out of the pool first,
    and an interrupted close would leave them open, backends and all.
    """
    idle = _pool_internals.idle_connections(pool)
    try:
        with anyio.move_on_after(timeout + 1.0, shield=True) as scope:
            await pool.close(timeout=timeout)
    except BaseException:
        for conn in idle:
            close_now(conn)
        raise
    if scope.cancelled_caught:
        logger.warning(
            "closing pool %r took over %.1fs. hint: raise close_timeout, or stop long "
            "queries and jobs before shutdown",
            pool.name,
            timeout + 1.0,
            extra=fields("close_slow", pool.name, timeout_seconds=timeout + 1.0),
        )
