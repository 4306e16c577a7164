"""The line of checkouts waiting for a connection handed over by a release.

While every connection of a pool is out, a release gives its connection straight to the
first waiting checkout instead of through psycopg_pool (putconn, a worker task, the
pool's lock, a waiting client's wait_for task): a third of the pool's cost per request
under load. `PoolRuntime` decides when a connection may be handed over; this line keeps
the waiting checkouts in order and ends their waits in time.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from psycopg_pool import PoolTimeout, TooManyRequests

from ._clock import Clock

if TYPE_CHECKING:
    from ._connection import GuardedConnection

_TIMED_OUT: Any = object()  # what a waiter's future holds when its time ran out


class WaitingLine:
    """Checkouts waiting for a hand-over, first come first served.

    A waiter's future is answered with a connection, or with None: "ask psycopg_pool"
    (it has a slot nobody asks for: see `Releases._offer_turns`).
    """

    __slots__ = ("clock", "count", "loop", "name", "on_abandoned", "turns", "waiters")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        name: str,
        on_abandoned: Callable[[GuardedConnection], None],
    ) -> None:
        self.loop = loop
        self.name = name
        # a connection handed to a checkout cancelled before it could take it
        self.on_abandoned = on_abandoned
        self.waiters: deque[asyncio.Future[GuardedConnection | None]] = deque()
        self.count = 0  # checkouts waiting now
        self.turns = 0  # waiters told to ask psycopg_pool that have not asked yet
        # Ends the waits in time: under load, nearly every checkout waits, and an asyncio
        # timer each (a handle, a heap entry left behind when cancelled) cost more than
        # the rest of the hand-over.
        self.clock = Clock(loop)

    async def wait(
        self, deadline: float, limit: float, max_waiting: int
    ) -> GuardedConnection | None:
        """Wait until `deadline` for a connection, or for the turn to ask psycopg_pool.

        `PoolTimeout` when the time runs out; `TooManyRequests` past `max_waiting`.
        """
        if max_waiting and self.count >= max_waiting:
            raise TooManyRequests(
                f"the pool {self.name!r} already has {self.count} requests waiting"
            )
        waiter: asyncio.Future[GuardedConnection | None] = self.loop.create_future()
        self.waiters.append(waiter)
        self.count += 1
        expiry = _Expiry(waiter)
        slot = self.clock.add(deadline, expiry)
        try:
            conn = await waiter
        except BaseException:
            # Cancelled, perhaps just after a release handed this waiter its connection
            # or its turn: pass either on, or a pool slot is lost.
            if waiter.done() and not waiter.cancelled():
                got = waiter.result()
                if got is not None and got is not _TIMED_OUT:
                    self.on_abandoned(got)
                elif got is None:
                    self.turns -= 1
                    self.wake_one()
            raise
        finally:
            slot.discard(expiry)
            self.count -= 1
        if conn is None:
            self.turns -= 1  # the caller asks psycopg_pool now, before it awaits anything
        elif conn is _TIMED_OUT:
            raise PoolTimeout(f"couldn't get a connection after {limit:.2f} sec")
        return conn

    def answer_first(self, answer: GuardedConnection | None) -> bool:
        """Give `answer` (a connection, or None: ask psycopg_pool) to the first waiter left."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():  # done: its time ran out, or it was cancelled
                waiter.set_result(answer)
                if answer is None:
                    self.turns += 1
                return True
        return False

    def wake_one(self) -> bool:
        """Tell the first waiter left to ask psycopg_pool; whether there was one."""
        return self.answer_first(None)

    def wake_all(self) -> None:
        """At shutdown: every waiting checkout asks psycopg_pool, which refuses it."""
        while self.answer_first(None):
            pass


class _Expiry:
    """Ends one wait for a hand-over at its deadline (a `Clock` item)."""

    __slots__ = ("waiter",)

    def __init__(self, waiter: asyncio.Future[Any]) -> None:
        self.waiter = waiter

    def due(self) -> None:
        if not self.waiter.done():
            self.waiter.set_result(_TIMED_OUT)
