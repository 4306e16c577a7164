"""Run by test_internals_fallback in a fresh interpreter: psycopg and psycopg_pool are
changed *before* fastapi_dbpool is imported, as a future release might change them."""

import asyncio
import inspect
import sys
from typing import Any

import psycopg
import psycopg_pool
from psycopg import AsyncConnection, waiting

original_wait = AsyncConnection.wait


async def wait_without_interval(self: Any, gen: Any, **kwargs: Any) -> Any:
    kwargs.pop("interval", None)  # what psycopg itself passes is kept (timeout from 3.3.9)
    return await original_wait(self, gen, **kwargs)


AsyncConnection.wait = wait_without_interval  # type: ignore[assignment]
if hasattr(waiting, "_ready"):  # absent before psycopg 3.3.9 already
    del waiting._ready
pool_init = psycopg_pool.AsyncConnectionPool.__init__


def pool_laid_out_otherwise(self: Any, *args: Any, **kwargs: Any) -> None:
    pool_init(self, *args, **kwargs)
    self._drained_at = 0  # an int: not the float that return_now checks for


psycopg_pool.AsyncConnectionPool.__init__ = pool_laid_out_otherwise  # type: ignore[method-assign]
assert "interval" not in inspect.signature(AsyncConnection.wait).parameters

from fastapi import FastAPI  # noqa: E402

from fastapi_dbpool import DBPool, _connection, _wait  # noqa: E402


async def main(url: str) -> None:
    assert not _wait.SUPPORTED
    assert not _connection.FAST_WAIT
    db = DBPool(url, min_size=1, max_size=1, name="fallback")
    async with db.lifespan(FastAPI()):
        assert not db._running().direct_return
        assert not db._running().hand_over
        assert "_shrink_pool" not in vars(db._running().pool)  # psycopg_pool's own shrink
        for n in range(5):
            async with db.connection() as conn:
                assert await (await conn.execute("SELECT %s::int", (n,))).fetchone() == (n,)
        pids: list[int] = []

        async def sleep() -> None:
            async with db.connection() as conn:
                pids.append(conn.info.backend_pid)
                await conn.execute("SELECT pg_sleep(5)")

        task = asyncio.create_task(sleep())
        await asyncio.sleep(0.5)
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, psycopg.Error) as ex:
            print("cancelled:", type(ex).__name__)
        async with db.connection() as conn:
            pid = pids[0]
            print("same backend:", conn.info.backend_pid == pid)
            assert await (await conn.execute("SELECT 1")).fetchone() == (1,)
    print("ok")


asyncio.run(main(sys.argv[1]))
