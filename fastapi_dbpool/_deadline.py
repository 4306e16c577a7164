"""A request's time budget, shared by the middleware that enforces it and the pool that obeys it.

`CancellationMiddleware` puts a `RequestControl` in the request's context. Checkouts made in
that context register their leases on it (so the middleware can cancel their queries on the
server) and are bounded by its deadline: the wait for a connection, and each statement
through PostgreSQL's ``statement_timeout``.
"""

from __future__ import annotations

import math
import time
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from fastapi import Depends
from fastapi.dependencies.utils import get_dependant
from fastapi.params import Depends as DependsParam

from ._connection import run_own
from ._env import positive_seconds
from .errors import ConfigurationError

if TYPE_CHECKING:
    from ._connection import GuardedConnection, Lease


class RequestControl:
    """The deadline of one HTTP request and the leases taken on its behalf.

    `CancellationMiddleware` makes one per request (its `Watcher` subclass enforces it).
    """

    __slots__ = (
        "active",
        "cap",
        "committing",
        "deadline",
        "lease",
        "more_leases",
        "ran_out_in_pool",
        "start",
        "stopping",
    )

    def __init__(self, budget: float | None, cap: float | None) -> None:
        self.start = time.monotonic()
        self.cap = cap  # the request's own limit (a gateway's header): routes cannot exceed it
        self.deadline = self._deadline_for(budget)  # math.inf: no deadline
        # Leases taken on the request's behalf: nearly always one, so no set until a second.
        self.lease: Lease | None = None
        self.more_leases: set[Lease] | None = None
        self.active = True  # False once the response is complete: later work is not bounded
        self.stopping: str | None = None  # why the middleware is cancelling the request
        self.committing = False  # a TransactionDep COMMIT has begun: the deadline waits for it
        self.ran_out_in_pool = False  # counted as deadline_exceeded, waiting for a connection

    def _deadline_for(self, budget: float | None) -> float:
        if budget is None:
            return math.inf if self.cap is None else self.start + self.cap
        return self.start + (budget if self.cap is None else min(budget, self.cap))

    def set_budget(self, budget: float | None) -> None:
        """Give the request `budget` seconds from its start (None: no limit but the cap)."""
        self.deadline = self._deadline_for(budget)
        self._deadline_changed()

    def _deadline_changed(self) -> None:
        """Hook for the enforcer of the deadline."""

    def hold(self, lease: Lease) -> None:
        """`lease` was taken on this request's behalf: its statements are the request's."""
        if self.lease is None:
            self.lease = lease
        elif self.more_leases is None:
            self.more_leases = {lease}
        else:
            self.more_leases.add(lease)

    def drop(self, lease: Lease) -> None:
        """`lease` has ended."""
        if self.lease is lease:
            self.lease = None
        elif self.more_leases is not None:
            self.more_leases.discard(lease)

    def held(self) -> list[Lease]:
        """The leases this request holds now."""
        held = [] if self.lease is None else [self.lease]
        if self.more_leases:
            held.extend(self.more_leases)
        return held


current_control: ContextVar[RequestControl | None] = ContextVar(
    "fastapi_dbpool_request_control", default=None
)


def deadline(seconds: float | None) -> DependsParam:
    """A route's time budget, replacing the middleware's default for that route.

    ``@app.get("/report", dependencies=[deadline(120)])``; ``deadline(None)`` lifts the
    limit (a budget sent by the client in the middleware's header still applies). Raises
    `ConfigurationError` at request time if `CancellationMiddleware` is not installed,
    since the budget would otherwise be silently ignored.
    """
    if seconds is not None:
        seconds = positive_seconds("deadline()", seconds, none_allowed=True)

    def route_deadline() -> None:
        control = current_control.get()
        if control is None or not control.active:
            raise ConfigurationError(
                "deadline() needs CancellationMiddleware: add "
                "`app.add_middleware(CancellationMiddleware)` to the app."
            )
        control.set_budget(seconds)

    route_deadline.dbpool_deadline = seconds  # type: ignore[attr-defined]  # (routes_with_deadline)
    dependency: DependsParam = Depends(route_deadline)
    return dependency


def routes_with_deadline(app: Any) -> list[str]:
    """The routes of `app` (``"GET /report"``) that depend on a `deadline`, at any depth.

    Read through FastAPI's public `get_dependant`, from each route's endpoint and its own
    and its routers' ``dependencies``; routers included lazily (FastAPI 0.16x) are
    expanded through their ``effective_route_contexts()``.
    """
    found = []
    for route in _routes(app):
        endpoint = getattr(route, "endpoint", None)
        depends = [getattr(d, "dependency", None) for d in getattr(route, "dependencies", ())]
        calls = [c for c in (endpoint, *depends) if callable(c)]
        path = str(getattr(route, "path", ""))
        if any(_needs_deadline(call, path) for call in calls):
            methods = ",".join(sorted(getattr(route, "methods", None) or ())) or "WS"
            found.append(f"{methods} {path}")
    return found


