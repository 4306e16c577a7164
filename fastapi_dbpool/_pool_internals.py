"""The one place fastapi_dbpool reads and changes psycopg_pool's own bookkeeping.

DBPool always sets a ``reset``, so that psycopg_pool's ``putconn()`` never awaits and a
cancellation cannot land halfway through it (see `DBPool`). The price: every return goes
through a worker task. For a connection that needs nothing (idle, autocommit, nothing
pending, not expired), that task only appends it to the pool's idle deque. `return_now`
does the same in the releasing task, without an await, when no one else is busy inside
the pool: about a thirtieth of an uncontended SELECT request's work. What it touches is
checked once per pool (`can_return_now`); a psycopg_pool laid out otherwise gets
``putconn()`` for every return, as before.

`release_idle_promptly` makes psycopg_pool's periodic shrink close every connection
that was unused for a whole ``max_idle`` period, instead of one per period.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from . import _fast_paths
from ._log import fields

logger = logging.getLogger("fastapi_dbpool")


def can_return_now(pool: AsyncConnectionPool[Any]) -> bool:
    """Whether this psycopg_pool keeps the bookkeeping `return_now` relies on."""
    return _fast_paths.ENABLED and (
        isinstance(getattr(pool, "_pool", None), deque)
        and isinstance(getattr(pool, "_waiting", None), deque)
        and isinstance(getattr(pool, "_lock", None), asyncio.Lock)
        and isinstance(getattr(pool, "_closed", None), bool)
        and isinstance(getattr(pool, "_min_size", None), int)
        and hasattr(pool, "_pool_full_event")
        and isinstance(getattr(pool, "_drained_at", None), float)
    )


def returns_now_as_it_should(pool: AsyncConnectionPool[Any]) -> bool:
    """Whether `return_now` works on this psycopg_pool, tried once at open by behaviour.

    Names and types (`can_return_now`) say the fields are there, not that they mean what
    they did: here psycopg_pool's own public stats must agree with them, and an idle
    connection taken out as ``getconn()`` takes it and given back by `return_now` must be
    counted as available again. Synchronous: nothing else in the pool runs meanwhile.
    """
    if not can_return_now(pool):
        return False
    stats = pool.get_stats()
    if (
        stats.get("pool_available") != len(pool._pool)
        or stats.get("pool_min") != pool._min_size
        or stats.get("requests_waiting", 0) != len(pool._waiting)
    ):
        return False
    if not pool._pool or pool._waiting or pool._lock.locked():
        return True  # nothing to try it on: the fields agree, which is what can be known
    conn = pool._pool.popleft()
    conn._pool = pool  # as psycopg_pool's getconn() leaves it
    taken = pool.get_stats().get("pool_available")
    returned = return_now(pool, conn)
    if not returned:
        pool._pool.appendleft(conn)  # put back as it was: psycopg_pool never saw it leave
        conn._pool = None
    after = pool.get_stats().get("pool_available")
    return returned and taken == len(pool._pool) - 1 and after == len(pool._pool)


def return_now(pool: AsyncConnectionPool[Any], conn: AsyncConnection[Any]) -> bool:
    """What psycopg_pool's return task does for a connection needing no reset; whether done.

    The caller has checked that `conn` is idle and clean (`_cleanup.ready_for_next`).
    Declines (False: use ``putconn()``) when psycopg_pool has more to do than append it:
    the pool closed, its lock held, a client waiting inside it, `conn` not out from it, or
    `conn` due to be closed (`stale`).
    """
    if (
        pool._closed
        or pool._waiting
        or pool._lock.locked()
        or getattr(conn, "_pool", None) is not pool
        or stale(pool, conn)
    ):
        return False
    conn._pool = None  # as psycopg_pool's _add_to_pool does
    pool._pool.append(conn)
    full = pool._pool_full_event
    if full and len(pool._pool) >= pool._min_size:
        full.set()
    return True


def stale(pool: AsyncConnectionPool[Any], conn: AsyncConnection[Any]) -> bool:
    """Whether psycopg_pool would close `conn` on its return (max_lifetime, drain()).

    Reads psycopg_pool's own bookkeeping; if that is not there, every connection is stale:
    each goes back through psycopg_pool, as without the hand-over.
    """
    expire_at = getattr(conn, "_expire_at", None)
    created_at = getattr(conn, "_created_at", None)
    drained_at = getattr(pool, "_drained_at", None)
    if expire_at is None or created_at is None or drained_at is None:
        return True
    return bool(expire_at <= time.monotonic() or created_at <= drained_at)


def idle_connections(pool: AsyncConnectionPool[Any]) -> list[AsyncConnection[Any]]:
    """The connections idle in `pool` now (none known, if psycopg_pool keeps them otherwise)."""
    idle = getattr(pool, "_pool", None)
    return list(idle) if isinstance(idle, deque) else []


def release_idle_promptly(pool: AsyncConnectionPool[Any]) -> bool:
    """Have `pool` shrink to ``min_size`` within two ``max_idle`` periods of a burst's end.

    psycopg_pool closes one connection per ``max_idle`` period, if fewer than all of them
    were in use the whole period: after a burst to 27 connections, the extra ones hold the
    server's slots for hours with ``max_idle`` at 10 minutes. Its bookkeeping already counts
    how many stayed unused the whole period (``_nconns_min``); this closes that many, down
    to ``min_size``, in its place. Whether done: a psycopg_pool laid out otherwise keeps
    its own shrink, one connection per period.
    """
    if not (
        can_return_now(pool)
        and isinstance(getattr(pool, "_nconns", None), int)
        and isinstance(getattr(pool, "_nconns_min", None), int)
        and callable(getattr(pool, "_shrink_pool", None))
        and callable(getattr(pool, "_close_connection", None))
    ):
        return False

    async def shrink_pool() -> None:
        async with pool._lock:
            unused = pool._nconns_min  # fewest idle at once during the period
            surplus = max(min(unused, pool._nconns - pool._min_size, len(pool._pool)), 0)
            to_close = [pool._pool.popleft() for _ in range(surplus)]
            pool._nconns -= surplus
            pool._nconns_min = len(pool._pool)
        if to_close:
            logger.info(
                "pool %r: closing %d connection(s) unused for %s s, keeping %d",
                pool.name,
                surplus,
                pool.max_idle,
                pool._nconns,
                extra=fields(
                    "idle_connections_closed", pool.name, closed=surplus, kept=pool._nconns
                ),
            )
        for conn in to_close:
            await pool._close_connection(conn)

    pool._shrink_pool = shrink_pool  # type: ignore[method-assign]
    return True
