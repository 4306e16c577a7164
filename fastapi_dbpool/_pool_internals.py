"""The one place fastapi_dbpool reads and changes psycopg_pool's own bookkeeping.

DBPool always sets a ``reset``, so that psycopg_pool's ``putconn()`` never awaits and a
cancellation cannot land halfway through it (see `DBPool`). The price: every return goes
through a worker task. For a connection that needs nothing (idle, autocommit, nothing
pending, not expired), that task only appends it to the pool's idle deque. `return_now`
does the same in the releasing task, without an await, when no one else is busy inside
the pool: about a thirtieth of an uncontended SELECT request's work. What it touches is
checked once per pool (`can_return_now`); a psycopg_pool laid out otherwise gets
``putconn()`` for every return, as before.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool


def can_return_now(pool: AsyncConnectionPool[Any]) -> bool:
    """Whether this psycopg_pool keeps the bookkeeping `return_now` relies on."""
    return (
        isinstance(getattr(pool, "_pool", None), deque)
        and isinstance(getattr(pool, "_waiting", None), deque)
        and isinstance(getattr(pool, "_lock", None), asyncio.Lock)
        and isinstance(getattr(pool, "_closed", None), bool)
        and isinstance(getattr(pool, "_min_size", None), int)
        and hasattr(pool, "_pool_full_event")
        and isinstance(getattr(pool, "_drained_at", None), float)
    )


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
