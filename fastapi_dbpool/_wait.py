"""Waiting for the server on a connection's socket: psycopg's own loop, without its timer.

psycopg's ``wait_async`` starts an asyncio timer at every wait for the server (one or two
per statement) so as to wake up every ``interval`` (0.1 s). The timer costs a handle, a
copy of the request's context, and a heap entry that stays in the loop's heap, cancelled,
for 0.1 s, making every other timer dearer: hundreds of them at a few thousand requests
per second. `wait` runs the same protocol without it.

That timer also notices a connection closed under a waiting task (psycopg #608): the
selector silently drops a closed socket, so nothing else would ever wake the task, and
its reader would stay registered on a descriptor number the next connection may get.
Here a close through `GuardedConnection.close` or `_cleanup.close_now` wakes the waiter
at once (`wake_closed`), and one `_Sweep` per loop, a single timer while anything waits,
wakes every 0.1 s the waits whose connection was finished some other way
(``pgconn.finish()``). Either way the task gets psycopg's own ``OperationalError``.

Waits with a timeout, and a psycopg without the pieces used here (looked up, and `_ready`
tried on a socket pair, at import), go to psycopg's own.
Both keep psycopg's record of when a wait last gave the loop a turn (``_last_yield``), so
that neither kind of wait starves the loop, nor yields where psycopg's would not.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import os
import socket
import threading
import weakref
from collections.abc import Callable
from time import monotonic
from typing import Any

from psycopg import AsyncConnection, errors, waiting
from psycopg.abc import RV, PQGen
from psycopg.pq import ConnStatus

from . import _fast_paths

_ready: Any = getattr(waiting, "_ready", None)  # a zero-timeout poll of the socket


def _ready_works() -> bool:
    """Whether psycopg's `_ready` still answers as this module reads it: tried once, at
    import, on a socket pair, not only looked up by name."""
    try:
        a, b = socket.socketpair()
    except OSError:
        return False
    try:
        with a, b:
            idle_r = _ready(a.fileno(), waiting.WAIT_R)
            idle_w = _ready(a.fileno(), waiting.WAIT_W)
            b.send(b"x")
            got = _ready(a.fileno(), waiting.WAIT_R)
    except Exception:
        return False
    return bool(idle_r == 0 and idle_w == waiting.READY_W and got == waiting.READY_R)


SUPPORTED = (
    _fast_paths.ENABLED
    and _ready is not None
    and all(
        hasattr(waiting, name)
        for name in ("WAIT_R", "WAIT_W", "READY_R", "READY_W", "MAX_BUSY_TIME", "_last_yield")
    )
    and isinstance(waiting.MAX_BUSY_TIME, float)
    and isinstance(waiting._last_yield, float)
    and _ready_works()
)
if SUPPORTED:
    _WAIT_R, _WAIT_W = waiting.WAIT_R, waiting.WAIT_W
    _READY_R, _READY_W = waiting.READY_R, waiting.READY_W
    _MAX_BUSY_TIME: float = waiting.MAX_BUSY_TIME
SWEEP_INTERVAL = 0.1  # psycopg's wait interval: how late a finish() under a wait is seen
_BAD = ConnStatus.BAD
_GONE = -1  # what a waiter is woken with when its connection was closed

Wake = Callable[[int], None]


async def wait(gen: PQGen[RV], conn: AsyncConnection[Any]) -> RV:
    """Run `gen` to completion, waiting on `conn`'s socket whenever it would block.

    Raises psycopg's ``OperationalError("connection socket closed")`` if `conn` is closed
    while the task waits.
    """
    # First, as psycopg's own wait does: on a closed connection the generator would find no
    # result and end, so that a stream, say, would stop short instead of raising.
    fileno = conn.pgconn.socket
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
    sweep = _sweep_for(loop)
    ready = 0
    future: asyncio.Future[None] | None = None
    registered = 0  # the directions this wait has a callback registered for, on `fileno`

    def wakeup(got: int) -> None:
        nonlocal ready, registered
        if got == _GONE:
            # Unregister now, before the descriptor number can be reused by a new socket.
            if registered & _WAIT_R:
                loop.remove_reader(fileno)
            if registered & _WAIT_W:
                loop.remove_writer(fileno)
            registered = 0
            ready = _GONE
        elif ready != _GONE:
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
            registered = state
            sweep.waits[conn] = wakeup
            if sweep.timer is None:
                sweep.arm()
            try:
                future = loop.create_future()
                try:
                    await future
                finally:
                    future = None
                    waiting._last_yield = monotonic()
            finally:
                sweep.waits.pop(conn, None)
                if registered & _WAIT_R:
                    loop.remove_reader(fileno)
                if registered & _WAIT_W:
                    loop.remove_writer(fileno)
            if ready == _GONE:  # with an OSError as its cause, as psycopg's own
                raise errors.OperationalError("connection socket closed") from OSError(
                    errno.EBADF, os.strerror(errno.EBADF)
                )
            state = gen.send(ready)
    except OSError as ex:
        raise errors.OperationalError("connection socket closed") from ex
    except StopIteration as ex:
        result = ex.value
        return result


def wake_closed(conn: AsyncConnection[Any]) -> None:
    """`conn` was just closed: wake the task waiting on it, if any, so that it raises."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return  # no loop, no async wait on it either
    wake = _sweep_for(loop).waits.get(conn)
    if wake is not None:
        wake(_GONE)


class _Sweep:
    """The waits in progress on one loop, and the one timer that checks them while any are."""

    __slots__ = ("loop", "timer", "waits")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = weakref.ref(loop)  # a strong one would keep its _sweeps entry forever
        self.waits: dict[AsyncConnection[Any], Wake] = {}
        self.timer: asyncio.TimerHandle | None = None

    def arm(self) -> None:
        loop = self.loop()
        if loop is not None:
            # An empty context: call_later would otherwise keep the arming request's objects.
            self.timer = loop.call_later(SWEEP_INTERVAL, self._tick, context=_CONTEXT)

    def _tick(self) -> None:
        self.timer = None
        for wake in [w for conn, w in self.waits.items() if conn.pgconn.status == _BAD]:
            wake(_GONE)
        if self.waits:
            self.arm()


_CONTEXT = contextvars.Context()
_sweeps: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Sweep] = weakref.WeakKeyDictionary()
_last: _Sweep | None = None  # the one loop most processes have, without a dictionary look-up


_new_sweep = threading.Lock()


def _sweep_for(loop: asyncio.AbstractEventLoop) -> _Sweep:
    global _last
    sweep = _last
    if sweep is None or sweep.loop() is not loop:
        sweep = _sweeps.get(loop)
        if sweep is None:
            with _new_sweep:  # loops of other threads may be asking too
                sweep = _sweeps.setdefault(loop, _Sweep(loop))
        _last = sweep
    return sweep
