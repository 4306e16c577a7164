"""A pool that must write (``DBPool(writable=True)``) never serves a read-only server.

After a failover the old primary is gone, and a multi-host URL
(``host=h1,h2&target_session_attrs=any``) lands on whichever server answers, perhaps a
standby: every write would fail with SQLSTATE 25006 while ``/readyz`` stays green. A
writable pool checks each new connection (``SHOW transaction_read_only``, one round trip
per connect, the same test as libpq's ``target_session_attrs=read-write``) and refuses a
read-only one, so psycopg_pool retries, with its backoff, until the writable server
answers. A statement that fails as read-only on a connection made before the failover
drains the pool: every connection is replaced, through the same check.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import Any

import psycopg
from psycopg import AsyncConnection, errors
from psycopg_pool import AsyncConnectionPool

from ._connection import run_own
from ._log import error, fields

logger = logging.getLogger("fastapi_dbpool")

READ_ONLY = "connected server is read-only"
_draining: weakref.WeakSet[AsyncConnectionPool[Any]] = weakref.WeakSet()
_tasks: set[asyncio.Task[None]] = set()  # referenced until done (the loop holds weak refs)


async def is_read_only(conn: AsyncConnection[Any]) -> bool:
    """Whether the server behind `conn` refuses writes (a standby, or read-only by default)."""
    row = await (await run_own(conn, "SHOW transaction_read_only")).fetchone()
    return row is not None and row[0] == "on"


async def refuse_read_only(conn: AsyncConnection[Any]) -> None:
    """Close `conn` and raise `psycopg.OperationalError` if its server is read-only."""
    if await is_read_only(conn):
        await conn.close()
        raise psycopg.OperationalError(
            f"{READ_ONLY} (a standby, or default_transaction_read_only is on), and this "
            "pool is writable=True; retrying until the primary answers"
        )


def saw(pool: AsyncConnectionPool[Any], exc: BaseException | None) -> None:
    """A statement of writable `pool` raised `exc`: if it is 25006, replace every connection.

    The pool may hold connections to a server demoted since they were made; the
    statement's own connection is among them. Draining is idempotent and runs once at a
    time, in a task of its own (the caller may be cancelled, the request goes on failing).
    """
    if isinstance(exc, errors.ReadOnlySqlTransaction):
        replace_all(pool, "a statement failed because the server is read-only (SQLSTATE 25006)")


def replace_all(pool: AsyncConnectionPool[Any], why: str) -> None:
    """Close every connection of `pool` and make new ones (checked to be writable)."""
    drain = getattr(pool, "drain", None)  # psycopg_pool >= 3.2
    if drain is None or pool in _draining:
        return
    logger.warning(
        "pool %r: %s; replacing every connection, each checked to be writable. hint: the "
        "primary failed over, or the URL points at a standby",
        pool.name,
        why,
        extra=fields("read_only_drain", pool.name, reason=str(why)),
    )
    _draining.add(pool)

    async def run() -> None:
        try:
            await drain()
        except Exception as ex:  # a closing pool: nothing left to replace
            logger.debug(
                "pool %r: drain after a read-only error failed: %r",
                pool.name,
                ex,
                extra=fields("read_only_drain_failed", pool.name, error=error(ex)),
            )
        finally:
            _draining.discard(pool)

    task = asyncio.get_running_loop().create_task(run(), name=f"{pool.name}-drain")
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
