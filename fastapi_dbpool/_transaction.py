"""One transaction around a block: commit when it succeeds, roll back on anything else."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from psycopg import AsyncConnection, AsyncTransaction

from . import _cleanup


@asynccontextmanager
async def transaction(
    conn: AsyncConnection[Any], rollback_timeout: float
) -> AsyncIterator[AsyncConnection[Any]]:
    """BEGIN; COMMIT if the block succeeds; a shielded, bounded ROLLBACK otherwise.

    A failing COMMIT raises (psycopg's error, unwrapped). Cancellation and
    `HTTPException` roll back like any other exception, and propagate.
    """
    tx = AsyncTransaction(conn)
    await tx.__aenter__()
    try:
        yield conn
    except BaseException as exc:
        await _cleanup.roll_back(tx, exc, rollback_timeout)
        raise
    await tx.__aexit__(None, None, None)
