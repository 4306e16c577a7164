"""One transaction around a block: commit when it succeeds, roll back on anything else."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from psycopg import AsyncConnection, AsyncTransaction, Rollback

from . import _cleanup
from ._deadline import RequestControl


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
    tx = AsyncTransaction(conn)
    await tx.__aenter__()
    try:
        yield conn
    except BaseException as exc:
        await _cleanup.roll_back(tx, exc, rollback_timeout)
        raise
    if control is not None:
        if control.stopping is not None:
            abandoned = Rollback()
            await _cleanup.roll_back(tx, abandoned, rollback_timeout)
            return
        control.committing = True
    await tx.__aexit__(None, None, None)
