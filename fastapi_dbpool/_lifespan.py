"""Running a DBPool: open on the running loop, eagerly and bounded; close bounded.

`run` is `DBPool.lifespan` (and `DBPool.open`, without an app); `lifespan` composes
several pools into one app lifespan.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import anyio
import psycopg
import psycopg_pool
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from . import _cleanup, _config, _credentials, _dsn, _fast_paths
from ._connect_errors import HINTS, classify
from ._connection import FAST_WAIT, check_connects_as
from ._log import fields
from ._middleware import check_deadlines_are_enforced
from ._pinned import Pinned, binding
from ._pool_internals import release_idle_promptly, returns_now_as_it_should
from ._pooler import undecided_behind_a_pooler
from ._preflight import preflight
from ._registry import STATE_KEY, Pools, pools_of, same_name
from ._state import PoolRuntime
from ._watchdog import LoopWatchdog
from .errors import ConfigurationError, PoolOpenError

if TYPE_CHECKING:
    from ._dbpool import DBPool

logger = logging.getLogger("fastapi_dbpool")


@asynccontextmanager
async def run(db: DBPool, app: Any) -> AsyncIterator[dict[str, Any]]:
    """`db.lifespan(app)`, and `db.open()` with no app (`app` None): see `DBPool.lifespan`."""
    if db._runtime is not None:
        raise ConfigurationError(
            f"DBPool {db.name!r} is already running for another app or lifespan; "
            "create one DBPool per app."
        )
    if app is not None:
        check_deadlines_are_enforced(app)
    pools = pools_of(app) if app is not None else Pools()
    pools.reserve(db.name)
    try:
        runtime = await open_runtime(db)
    except BaseException:
        pools.remove(db.name)
        raise
    db._runtime = runtime
    pools.add(db.name, runtime)
    if db._settings.watchdog is not None:
        runtime.watchdog = LoopWatchdog(runtime.loop, db._settings.watchdog, db.name)
        runtime.watchdog.start()
    try:
        for prepare in db._on_open:  # what uses the pool gets ready before any request
            await prepare(runtime)
        yield {STATE_KEY: pools}
    finally:
        runtime.closing = True  # from now on: no checkouts, readiness says "shutting down"
        try:
            await close_runtime(db, runtime)
        finally:
            pools.remove(db.name)
            db._runtime = None
            db._ended_at = time.time()
            if runtime.watchdog is not None:
                runtime.watchdog.stop()


async def open_runtime(db: DBPool) -> PoolRuntime:
    """Open `db`'s pool on the running loop, eagerly: `min_size` connections within
    ``open_timeout``, or `PoolOpenError` naming the server and the cause."""
    bound = binding.get()
    if bound is None and db._unbound:
        raise ConfigurationError(
            "DATABASE_URL is not set, so this DBPool (from DBPool.from_env()) has no "
            "database. Under pytest, run the app through the dbpool_app or dbpool_client "
            "fixtures, which open it on a test database, or set DATABASE_URL."
        )
    check_connects_as(db._pool_kwargs["connection_class"])
    db._connect_log.reset()
    conninfo = db._conninfo if bound is None else bound.conninfo
    kwargs, settings = db._pool_kwargs, db._settings
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(conninfo, open=False, **kwargs)
    timeout = db._settings.open_timeout
    deadline = time.monotonic() + timeout
    target = _credentials.describe(conninfo)
    runtime: PoolRuntime | None = None
    try:
        with anyio.fail_after(timeout):
            cancels = _cancel_requests()
            pooled = await preflight(pool, conninfo, target, settings, db._connect_log)
            if pooled and db._pooler_kwargs is not None:
                chosen = undecided_behind_a_pooler(db.name, db._pooler_kwargs)
                if chosen is not None:  # the pool was not opened: nothing to close
                    kwargs, settings = chosen, replace(settings, transaction_pooler=True)
                    pool = AsyncConnectionPool(conninfo, open=False, **kwargs)
            await pool.open(wait=True, timeout=max(deadline - time.monotonic(), 0.001))
            if _cancel_requests() > cancels:
                # psycopg's connect() can swallow a task.cancel() and return a connection
                raise asyncio.CancelledError()
            release_idle_promptly(pool)
            runtime = PoolRuntime(pool, settings, db._connect_log, db._observers)
            ours = kwargs["reset"] is _config.keep_as_is
            returns_now = returns_now_as_it_should(pool)
            runtime.direct_return = ours and returns_now
            no_check = kwargs.get("check") is None
            runtime.hand_over = runtime.direct_return and no_check
            _fast_paths.check_taken(
                {"the timer-less wait": FAST_WAIT, "the direct return": returns_now},
                {"psycopg": psycopg, "psycopg_pool": psycopg_pool},
            )
            if bound is not None:
                runtime.loop_hint = bound.hint
                if bound.isolate:
                    runtime.pinned = await Pinned.begin(runtime)
                bound.runtimes.append(runtime)
    except (TimeoutError, PoolTimeout) as ex:
        await _cleanup.close_pool(pool, db._settings.close_timeout)
        last = db._connect_log.current
        if last is None:
            cause = f"{pool.min_size} connection(s) not ready in time ({type(ex).__name__})"
            raise PoolOpenError(target, timeout, cause, db.name) from None
        hint = f"{last.hint}; if it only starts slowly, raise open_timeout"
        raise PoolOpenError(target, timeout, f"still failing: {last}", db.name, hint) from None
    except psycopg.Error as ex:
        await _cleanup.close_pool(pool, db._settings.close_timeout)
        cause, kind = _dsn.scrub(str(ex).strip()), classify(ex)
        hint = HINTS[kind] if kind != "other" else ""  # else: check the URL, the server...
        raise PoolOpenError(target, timeout, cause, db.name, hint) from None
    except BaseException:
        await _cleanup.close_pool(pool, db._settings.close_timeout)
        raise
    stats = pool.get_stats()
    logger.info(
        "pool %r open on %s (%s)",
        pool.name,
        target,
        stats,
        extra=fields("pool_open", pool.name, target=target, stats=stats),
    )
    return runtime


async def close_runtime(db: DBPool, runtime: PoolRuntime) -> None:
    """Close `db`'s pool within its timeouts: leases still out are cancelled and closed."""
    runtime.closing = True
    runtime.line.wake_all()
    for lease in list(runtime.leases):
        logger.warning(
            "pool %r: a connection is still checked out at shutdown (%r); cancelling its "
            "query and closing it. hint: a task outlived its request or lifespan; await "
            "it, or cancel it before shutdown",
            runtime.pool.name,
            lease,
            extra=fields("checked_out_at_shutdown", runtime.pool.name, lease=repr(lease)),
        )
        await _cleanup.cancel_and_close(lease.conn, db._settings.release_timeout)
    if runtime.pinned is not None:
        await runtime.pinned.end(runtime, db._settings.release_timeout)
    await _cleanup.close_pool(runtime.pool, db._settings.close_timeout)
    for conn in list(runtime.returned):  # returns psycopg_pool dropped without closing
        _cleanup.close_now(conn)
    logger.info("pool %r closed", runtime.pool.name, extra=fields("pool_closed", runtime.pool.name))


def _cancel_requests() -> int:
    """How many cancellations of the current task are pending (0 before Python 3.11)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return int(cancelling()) if cancelling else 0


def lifespan(*pools: DBPool) -> Callable[[Any], AbstractAsyncContextManager[dict[str, Any]]]:
    """One lifespan for several pools: ``FastAPI(lifespan=lifespan(primary, replica))``.

    Opens them in order, all or nothing: if one fails to open, those already open are
    closed and the failure (`PoolOpenError` names the pool) ends startup. At shutdown
    closes them all, the last opened first, each within its ``close_timeout``.
    """
    from ._dbpool import DBPool  # which imports this module

    names = [db.name for db in pools]
    if not pools or not all(isinstance(db, DBPool) for db in pools):
        raise ConfigurationError("lifespan() takes one or more DBPool instances.")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise same_name(twice[0])

    @asynccontextmanager
    async def run(app: Any) -> AsyncIterator[dict[str, Any]]:
        async with AsyncExitStack() as stack:
            state: dict[str, Any] = {}
            for db in pools:
                state.update(await stack.enter_async_context(db.lifespan(app)))
            yield state

    return run
