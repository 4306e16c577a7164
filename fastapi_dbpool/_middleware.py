"""CancellationMiddleware: stop a request, and its queries, at its deadline or when its client goes.

uvicorn never cancels a handler whose client hung up, and a cancelled handler's query runs on
in PostgreSQL unless someone cancels it there. This middleware watches both, and when one
happens it cancels on the server the statement running on every connection the request holds,
then cancels the request's own scope; the pool's shielded release does the rest.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections import deque

import anyio
from psycopg.errors import QueryCanceled
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import _cleanup
from ._connection import LeaseState
from ._deadline import RequestControl, current_control
from .errors import DEADLINE_DETAIL, ConfigurationError

logger = logging.getLogger("fastapi_dbpool")
_DISCONNECT: Message = {"type": "http.disconnect"}
_stoppers: set[asyncio.Task[None]] = set()  # referenced until done (the loop holds weak refs)


class CancellationMiddleware:
    """Cancel an HTTP request at its deadline or when its client disconnects (pure ASGI).

    ``app.add_middleware(CancellationMiddleware, timeout=30)``

    - `timeout` (30 s, None for none): the default budget of a request, from when the
      middleware sees it; a route replaces it with ``dependencies=[deadline(120)]``.
    - `timeout_header` (None): a request header, in seconds (``X-Request-Timeout: 2.5``),
      that a gateway sets to shorten a request's budget; it never lengthens it. A malformed
      value is answered 400.
    - `read_ahead` (1 MiB): how much request body the middleware reads ahead of the app
      while it watches for a disconnect. Every message is still handed to the app, in
      order; past this, watching waits until the app reads on.

    Out of time before the response started: the client gets ``504`` with
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
        if timeout is not None and not (
            isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0
        ):
            raise ConfigurationError(
                f"CancellationMiddleware timeout must be a positive number of seconds or "
                f"None, got {timeout!r}."
            )
        if not isinstance(read_ahead, int) or read_ahead < 0:
            raise ConfigurationError(f"read_ahead must be a number of bytes, got {read_ahead!r}.")
        self.app = app
        self.timeout = None if timeout is None else float(timeout)
        self.header_name = timeout_header
        self.header = timeout_header.lower().encode("latin-1") if timeout_header else None
        self.read_ahead = read_ahead

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            cap = self._requested_budget(scope)
        except ValueError as ex:
            await _send_json(send, 400, str(ex))
            return
        control = RequestControl(self.timeout, cap)
        token = current_control.set(control)
        try:
            await _Request(self, control, scope, receive, send).run()
        finally:
            current_control.reset(token)

    def _requested_budget(self, scope: Scope) -> float | None:
        if self.header is None:
            return None
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


class _Request:
    """One request under the middleware: its relayed receive, watched send, and timer."""

    def __init__(
        self,
        middleware: CancellationMiddleware,
        control: RequestControl,
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        self.app = middleware.app
        self.read_ahead = middleware.read_ahead
        self.control = control
        self.scope = scope
        self.real_receive = receive
        self.real_send = send
        self.loop = asyncio.get_running_loop()
        self.cancel_scope = anyio.CancelScope()
        self.started = self.complete = self.disconnected = False
        self.buffer: deque[Message] = deque()
        self.buffered = 0
        self.lock = asyncio.Lock()
        self.space = asyncio.Event()
        self.timer: asyncio.TimerHandle | None = None
        self.pump: asyncio.Task[None] | None = None

    async def run(self) -> None:
        self.control._on_change = self._arm_timer
        self._arm_timer()
        self.pump = self.loop.create_task(self._watch_receive())
        try:
            with self.cancel_scope:
                try:
                    await self.app(self.scope, self._receive, self._send)
                except (QueryCanceled, ClientDisconnect):
                    if self.control.stopping is None:
                        raise  # not a consequence of our cancellation: the app's to handle
        finally:
            self._stop_watching()
        if self.control.stopping is not None:
            await self._answer()

    # -- watching ---------------------------------------------------------------------------

    def _arm_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        remaining = self.control.remaining()
        if remaining is not None:
            self.timer = self.loop.call_later(max(remaining, 0.0), self._trigger, "deadline")

    def _stop_watching(self) -> None:
        self.control.active = False
        self.control._on_change = None
        if self.timer is not None:
            self.timer.cancel()
        if self.pump is not None and self.pump is not asyncio.current_task():
            self.pump.cancel()

    def _trigger(self, reason: str) -> None:
        control = self.control
        if control.stopping is not None or self.complete:
            return
        if reason == "deadline" and control.committing:
            return  # the handler returned and its COMMIT is under way: let the response out
        control.stopping = reason
        self._stop_watching()
        logger.info(
            "cancelling %s %s: %s",
            self.scope.get("method"),
            self.scope.get("path"),
            "deadline passed" if reason == "deadline" else "client disconnected",
        )
        stopper = self.loop.create_task(self._cancel())
        _stoppers.add(stopper)
        stopper.add_done_callback(_stoppers.discard)

    async def _cancel(self) -> None:
        """Server first: stop each running statement in PostgreSQL, then cancel the handler."""
        for lease in list(self.control.leases):
            if lease.state is LeaseState.ACTIVE:
                lease.conn._dbpool_cancelled_gen = lease.conn._dbpool_gen
                await _cleanup.cancel_on_server(lease.conn, lease.cleanup_timeout)
        self.cancel_scope.cancel()

    # -- receive: every message reaches the app, in order; the middleware only looks ---------

    def _note(self, message: Message) -> None:
        if message["type"] == "http.disconnect":
            self.disconnected = True
            self._trigger("disconnect")

    async def _watch_receive(self) -> None:
        try:
            await self._relay()
        except Exception as ex:  # a server whose receive() fails has lost the client
            logger.debug("receive() failed while watching for a disconnect: %r", ex)
            self._note(_DISCONNECT)

    async def _relay(self) -> None:
        while not self.disconnected:
            if self.buffered > self.read_ahead:
                self.space.clear()
                await self.space.wait()
                continue
            async with self.lock:
                if self.disconnected:
                    return
                message = await self.real_receive()
            self.buffer.append(message)
            self.buffered += len(message.get("body", b""))
            self._note(message)

    async def _receive(self) -> Message:
        while True:
            if self.buffer:
                message = self.buffer.popleft()
                self.buffered -= len(message.get("body", b""))
                self.space.set()
                return message
            if self.disconnected:
                return _DISCONNECT
            async with self.lock:
                if self.buffer or self.disconnected:
                    continue
                message = await self.real_receive()
            self._note(message)
            return message

    # -- send -------------------------------------------------------------------------------

    async def _send(self, message: Message) -> None:
        if self.control.stopping is not None:
            return  # the request is being cancelled: the middleware answers for it
        kind = message["type"]
        if kind == "http.response.start":
            self.started = True
        elif (kind == "http.response.body" and not message.get("more_body", False)) or (
            kind == "http.response.trailers" and not message.get("more_trailers", False)
        ):
            self.complete = True
            self._stop_watching()
        await self.real_send(message)

    async def _answer(self) -> None:
        if self.complete or self.control.stopping == "disconnect":
            return
        if not self.started:
            await _send_json(self.real_send, 504, DEADLINE_DETAIL)
        else:
            await self.real_send({"type": "http.response.body", "body": b"", "more_body": False})


async def _send_json(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers: list[tuple[bytes, bytes]] = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
