"""The middleware's shared deadline clock: never early, at most one resolution late."""

import asyncio
import contextvars
import math
import time

import pytest

from fastapi_dbpool._clock import RESOLUTION, Clock

pytestmark = pytest.mark.anyio


class Item:
    def __init__(self, at: float) -> None:
        self.at = at
        self.called: list[float] = []

    def due(self) -> None:
        self.called.append(time.monotonic())


async def test_an_item_is_never_due_before_its_time_even_in_the_next_slot() -> None:
    """The tick for one slot also popped the next one (it rounded the time up), calling
    items up to 10 ms early; the middleware's Watcher then spun, re-adding itself, until
    its deadline came, and beat the pool's own acquire timeout to it."""
    clock = Clock(asyncio.get_running_loop())
    base = (math.floor(time.monotonic() / RESOLUTION) + 3) * RESOLUTION
    first = Item(base - RESOLUTION / 20)  # the last moment of one slot
    second = Item(base + RESOLUTION * 0.9)  # late in the very next slot
    for item in (first, second):
        clock.add(item.at, item)
    await asyncio.sleep(base + 2 * RESOLUTION - time.monotonic() + 0.02)
    for item in (first, second):
        assert len(item.called) == 1
        assert item.called[0] >= item.at
        assert item.called[0] - item.at < RESOLUTION + 0.05  # late by a slot at most (+ slack)


async def test_items_are_due_outside_the_context_of_whoever_armed_the_timer() -> None:
    """The timer copied the context of the request that armed it: that request's objects
    stayed alive until the tick, and every other request's deadline ran in its context."""
    var: contextvars.ContextVar[str] = contextvars.ContextVar("request", default="none")
    seen: list[str] = []

    class Seen(Item):
        def due(self) -> None:
            seen.append(var.get())

    clock = Clock(asyncio.get_running_loop())
    var.set("the first request")
    clock.add(time.monotonic() + RESOLUTION, Seen(0))
    await asyncio.sleep(3 * RESOLUTION + 0.02)
    assert seen == ["none"]


async def test_the_timer_waits_for_the_first_slot_still_in_use() -> None:
    """The timer fired at every slot, even one whose requests had all ended (nearly every
    slot): always pending, it stood first in the loop's heap of timers, where it kept
    asyncio from dropping cancelled timers early (psycopg's, each holding a finished
    request's context), so every request's objects lived on and were promoted by the GC."""
    clock = Clock(asyncio.get_running_loop())
    start = time.monotonic()
    ended = [Item(start + RESOLUTION * k) for k in range(1, 6)]
    running = Item(start + 0.3)
    slots = [clock.add(item.at, item) for item in ended]
    clock.add(running.at, running)
    for slot, item in zip(slots, ended, strict=True):
        slot.discard(item)
    await asyncio.sleep(2 * RESOLUTION + 0.02)  # the first slot came, and was empty
    timer = clock._timer
    assert timer is not None
    assert timer.when() >= asyncio.get_running_loop().time() + 0.3 - 3 * RESOLUTION - 0.05
    await asyncio.sleep(running.at - time.monotonic() + 2 * RESOLUTION)
    assert len(running.called) == 1
    assert running.called[0] >= running.at
    assert not any(item.called for item in ended)


async def test_an_item_may_take_another_out_of_its_slot_as_it_is_due() -> None:
    """Items leave by discarding themselves from the set `add` returned. The tick iterated
    over that very set: when one item's due() took another out of it, the tick raised "Set
    changed size during iteration", and the clock never armed its timer again."""
    clock = Clock(asyncio.get_running_loop())
    at = time.monotonic() + RESOLUTION

    class Leaver(Item):
        other: Item

        def due(self) -> None:
            super().due()
            slot.discard(self.other)

    first, second = Leaver(at), Leaver(at)
    first.other, second.other = second, first
    slot = clock.add(at, first)
    assert clock.add(at, second) is slot
    later = Item(at + 3 * RESOLUTION)
    clock.add(later.at, later)
    await asyncio.sleep(later.at - time.monotonic() + 2 * RESOLUTION + 0.02)
    assert len(first.called) + len(second.called) == 1  # whichever came first took the other
    assert len(later.called) == 1
