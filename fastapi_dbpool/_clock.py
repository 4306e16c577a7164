"""One coarse timer for many deadlines (requests', waits for a connection), not one timer each.

An asyncio timer per request costs more than everything else the middleware does for a
fast request (a handle, a copy of the context, a heap entry left behind when cancelled).
Here an item joins a 10 ms slot, leaves it in O(1), and one timer serves the earliest slot.
"""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import math
import time
from typing import Protocol

RESOLUTION = 0.01  # seconds: a deadline fires at most this late


class Due(Protocol):
    def due(self) -> None: ...


class Clock:
    """Calls ``item.due()`` once the slot an item was added to has come."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._slots: dict[int, set[Due]] = {}
        self._order: list[int] = []  # a heap of the keys of `_slots`
        self._timer: asyncio.TimerHandle | None = None
        self._timer_slot = math.inf
        # call_later() would copy the context of whichever request armed the timer, keeping
        # that request's objects alive until the tick and running every item's due() in it.
        self._context = contextvars.Context()

    def add(self, at: float, item: Due) -> set[Due]:
        """Call `item.due()` at about `at` (time.monotonic()).

        Returns the slot's items: ``slot.discard(item)`` takes the item out again, with no
        call into the clock (every request does it, nearly always before its slot comes).
        """
        slot = math.ceil(at / RESOLUTION)
        items = self._slots.get(slot)
        if items is None:
            items = self._slots[slot] = set()
            heapq.heappush(self._order, slot)
        items.add(item)
        if slot < self._timer_slot:
            self._arm(slot)
        return items

    def _arm(self, slot: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_slot = slot
        self._timer = self.loop.call_later(
            max(slot * RESOLUTION - time.monotonic(), 0.0), self._tick, context=self._context
        )

    def _tick(self) -> None:
        self._timer, self._timer_slot = None, math.inf
        # slot k holds the items due in ((k-1)*R, k*R]: only a slot whose end has passed is due
        now = math.floor(time.monotonic() / RESOLUTION)
        order, slots = self._order, self._slots
        while order and order[0] <= now:
            items = slots.pop(heapq.heappop(order))
            while items:  # an item's due() may take another out of this very slot
                items.pop().due()
        # Aim at the first slot still in use, not the next one: most requests end long
        # before they are due, and a timer that fired every slot would stand, always
        # pending, first in the loop's heap of timers, where it keeps asyncio from dropping
        # cancelled timers early (psycopg's, each holding a finished request's context).
        while order and not slots[order[0]]:
            del slots[heapq.heappop(order)]
        if order:
            self._arm(order[0])
