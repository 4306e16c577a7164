"""One transaction around a block: commit when it succeeds, roll back on anything else."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from psycopg import AsyncConnection, AsyncTransaction, Rollback

from . import _cleanup
from ._connection import CLEANUP_TIMEOUT
from ._deadline import RequestControl
from ._interrupted_begin import UNDONE_BY_PSYCOPG, enter
from ._pooler import bound_transaction


@asynccontextmanager
async def transaction(
    conn: AsyncConnection[Any], rollback_timeout: float, control: RequestControl | None = None
) -> AsyncIterator[AsyncConnection[Any]]:
    """BEGIN; COMMIT if the block succeeds; a shielded, bounded ROLLBACK otherwise.

    A failing COMMIT raises (psycopg's error, unwrapped). Cancellation and
    `HTTPException` roll back like any other exception, and propagate. Under
    `CancellationMiddleware` (`control`), a request that is being cancelled (deadline,
    client gone) rolls back even if the block ended normally, and one whose COMMIT has
    begun is no longer cancelled by its deadline: a 504 never comes with committed data.
    """
    tx = await begin(conn, rollback_timeout)
    try:
        if getattr(conn, "_dbpool_local_timeouts", False):
            await bound_transaction(conn)
        yield conn
    except BaseException as exc:
        await _cleanup.roll_back(tx, exc, rollback_timeout)
        raise
    await commit(tx, rollback_timeout, control)


async def begin(conn: AsyncConnection[Any], timeout: float = CLEANUP_TIMEOUT) -> AsyncTransaction:
    """BEGIN (a SAVEPOINT inside a transaction); if interrupted, undone (`_interrupted_begin`)."""
    tx = AsyncTransaction(conn)
    if UNDONE_BY_PSYCOPG:
        await tx.__aenter__()
    else:
        await enter(tx, timeout)
    return tx


async def commit(
    tx: AsyncTransaction, rollback_timeout: float, control: RequestControl | None
) -> None:
    """COMMIT `tx` whose block succeeded, unless its request is being cut (see `transaction`)."""
    if control is not None:
        if control.stopping is not None:
            await _cleanup.roll_back(tx, Rollback(), rollback_timeout)
            return
        control.committing = True
    await tx.__aexit__(None, None, None)
