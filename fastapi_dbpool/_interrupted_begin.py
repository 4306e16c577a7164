"""A transaction's BEGIN interrupted by a cancellation, undone where psycopg does not.

Entering a transaction block counts it as open before its BEGIN (or SAVEPOINT) is sent.
If a cancellation lands while that statement runs, ``__aexit__`` never runs: psycopg
before 3.3.7 leaves the connection in the transaction and the block counted as open, and
the next user of the connection gets a SAVEPOINT where a BEGIN belongs (psycopg 3.3.7
undoes the enter itself). Under the
package a cancellation can land there on any request, so on those releases `enter` does
what 3.3.7 does, through the transaction's own ``__aexit__``; and `GuardedConnection`
takes `transaction` from here, so that a user's ``conn.transaction()`` is undone the
same way.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from psycopg import AsyncConnection, AsyncTransaction

from . import _cleanup

#: whether psycopg undoes an interrupted enter itself (3.3.7 and later)
UNDONE_BY_PSYCOPG = tuple(int(n) for n in re.findall(r"\d+", psycopg.__version__)[:3]) >= (
    3,
    3,
    7,
)


async def enter(tx: AsyncTransaction, timeout: float) -> None:
    """``tx.__aenter__()``; if that is interrupted, undone (shielded, bounded) before the
    exception goes on."""
    try:
        await tx.__aenter__()
    except BaseException as exc:
        if not UNDONE_BY_PSYCOPG and tx.connection.pgconn.status == psycopg.pq.ConnStatus.OK:
            await _cleanup.roll_back(tx, exc, timeout)
        raise


@asynccontextmanager
async def transaction(
    conn: AsyncConnection[Any],
    timeout: float,
    savepoint_name: str | None = None,
    force_rollback: bool = False,
) -> AsyncIterator[AsyncTransaction]:
    """psycopg's ``conn.transaction()``, its enter undone if interrupted (psycopg < 3.3.7).

    In pipeline mode it is psycopg's own, which also syncs the pipeline around the block.
    """
    if conn.pgconn.pipeline_status:
        async with AsyncConnection.transaction(conn, savepoint_name, force_rollback) as tx:
            yield tx
        return
    tx = AsyncTransaction(conn, savepoint_name, force_rollback)
    await enter(tx, timeout)
    try:
        yield tx
    except BaseException as exc:
        if not await tx.__aexit__(type(exc), exc, exc.__traceback__):
            raise
    else:
        await tx.__aexit__(None, None, None)
