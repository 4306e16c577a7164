"""Waiting for the server on a connection's socket: psycopg's own loop, without its timer.

psycopg's ``wait_async`` starts an asyncio timer at every wait for the server (one or two
per statement) so as to wake up every ``interval`` (0.1 s), "to allow Ctrl-C". Under
asyncio nothing needs that: the loop handles signals and cancellations while the task
waits. The timer costs a handle, a copy of the request's context, and a heap entry that
stays in the loop's heap, cancelled, for 0.1 s, making every other timer dearer: hundreds
of them at a few thousand requests per second. `wait` runs the same protocol without it.
Waits with a timeout, and a psycopg without the pieces used here, go to psycopg's own.
Both keep psycopg's record of when a wait last gave the loop a turn (``_last_yield``), so
that neither kind of wait starves the loop, nor yields where psycopg's would not.
"""

from __future__ import annotations

import asyncio
from time import monotonic
from typing import Any

from psycopg import errors, waiting
from psycopg.abc import RV, PQGen

_ready: Any = getattr(waiting, "_ready", None)  # a zero-timeout poll of the socket
SUPPORTED = _ready is not None and all(
    hasattr(waiting, name)
    for name in ("WAIT_R", "WAIT_W", "READY_R", "READY_W", "MAX_BUSY_TIME", "_last_yield")
)
if SUPPORTED:
    _WAIT_R, _WAIT_W = waiting.WAIT_R, waiting.WAIT_W
    _READY_R, _READY_W = waiting.READY_R, waiting.READY_W
    _MAX_BUSY_TIME: float = waiting.MAX_BUSY_TIME


async def wait(gen: PQGen[RV], fileno: int) -> RV:
    """Run `gen` to completion, waiting on `fileno` whenever it would block."""
    try:
        state = next(gen)
    except StopIteration as ex:
        # statements that never block still let the rest of the loop run, now and then
        if monotonic() - waiting._last_yield >= _MAX_BUSY_TIME:
            await asyncio.sleep(0)
            waiting._last_yield = monotonic()
        result: RV = ex.value
        return result

    loop = asyncio.get_running_loop()
    ready = 0
    future: asyncio.Future[None] | None = None

    def wakeup(got: int) -> None:
        nonlocal ready
        ready |= got
        if future is not None and not future.done():
            future.set_result(None)

    try:
        while True:
            reader = state & _WAIT_R
            writer = state & _WAIT_W
            if not (reader or writer):
                raise errors.InternalError(f"bad poll status: {state}")
            if writer:
                # A socket asked for writing is nearly always writable: a zero-timeout poll
                # is cheaper than a turn of the loop.
                if monotonic() - waiting._last_yield >= _MAX_BUSY_TIME:
                    await asyncio.sleep(0)
                    waiting._last_yield = monotonic()
                if ready := _ready(fileno, state):
                    state = gen.send(ready)
                    continue
            ready = 0
            if reader:
                loop.add_reader(fileno, wakeup, _READY_R)
            if writer:
                loop.add_writer(fileno, wakeup, _READY_W)
            try:
                future = loop.create_future()
                try:
                    await future
                finally:
                    future = None
                    waiting._last_yield = monotonic()
            finally:
                if reader:
                    loop.remove_reader(fileno)
                if writer:
                    loop.remove_writer(fileno)
            state = gen.send(ready)
    except OSError as ex:
        raise errors.OperationalError("connection socket closed") from ex
    except StopIteration as ex:
        result = ex.value
        return result
