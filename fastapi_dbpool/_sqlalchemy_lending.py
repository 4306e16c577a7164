"""How SQLAlchemy's engine gets, shares and gives back a lease's connection.

`fastapi_dbpool.sqlalchemy.Sessions` lends SQLAlchemy the psycopg connection of a lease:
`lend` is the engine's ``async_creator``, `acting_for` lets SQLAlchemy's own cleanup
tasks act for the lease's owner, `may_commit` refuses a final COMMIT to a request being
cut, and `restore` puts back what SQLAlchemy changed on the connection.
"""

from __future__ import annotations

import asyncio
import os
from contextvars import ContextVar
from typing import Any

import sqlalchemy.ext.asyncio
from psycopg.pq import TransactionStatus

from ._connection import Lease, request_lease
from .errors import ConfigurationError, ConnectionReleasedError, DBPoolError

#: the connection SQLAlchemy's engine is being lent (set around `engine.connect()`)
lent: ContextVar[Any] = ContextVar("fastapi_dbpool_sqlalchemy_lent", default=None)

# SQLAlchemy's async context managers end in a task of their own (_run_to_completion):
# AsyncSession.close, AsyncConnection.close, AsyncResult.close, and async_sessionmaker's
# begin(), whose coroutine is named "go". Such a task may act for the request that
# awaits it; any other task is refused as before.
_SQLALCHEMY_ASYNCIO = os.path.dirname(sqlalchemy.ext.asyncio.__file__) + os.sep
_CLEANUP_NAMES = frozenset({"close", "go"})
_AWAIT_DEPTH = 100  # coroutines from the task's root to the endpoint's await, and beyond


def acting_for(lease: Lease) -> bool:
    """Whether the running task is SQLAlchemy's cleanup task that `lease`'s owner awaits
    now (its ``_run_to_completion``): only then does it act for the owner."""
    task = asyncio.current_task()
    owner = lease.task
    if task is None or owner is None:
        return False
    code = getattr(task.get_coro(), "cr_code", None)
    if code is None or code.co_name not in _CLEANUP_NAMES:
        return False
    awaiting: Any = owner.get_coro()
    for _ in range(_AWAIT_DEPTH):
        code = getattr(awaiting, "cr_code", None)
        if code is None:
            return False  # the owner awaits something else (a gather, another task)
        if code.co_name == "_run_to_completion" and code.co_filename.startswith(
            _SQLALCHEMY_ASYNCIO
        ):
            frame = awaiting.cr_frame
            return frame is not None and frame.f_locals.get("task") is task
        awaiting = awaiting.cr_await
    return False


async def lend() -> Any:
    conn = lent.get()
    if conn is None and request_lease.get() is not None:
        raise ConnectionReleasedError()  # a session of a request that has ended
    if conn is None:
        raise ConfigurationError(
            "This engine connects only through fastapi_dbpool.sqlalchemy.Sessions: use "
            "SessionDep or CoreDep in a request, and `async with orm.session():` or "
            "`async with orm.connect():` outside one."
        )
    return conn


def may_commit(lease: Lease) -> bool:
    """Whether the block's work may commit now: not while its request is being cut (a 504
    never comes with committed data), and once begun, its deadline waits for the COMMIT."""
    control = lease.control
    if control is None:
        return True
    if control.stopping is not None:
        return False  # rolled back as the connection is let go
    control.committing = True
    return True


def changed(conn: Any, isolation_level: Any, read_only: Any, deferrable: Any) -> bool:
    """Whether SQLAlchemy left `conn` with other transaction settings than the lease's."""
    return bool(
        conn.isolation_level != isolation_level
        or conn.read_only != read_only
        or conn.deferrable != deferrable
    )


async def restore(conn: Any, isolation_level: Any, read_only: Any, deferrable: Any) -> None:
    """Put back what the lease had (no round trip: psycopg applies them at the next BEGIN)."""
    if conn.closed or conn.info.transaction_status != TransactionStatus.IDLE:
        return  # the release closes or resets it
    if conn.isolation_level != isolation_level:
        await conn.set_isolation_level(isolation_level)
    if conn.read_only != read_only:
        await conn.set_read_only(read_only)
    if conn.deferrable != deferrable:
        await conn.set_deferrable(deferrable)


def unwrap_own_errors(context: Any) -> BaseException | None:
    """The package's own errors (a lost connection's 503...) reach the app as themselves,
    not wrapped in SQLAlchemy's, so that their handlers and status codes apply."""
    original = context.original_exception
    return original if isinstance(original, DBPoolError) else None
