"""Rollback isolation for tests: every checkout shares one connection inside one transaction.

`fastapi_dbpool.testing` binds the pools an app opens during a test (`binding`) to a test
database. With isolation on, the pool opens as usual, then one of its connections is
pinned: BEGIN once, and every checkout of the test (requests, `db.connection()`, health
probes) gets that connection, one at a time, inside a SAVEPOINT of its own. A checkout
whose statements failed is rolled back to its savepoint, so it cannot poison the next
one; `conn.transaction()` and `TransactionDep` become nested savepoints (psycopg does
that inside a transaction). When the test ends, one ROLLBACK discards everything.
"""

from __future__ import annotations

import asyncio
import logging
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio
from psycopg.pq import TransactionStatus
from psycopg_pool import PoolTimeout

from . import _cleanup
from ._connection import GuardedConnection, request_lease
from ._deadline import UNKNOWN_TIMEOUT
from ._log import error, fields

if TYPE_CHECKING:
    from ._state import PoolRuntime

logger = logging.getLogger("fastapi_dbpool")
_SAVEPOINT = "fastapi_dbpool_checkout"
_INTRANS = TransactionStatus.INTRANS
_INERROR = TransactionStatus.INERROR


@dataclass
class Binding:
    """What a test asks of every DBPool opened while it is set (see `binding`)."""

    conninfo: str  # the test database, instead of the DBPool's own
    isolate: bool  # pin one connection and roll everything back at the end
    hint: str = ""  # appended to WrongEventLoopError: how the app was started
    runtimes: list[PoolRuntime] = field(default_factory=list)  # the pools opened under it


#: How many pytest sessions run fastapi_dbpool's plugin in this process (pytester nests them).
plugin_sessions = 0

#: Set by `fastapi_dbpool.testing` around an app's startup; read by `DBPool` when it opens.
binding: ContextVar[Binding | None] = ContextVar("fastapi_dbpool_binding", default=None)


class Pinned:
    """The one connection of an isolated test, handed out one checkout at a time."""

    def __init__(self, conn: GuardedConnection, pool_name: str) -> None:
        self.conn = conn
        self.pool_name = pool_name
        self.lock = asyncio.Lock()
        self.escaped: str | None = None  # how the code under test ended the outer transaction
        self.broken = False

    @classmethod
    async def begin(cls, runtime: PoolRuntime) -> Pinned:
        conn = await runtime.pool.getconn()
        assert isinstance(conn, GuardedConnection)
        await conn.execute("BEGIN")
        return cls(conn, runtime.pool.name)

    async def take(self, timeout: float) -> GuardedConnection:
        """Wait (at most `timeout`) for the connection, and open this checkout's savepoint."""
        try:
            await asyncio.wait_for(self.lock.acquire(), timeout)
        except asyncio.TimeoutError:
            raise PoolTimeout(
                f"the test's one connection was not free within {timeout:g}s. Under rollback "
                "isolation every checkout of a test shares one connection: this code holds a "
                "connection while it waits for another (a request calling db.connection(), "
                "or concurrent requests that wait on each other). Use the dbpool_isolation "
                "fixture's 'database' mode for this test"
            ) from None
        try:
            if self.broken or self.conn.closed:
                raise PoolTimeout(
                    "the test's connection was lost earlier in this test (see the log); "
                    "rollback isolation cannot go on"
                )
            token = request_lease.set(None)  # not yet this request's: no owner check
            try:
                with anyio.CancelScope(shield=True):
                    await self.conn.execute(f"SAVEPOINT {_SAVEPOINT}")
            finally:
                request_lease.reset(token)
        except BaseException:
            self.lock.release()
            raise
        return self.conn

    async def give_back(self, timeout: float) -> bool:
        """End the checkout: keep its work, or roll it back to its savepoint if it failed.

        Shielded, bounded, never raises. Returns whether the connection is still usable.
        """
        conn = self.conn
        try:
            with anyio.move_on_after(timeout, shield=True) as scope:
                try:
                    await self._end_checkout(conn, timeout)
                except Exception as ex:
                    self._break(f"{type(ex).__name__}: {ex}")
            if scope.cancelled_caught:
                self._break(f"ending a checkout took over {timeout:.1f}s")
        finally:
            self.lock.release()
        return not self.broken

    async def _end_checkout(self, conn: GuardedConnection, timeout: float) -> None:
        clean = await _cleanup.quiesce(conn, timeout)
        if conn.closed:
            self._break("the connection was closed")
            return
        if not clean:
            self._break("a conn.transaction() or conn.pipeline() block outlived its checkout")
            return
        status = conn.pgconn.transaction_status
        if status == _INERROR:
            await conn.execute(f"ROLLBACK TO SAVEPOINT {_SAVEPOINT}")
            conn._dbpool_timeout_ms = (
                UNKNOWN_TIMEOUT  # a SET inside it was undone too: set it again
            )
        if status in (_INERROR, _INTRANS):
            try:
                await conn.execute(f"RELEASE SAVEPOINT {_SAVEPOINT}")
                return
            except Exception as ex:  # the code under test released or rolled back past it
                self.escaped = f"{type(ex).__name__}: {ex}"
        else:
            self.escaped = "the transaction was ended (COMMIT, ROLLBACK or conn.commit())"
        # Carry on with a new outer transaction, so the rest of the test runs; the test
        # is failed at its end (`escaped`), because what was committed cannot be undone.
        if conn.pgconn.transaction_status != TransactionStatus.IDLE:
            await conn.execute("ROLLBACK")
        await conn.execute("BEGIN")

    def _break(self, why: str) -> None:
        self.broken = True
        logger.warning(
            "pool %r: the test's pinned connection cannot be used any more (%s); the rest of "
            "the test gets errors. hint: a task of the test still used the connection, or the "
            "server went away",
            self.pool_name,
            why,
            extra=fields("pinned_connection_broken", self.pool_name, reason=str(why)),
        )
        _cleanup.close_now(self.conn)

    async def end(self, runtime: PoolRuntime, timeout: float) -> None:
        """At the end of the test: ROLLBACK everything and give the connection back."""
        conn = self.conn
        with anyio.move_on_after(timeout, shield=True):
            async with self.lock:
                try:
                    if not conn.closed and conn.pgconn.transaction_status != TransactionStatus.IDLE:
                        await conn.execute("ROLLBACK")
                except Exception as ex:
                    logger.warning(
                        "rolling back the test's transaction failed (%r); closing its "
                        "connection, so that PostgreSQL rolls it back. %s",
                        ex,
                        _cleanup.HINT_BROKEN,
                        extra=fields("pinned_rollback_failed", runtime.pool.name, error=error(ex)),
                    )
                    _cleanup.close_now(conn)
        conn._dbpool_timeout_ms = UNKNOWN_TIMEOUT
        runtime.returned.add(conn)
        await _cleanup.give_back(runtime.pool, conn, timeout)
