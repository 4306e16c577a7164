"""CancellationMiddleware: stop a request, and its queries, at its deadline or when its client goes.

uvicorn never cancels a handler whose client hung up, and a cancelled handler's query runs on
in PostgreSQL unless someone cancels it there. This middleware watches both, and when one
happens it cancels on the server the statement running on every connection the request holds,
then cancels the request's own scope; the pool's shielded release does the rest.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from typing import Any

import anyio
from psycopg.errors import QueryCanceled
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from ._clock import Clock
from ._deadline import current_control, routes_with_deadline
from ._env import positive_seconds
from ._log import error, fields
from ._watcher import Watcher, send_json
from .errors import ConfigurationError

logger = logging.getLogger("fastapi_dbpool")


class CancellationMiddleware:
    """Cancel an HTTP request at its deadline or when its client disconnects (pure ASGI).

    ``app.add_middleware(CancellationMiddleware, timeout=30)``

    - `timeout` (30 s, None for none): the default budget of a request, from when the
      middleware sees it; a route replaces it with ``dependencies=[deadline(120)]``.
    - `timeout_header` (None): a request header, in seconds (``X-Request-Timeout: 2.5``),
      that a gateway sets to shorten a request's budget; it never lengthens it. A malformed
      value is answered 400.
    - `read_ahead` (1 MiB): how much request body the middleware reads ahead of the app
      while it watches for a disconnect (and at most 64 messages). Every message is still
      handed to the app, in order; past this, watching waits until the app reads on.

    The deadline is enforced to within 10 ms; a hang-up is noticed from 0.25 s into the
    request on. Out of time before the response started: the client gets ``504`` with
    ``{"detail": "..."}``. Once it has started, the response body is ended where it is.
    Client gone: nothing is sent. Either way the request's statements are cancelled in
    PostgreSQL first, its transactions roll back, and its connections go back to the pool.
    The request's remaining budget bounds the wait for a connection (`DeadlineExceededError`,
    504) and each statement (``statement_timeout``). Once the response is complete (e.g. while
    ``BackgroundTasks`` run), nothing is watched. Lifespan and websocket scopes pass through.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        timeout: float | None = 30.0,
        timeout_header: str | None = None,
        read_ahead: int = 1 << 20,
    ) -> None:
        if timeout is not None:
            timeout = positive_seconds("CancellationMiddleware timeout", timeout, none_allowed=True)
        if not isinstance(read_ahead, int) or read_ahead < 0:
            raise ConfigurationError(f"read_ahead must be a number of bytes, got {read_ahead!r}.")
        self.app = app
        self.timeout = timeout
        self.header_name = timeout_header
        self.header = timeout_header.lower().encode("latin-1") if timeout_header else None
        self.read_ahead = read_ahead
        self._clock: Clock | None = None
        self._cancel_scope: Callable[[], anyio.CancelScope] = anyio.CancelScope

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cap = None
        if self.header is not None:
            try:
                cap = self._requested_budget(scope)
            except ValueError as ex:
                await send_json(send, 400, str(ex))
                return
        clock = self._clock
        if clock is None or clock.loop is not asyncio.get_running_loop():
            clock = self._clock = Clock(asyncio.get_running_loop())
            # the running backend's own class: anyio.CancelScope() looks the backend up each time
            self._cancel_scope = type(anyio.CancelScope())
        cancel_scope = self._cancel_scope()
        watcher = Watcher(
            scope, receive, send, self.read_ahead, clock, cancel_scope, self.timeout, cap
        )
        token = current_control.set(watcher)
        # Here rather than in a method of the Watcher: every coroutine a request runs
        # through costs it again at each of its awaits.
        try:
            with cancel_scope:
                try:
                    await self.app(scope, watcher.receive, watcher.send)
                except (QueryCanceled, ClientDisconnect):
                    if not watcher.was_cut():
                        raise
                except Exception as ex:
                    # What a cut request raises on its way out (a connection closed under
                    # it because its server stopped answering) is the cut's own doing: the
                    # client has its answer, and a traceback would only mislead. An ORM
                    # raises the deadline's QueryCanceled wrapped in an error of its own.
                    if watcher.stopping is None and not (
                        isinstance(ex.__cause__, QueryCanceled) and watcher.was_cut()
                    ):
                        raise
                    logger.debug(
                        "a cut request raised %s",
                        error(ex),
                        extra=fields("cut_raised", error=error(ex)),
                    )
        except BaseException:
            watcher.end()
            raise
        else:
            if watcher.stopping is None:
                watcher.end()
            else:
                await watcher.answer_cut()
        finally:
            current_control.reset(token)

    def _requested_budget(self, scope: Scope) -> float | None:
        for name, value in scope.get("headers", ()):
            if name.lower() == self.header:
                text = value.decode("latin-1").strip()
                try:
                    budget = float(text)
                except ValueError:
                    budget = math.nan
                if not (math.isfinite(budget) and budget > 0):
                    raise ValueError(
                        f"Header {self.header_name} must be a positive number of "
                        f"seconds, got {text!r}."
                    )
                return budget
        return None


def check_deadlines_are_enforced(app: Any) -> None:
    """Warn at startup, naming them, about routes with a `deadline` in an app without
    `CancellationMiddleware`: their first request would raise `ConfigurationError`.

    A warning, not a refusal: the middleware may wrap the app from outside
    (``CancellationMiddleware(app)`` served by uvicorn), where ``user_middleware``
    does not show it. Once per app, however many pools it opens.
    """
    state = getattr(app, "state", None)
    if state is None or getattr(state, "dbpool_deadlines_checked", False):
        return
    state.dbpool_deadlines_checked = True
    middleware = getattr(app, "user_middleware", ())
    if any(
        isinstance(m.cls, type) and issubclass(m.cls, CancellationMiddleware) for m in middleware
    ):
        return
    routes = routes_with_deadline(app)
    if routes:
        logger.warning(
            "deadline() on %s, but the app has no CancellationMiddleware: each request to "
            "them will raise ConfigurationError. hint: app.add_middleware(CancellationMiddleware)",
            ", ".join(routes),
            extra=fields("deadline_unenforced", routes=routes),
        )
