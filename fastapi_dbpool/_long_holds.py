"""Connections held too long, named before they starve the pool (``DBPool(hold_warning=)``).

A connection that a request or a job keeps far longer than its work needs (a slow
external call made while holding it, a task that forgot it) is otherwise only seen once
every connection is out, in the exhaustion warning. With a threshold set, each checkout
arms one timer; a checkout still out when it fires is logged once: how long, by which
route, and where in the app's code it was taken. Off by default: with it, each checkout
also walks its caller's stack to find that place.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import sys
import time

from ._connection import Lease, LeaseState
from ._log import fields

logger = logging.getLogger("fastapi_dbpool")
_CONTEXT = contextvars.Context()  # the timer keeps none of the request's objects
_AROUND = ("fastapi", "starlette", "anyio")
#: frames under these directories are the machinery around the app's code (the package,
#: FastAPI, Starlette, anyio, the standard library), not where the app took a connection
_MACHINERY = tuple(
    os.path.dirname(path) + os.sep
    for path in (
        __file__,
        contextlib.__file__,
        *(getattr(sys.modules.get(name), "__file__", None) for name in _AROUND),
    )
    if path
)


def taken_at() -> str | None:
    """``file:line in function`` of the app's code that is taking a connection, if any."""
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_code.co_filename
        if not name.startswith(_MACHINERY) and not name.startswith("<frozen"):
            return f"{name}:{frame.f_lineno} in {frame.f_code.co_name}"
        frame = frame.f_back  # type: ignore[assignment]
    return None


def watch(lease: Lease, threshold: float, pool: str, for_request: bool) -> asyncio.TimerHandle:
    """Arm the timer that names `lease` if it is still out after `threshold` seconds.

    A request's own connection is taken by FastAPI's dependency machinery, before the
    endpoint runs: its route says more than any frame; other checkouts (``db.connection()``)
    are named by the app's code that asked.
    """
    where = None if for_request else taken_at()

    def fired() -> None:  # the release cancels the timer, and with it this reference
        held = lease
        if held.state is not LeaseState.ACTIVE:
            return
        logger.warning(
            "pool %r: a connection has been held for %.1fs (hold_warning=%gs) by %s%s; it is "
            "still out. hint: release it sooner (no slow calls or waits while holding it), "
            "or raise hold_warning if this route needs that long",
            pool,
            time.monotonic() - held.since,
            threshold,
            held.route or "work outside a request",
            f", taken at {where}" if where else "",
            extra=fields("long_hold", pool, route=held.route, taken_at=where),
        )

    return asyncio.get_running_loop().call_later(threshold, fired, context=_CONTEXT)
