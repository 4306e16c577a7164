"""Giving a checked-out connection back: shielded, bounded, never raising.

A released connection goes, in order of preference: to the checkout that has waited
longest for a hand-over (`_hand_over`), when every connection is out; straight into
psycopg_pool's idle deque (`return_now`), when it needs nothing; or through psycopg_pool's
own return (`_cleanup.give_back`), which resets or discards it. A release cancelled
halfway finishes in a task of its own, so no connection is lost with its slot.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from typing import TYPE_CHECKING, Any

from psycopg_pool import AsyncConnectionPool

from . import _cleanup
from ._connection import GuardedConnection, Lease, LeaseState
from ._hand_over import WaitingLine
from ._metrics import Counters
from ._pinned import Pinned
from ._pool_internals import return_now, stale

if TYPE_CHECKING:
    from ._state import Settings


class Releases:
    """The return path of `PoolRuntime`, which holds the state it reads."""

    pool: AsyncConnectionPool[Any]
    settings: Settings
    loop: asyncio.AbstractEventLoop
    counters: Counters
    leases: set[Lease]
    returned: weakref.WeakSet[GuardedConnection]
    closing: bool
    pinned: Pinned | None
    line: WaitingLine
    direct_return: bool
    out: int
    asking: int
    _background: set[asyncio.Task[bool]]

    def _hand_over(self, conn: GuardedConnection) -> bool:
        """Give `conn` to the first waiting checkout, if there is one and `conn` may go as is."""
        if self.closing or not _cleanup.ready_for_next(conn) or stale(self.pool, conn):
            return False
        return self.line.answer_first(conn)

    def _pass_on(self, conn: GuardedConnection) -> None:
        """A connection handed to a checkout that was cancelled before it could take it."""
        if not self._hand_over(conn):
            self._given_back(conn)
            self._give_back_later(conn)

    def _given_back(self, conn: GuardedConnection) -> None:
        """`conn` is on its way back to psycopg_pool: its slot may be a waiter's to ask for."""
        self.out -= 1
        self._offer_turns()
        if conn._dbpool_returned_to is not self:  # see `returned`
            conn._dbpool_returned_to = self
            self.returned.add(conn)

    def _offer_turns(self) -> None:
        """Tell waiters for a hand-over to ask psycopg_pool while it has a slot nobody asks for.

        A slot not out with us (``max_size - out``) is idle in psycopg_pool, being connected,
        or promised: to a checkout asking psycopg_pool (`asking`) or told to (``line.turns``).
        A slot promised to nobody is a connection psycopg_pool leaves idle while the line
        waits for a release that may never come: after an outage, when every replacement
        connects at once, the line waited out its timeout beside eight idle connections.
        """
        line = self.line
        while line.waiters and self.pool.max_size - self.out > self.asking + line.turns:
            if not line.wake_one():
                break

    async def release(self, lease: Lease) -> None:
        """Give `lease`'s connection back to the pool; shielded, bounded, never raises."""
        if lease.state is not LeaseState.ACTIVE:
            return
        lease.state = LeaseState.RELEASING
        self.counters.held(time.monotonic() - lease.since, lease.route)
        conn = lease.conn
        try:
            if self.pinned is not None:
                healthy = await self.pinned.give_back(self.settings.release_timeout)
            elif self.line.waiters and self.asking:
                # checkouts that waited longer, asking psycopg_pool, are served first (by
                # psycopg_pool); the ones waiting here are told when a slot is left over
                self._given_back(conn)
                healthy = await _cleanup.give_back(self.pool, conn, self.settings.release_timeout)
            elif self.line.waiters and self._hand_over(conn):
                healthy = True
            else:
                self._given_back(conn)
                if (
                    self.direct_return
                    and _cleanup.ready_for_next(conn)
                    and return_now(self.pool, conn)
                ):
                    healthy = True
                else:
                    healthy = await _cleanup.give_back(
                        self.pool, conn, self.settings.release_timeout
                    )
            if not healthy:
                self.counters.discarded_on_release += 1
        except asyncio.CancelledError:
            if self.pinned is not None:
                raise  # its lock is released; the test's final ROLLBACK discards the rest
            # A plain task.cancel() goes through anyio's shield, which holds off only anyio's
            # own cancellation. putconn() does not await (DBPool always sets a reset), so
            # the connection was not handed back yet: finish in a task of its own.
            self._give_back_later(conn)
            raise
        finally:
            if conn._dbpool_lease is lease:
                conn._dbpool_lease = None
            if lease.hold_timer is not None:
                lease.hold_timer.cancel()
                lease.hold_timer = None
            lease.state = LeaseState.ENDED
            self.leases.discard(lease)
            control = lease.control
            if control is not None:
                if control.lease is lease:  # control.drop(), for the request's one lease
                    control.lease = None
                else:
                    control.drop(lease)
            # The request's context keeps its lease (see request_lease) and outlives it in
            # whatever copied it (every timer psycopg starts): keep that small and acyclic.
            lease.task = lease.control = None

    def _give_back_later(self, conn: GuardedConnection) -> None:
        task = self.loop.create_task(
            _cleanup.give_back(self.pool, conn, self.settings.release_timeout),
            name=f"{self.pool.name}-give-back",
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(self._count_late_give_back)

    def _count_late_give_back(self, task: asyncio.Task[bool]) -> None:
        if not task.cancelled() and task.exception() is None and not task.result():
            self.counters.discarded_on_release += 1
