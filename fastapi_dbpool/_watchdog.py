"""A thread that notices when the event loop stops, and names the code that stopped it.

A handler that calls ``time.sleep``, a blocking driver or heavy CPU work stops the loop, and
with it everything the pool does in the background: idle connections are not reaped,
lifetimes not enforced, health checks and reconnects not run, other requests not served.
From inside the loop nothing can see that; from a thread it is one clock comparison.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import sysconfig
import threading
import time
from types import FrameType
from typing import NamedTuple

from ._log import fields

logger = logging.getLogger("fastapi_dbpool")
_LIBRARY_DIRS = tuple(
    os.path.normcase(os.path.realpath(p))
    for p in {
        sysconfig.get_path("stdlib"),
        sysconfig.get_path("purelib"),
        sysconfig.get_path("platlib"),
    }
    if p
)


class LoopWatchdog:
    """Pings the loop every ``threshold / 4`` seconds from a thread; a ping answered late
    is a stall. One warning per stall, when it ends, naming the code that held the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, threshold: float, name: str) -> None:
        self.loop = loop
        self.threshold = threshold
        self.name = name
        self.stalls = 0
        self.worst_lag = 0.0
        self._loop_thread = threading.get_ident()
        self._answered = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"{name}-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and wait for it (it wakes at least every ``threshold / 4``)."""
        self._stop.set()
        self._answered.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        interval = self.threshold / 4
        while not self._stop.wait(interval):
            self._answered.clear()
            if self._stop.is_set():  # stop() ran just before the clear: its set is undone
                return
            sent = time.monotonic()
            try:
                self.loop.call_soon_threadsafe(self._answered.set)
            except RuntimeError:  # the loop is closed
                return
            if self._answered.wait(self.threshold):
                continue
            where = self._blocking_code()  # the loop is stalled now: look at what it runs
            self._answered.wait()
            if self._stop.is_set():
                return
            self._report(time.monotonic() - sent, where)

    def _blocking_code(self) -> _Place:
        frame = sys._current_frames().get(self._loop_thread)
        return _describe(frame) if frame is not None else _Place("an unknown place", None, None)

    def _report(self, lag: float, where: _Place) -> None:
        self.stalls += 1
        self.worst_lag = max(self.worst_lag, lag)
        logger.warning(
            "the event loop of pool %r was blocked for %.0f ms, in %s; meanwhile no request "
            "was served and the pool could not reap, check or replace connections. hint: "
            "await asyncio.sleep() instead of time.sleep(); run blocking or CPU-heavy calls "
            "with `await anyio.to_thread.run_sync(...)` or loop.run_in_executor()",
            self.name,
            lag * 1000,
            where.text,
            extra=fields(
                "loop_stall",
                self.name,
                lag_seconds=lag,
                where=where.text,
                file=where.file,
                line=where.line,
            ),
        )


class _Place(NamedTuple):
    """Where the loop was stalled: as told in the warning, and the file and line of the
    app's own code there (the innermost frame's when none is the app's)."""

    text: str
    file: str | None
    line: int | None


def _describe(frame: FrameType) -> _Place:
    """The innermost frame, and the innermost one of the app's own code if that differs."""
    innermost = _place(frame)
    f: FrameType | None = frame
    while f is not None:
        if not _is_library(f.f_code.co_filename):
            own = _place(f)
            text = innermost if own == innermost else f"{innermost}, called from {own}"
            return _Place(text, f.f_code.co_filename, f.f_lineno)
        f = f.f_back
    return _Place(innermost, frame.f_code.co_filename, frame.f_lineno)


def _place(frame: FrameType) -> str:
    return f"{frame.f_code.co_name}() at {frame.f_code.co_filename}:{frame.f_lineno}"


def _is_library(filename: str) -> bool:
    path = os.path.normcase(os.path.realpath(filename))
    return path.startswith(_LIBRARY_DIRS) or path.startswith(os.path.dirname(__file__))