def _routes(app: Any) -> list[Any]:
    routes: list[Any] = []
    for route in getattr(app, "routes", ()):
        expand = getattr(route, "effective_route_contexts", None)
        routes.extend(expand() if callable(expand) else [route])
    return routes


def _needs_deadline(call: Any, path: str) -> bool:
    if hasattr(call, "dbpool_deadline"):
        return True
    try:
        stack = [get_dependant(path=path, call=call)]
    except Exception:  # not a dependency FastAPI can read: it would fail at startup itself
        return False
    while stack:
        node = stack.pop()
        if hasattr(node.call, "dbpool_deadline"):
            return True
        stack.extend(node.dependencies)
    return False


UNKNOWN_TIMEOUT = -1  # statement_timeout as set on the server is not known: set it again
STATEMENT_TIMEOUT_MARGIN = 0.1


def _timeout_ms(remaining: float) -> tuple[int, int]:
    """The statement_timeout for `remaining` seconds, and the step it was rounded up to.

    A little later than the deadline, so that the middleware (which answers 504) acts
    first; rounded up, so that a connection serving requests of one budget keeps its
    setting and needs no SET.
    """
    step, steps = _rounded(remaining)
    step_ms = round(step * 1000)
    return max(1, steps * step_ms), step_ms


def statement_timeout_ms(remaining: float) -> int:
    """The statement_timeout (ms) that bounds a statement by `remaining` seconds."""
    return _timeout_ms(remaining)[0]


def _rounded(remaining: float) -> tuple[float, int]:
    """The step `remaining` (plus the margin) is rounded in, and how many steps it rounds up to."""
    remaining += STATEMENT_TIMEOUT_MARGIN
    step = 1.0 if remaining >= 10 else 0.1
    return step, math.ceil(round(remaining / step, 6))


def _bucket(remaining: float) -> tuple[float, float]:
    """The budgets, around `remaining`, that `_timeout_ms` rounds to the same setting."""
    step, k = _rounded(remaining)
    low = max((k - 1) * step, 10.0) if step == 1.0 else (k - 1) * step
    # a hair inside the step, where the rounding above cannot disagree
    return low - STATEMENT_TIMEOUT_MARGIN + 1e-6, k * step - STATEMENT_TIMEOUT_MARGIN - 1e-6


def timeout_fits(conn: GuardedConnection, remaining: float) -> bool:
    """Whether `conn`'s statement_timeout is already right for `remaining` seconds.

    Checked without a call to the server, and without awaiting: requests of one budget
    fall in the same step, and this is every checkout's question.
    """
    fits = conn._dbpool_timeout_fits
    return fits is not None and fits[0] == conn._dbpool_timeout_ms and fits[1] < remaining < fits[2]


async def apply_statement_timeout(conn: GuardedConnection, remaining: float | None) -> None:
    """Bound each statement on `conn` by `remaining` seconds, or restore the session's own.

    The session's own value (connection options, role or database settings, `configure`)
    is read once per connection; a deadline never loosens it. Budgets that need the same
    setting are remembered for `timeout_fits`.
    """
    if remaining is None:
        if conn._dbpool_timeout_ms != conn._dbpool_base_timeout_ms:
            await _set(conn, conn._dbpool_base_timeout_ms)
        return
    if conn._dbpool_base_timeout_ms is None:
        cur = await run_own(
            conn, "SELECT setting::bigint FROM pg_settings WHERE name = 'statement_timeout'"
        )
        row: Any = await cur.fetchone()
        conn._dbpool_base_timeout_ms = conn._dbpool_timeout_ms = int(row[0])
    want, step_ms = _timeout_ms(remaining)
    base = conn._dbpool_base_timeout_ms
    if base:
        want = min(want, base)
    current = conn._dbpool_timeout_ms
    # Keep a setting that is late enough and at most one step later than wanted: requests
    # that waited a little longer for the pool straddle a step, and a SET each time would
    # cost a round trip per request.
    if current is not None and current != UNKNOWN_TIMEOUT:
        late_enough = want <= current <= want + step_ms
        if late_enough and (not base or current <= base):
            conn._dbpool_timeout_fits = (current, *_bucket(remaining))
            return
    await _set(conn, want)
    conn._dbpool_timeout_fits = (want, *_bucket(remaining))


async def _set(conn: GuardedConnection, ms: int | None) -> None:
    if ms is None:
        return
    # if the SET is interrupted, the next checkout sets it again
    conn._dbpool_timeout_ms = UNKNOWN_TIMEOUT
    await run_own(conn, f"SET statement_timeout = {int(ms)}")
    conn._dbpool_timeout_ms = ms
