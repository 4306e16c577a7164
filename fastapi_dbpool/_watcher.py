"""One request under CancellationMiddleware: its deadline, its receive relay, its cancellation."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

import anyio
from starlette.types import Message, Receive, Scope, Send

from . import _cleanup
from ._clock import Clock, Due
from ._connection import LeaseState
from ._deadline import RequestControl
from ._log import Bursts, error, fields
from ._metrics import route_of
from ._registry import find_runtime
from .errors import COMMIT_UNKNOWN_DETAIL, DEADLINE_DETAIL

if TYPE_CHECKING:
    from ._state import PoolRuntime

logger = logging.getLogger("fastapi_dbpool")
_DISCONNECT: Message = {"type": "http.disconnect"}
_WATCH_AFTER = 0.25  # a request still running after this is watched for a disconnect
_MAX_AHEAD = 64  # messages read ahead of the app, whatever their size
# one INFO line per burst of cut requests, per reason: a burst cut 44 requests, 44 lines
_cut_bursts = Bursts()
_stoppers: set[asyncio.Task[Any]] = set()  # referenced until done (the loop holds weak refs)
_ENDED_SCOPE: Scope = {"type": "http"}
#: how long past the deadline a COMMIT the server has not answered yet is waited for
COMMIT_GRACE = 0.5
_CANCEL_GRACE = 0.005  # how long the 504 waits for cancel requests to land (a fast link's)


async def _ended_receive() -> Message:
    return _DISCONNECT


async def _dropped() -> None:
    pass


async def _ended_send(message: Message) -> None:
    raise RuntimeError("The request has ended: nothing more can be sent.")


class _Relay:
    """What the watching task has read and the app has not yet: body messages, in order."""

    __slots__ = ("buffer", "buffered", "lock", "space")

    def __init__(self) -> None:
        self.buffer: deque[Message] = deque()
        self.buffered = 0  # bytes of body in `buffer`
        self.lock = asyncio.Lock()  # one receive() call at a time, the app's or the watcher's
        self.space = asyncio.Event()  # the app took something: read-ahead may go on


class Watcher(RequestControl):
    """One HTTP request: cancels it, server first, at its deadline or on a disconnect.

    `CancellationMiddleware` runs the app with this as its receive and send. Every body
    message reaches the app, in order: until the request has run for `_WATCH_AFTER` the
    app reads on its own (and sees a disconnect itself); after that a task watches for
    one, relaying what it reads through a buffer the app reads first.
    """

    __slots__ = (
        "cancel_scope",
        "clock",
        "commit_unanswered",
        "complete",
        "cut_pools",
        "disconnected",
        "loop",
        "pump",
        "read_ahead",
        "reading",
        "real_receive",
        "real_send",
        "relay",
        "scope",
        "slot",
        "started",
        "watch_at",
    )

    def __init__(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        read_ahead: int,
        clock: Clock,
        cancel_scope: anyio.CancelScope,
        budget: float | None,
        cap: float | None,
    ) -> None:
        super().__init__(budget, cap)
        self.scope = scope
        self.real_receive = receive
        self.real_send = send
        self.read_ahead = read_ahead
        self.clock = clock
        self.loop = clock.loop
        self.cancel_scope: anyio.CancelScope | None = cancel_scope
        self.started = self.complete = self.disconnected = self.reading = False
        self.commit_unanswered = False  # cut while the server had not answered its COMMIT
        self.watch_at = self.start + _WATCH_AFTER
        self.pump: asyncio.Task[None] | None = None
        self.relay: _Relay | None = None  # made when watching starts: most requests end before
        self.cut_pools: set[PoolRuntime] | None = None  # whose connections a cut found held
        # _arm_timer(), inline for every request: due at the deadline or the watch, if sooner
        at = self.deadline if self.deadline < self.watch_at else self.watch_at
        self.slot: set[Due] | None = clock.add(at, self)

    def was_cut(self) -> bool:
        """Whether the QueryCanceled or ClientDisconnect the app raised is the request's cut.

        It is when the middleware cut the request, or when PostgreSQL's statement_timeout
        ended a statement at the deadline (then counted as the deadline's cut); otherwise
        the error is the app's own, to handle as it sees fit.
        """
        if self.stopping is None:
            if time.monotonic() < self.deadline:
                return False
            self.stopping = "deadline"
        return True

    def end(self) -> None:
        """The app has returned or raised: stop watching, and drop the request's objects.

        The request's context keeps this Watcher, and outlives the request in whatever
        copied it (a timer started during the request keeps a copy until it is dropped).
        """
        if self.active or self.pump is not None:  # else stopped when the response ended
            self._stop_watching()
        self.scope = _ENDED_SCOPE
        self.real_receive = _ended_receive
        self.real_send = _ended_send
        self.relay = self.pump = None
        self.cancel_scope = None

    async def answer_cut(self) -> None:
        """The request was cut: answer for the app (a 504, or the end of the body)."""
        try:
            self._stop_watching()
            # Counted here, once the handler is done, by each pool whose connection the
            # request held when it was cut (else the app's only pool): a deadline that
            # ran out while it waited for a connection is counted there, even if this cut
            # came first.
            if not self.ran_out_in_pool:
                for runtime in self._pools_used():
                    runtime.counters.cancelled_requests += 1
            await self._answer()
        finally:
            self.end()

    def _pools_used(self) -> set[PoolRuntime]:
        if self.cut_pools:
            return self.cut_pools
        only = find_runtime(self.scope)  # a cut by statement_timeout, or between checkouts
        return set() if only is None else {only}

    # -- watching ---------------------------------------------------------------------------

    def _deadline_changed(self) -> None:
        self._arm_timer()

    def _arm_timer(self) -> None:
        """Be due at the deadline, or when watching for a disconnect starts if sooner."""
        self._leave_clock()
        if not self.active:
            return
        at = self.deadline
        if self.pump is None:
            at = min(at, self.watch_at)
        if at != math.inf:
            self.slot = self.clock.add(at, self)

    def due(self) -> None:
        self.slot = None
        if not self.active:
            return
        now = time.monotonic()
        if now >= self.deadline:
            self._trigger("deadline")
            return
        if self.pump is None and now >= self.watch_at:
            if self.reading:  # the app's own receive() will see a disconnect; look again later
                self.watch_at = now + _WATCH_AFTER
            else:
                self.relay = _Relay()
                self.pump = self.loop.create_task(self._watch_receive(self.relay))
        self._arm_timer()

    def _leave_clock(self) -> None:
        if self.slot is not None:
            self.slot.discard(self)
            self.slot = None

    def _stop_watching(self) -> None:
        self.active = False
        self._leave_clock()
        if self.pump is not None and self.pump is not asyncio.current_task():
            self.pump.cancel()

    def _trigger(self, reason: str) -> None:
        if self.stopping is not None or self.complete or not self.active:
            return
        if reason == "deadline" and self.committing:
            # The handler returned and its COMMIT is under way: let the response out, unless
            # the server has not answered the COMMIT within the grace (a partition).
            if time.monotonic() < self.deadline + COMMIT_GRACE:
                self._leave_clock()
                self.slot = self.clock.add(self.deadline + COMMIT_GRACE, self)
                return
            self.commit_unanswered = True
        self.stopping = reason
        self._stop_watching()
        held = _cut_bursts.admit(reason)
        if held is not None:  # the first of a burst, naming how many the last one held back
            logger.info(
                "cancelling %s %s: %s%s",
                self.scope.get("method"),
                self.scope.get("path"),
                "deadline passed" if reason == "deadline" else "client disconnected",
                f" ({held} more since the last line like it)" if held else "",
                extra=fields(
                    "request_cancelled",
                    method=self.scope.get("method"),
                    path=self.scope.get("path"),
                    route=route_of(self.scope),
                    reason=reason,
                    held_back=held,
                ),
            )
        stopper = self.loop.create_task(self._cancel())
        _stoppers.add(stopper)
        stopper.add_done_callback(_stoppers.discard)

    async def _cancel(self) -> None:
        """Server first, then the handler, then the client: all at the deadline.

        Each running statement's cancel request is sent in a task of its own, and the
        handler is cancelled at once; its shielded release settles each connection later
        (drained and reused, or closed when its cancel cannot be delivered: see
        `_cleanup`). The 504 goes out when the cancel requests have landed or after
        `_CANCEL_GRACE`, whichever is first, so that a silent network never delays it.
        """
        scope = self.cancel_scope  # the request may end, and drop it, while this waits
        held = self.held()
        self.cut_pools = {lease.runtime for lease in held if lease.runtime is not None}
        cancels = []
        for lease in held:
            if lease.state is LeaseState.ACTIVE:
                conn = lease.conn
                conn._dbpool_cancelled_gen = conn._dbpool_gen
                after = lease.runtime.round_trip if lease.runtime is not None else 0.0
                cancels.append(
                    self.loop.create_task(
                        _cleanup.cancel_on_server(
                            conn, lease.cleanup_timeout, after=after, target=conn._dbpool_gen
                        )
                    )
                )
        for task in cancels:
            _stoppers.add(task)
            task.add_done_callback(_stoppers.discard)
        if cancels:
            await asyncio.wait(cancels, timeout=_CANCEL_GRACE)
        if scope is not None:
            scope.cancel()
        if not self.started and not self.complete and self.stopping == "deadline":
            self.complete = True  # answered here: the app's own sends are dropped
            try:
                detail = COMMIT_UNKNOWN_DETAIL if self.commit_unanswered else DEADLINE_DETAIL
                await send_json(self.real_send, 504, detail)
            except Exception as ex:  # the client went away meanwhile
                logger.debug(
                    "the 504 could not be sent: %r",
                    ex,
                    extra=fields("answer_failed", error=error(ex)),
                )

    # -- receive: every message reaches the app, in order; the middleware only looks ---------

    def _note(self, message: Message) -> None:
        if message["type"] == "http.disconnect":
            self.disconnected = True
            self._trigger("disconnect")

    async def _watch_receive(self, relay: _Relay) -> None:
        try:
            await self._relay(relay)
        except Exception as ex:  # a server whose receive() fails has lost the client
            logger.debug(
                "receive() failed while watching for a disconnect: %r",
                ex,
                extra=fields("disconnect_watch_failed", error=error(ex)),
            )
            self._note(_DISCONNECT)

    async def _relay(self, relay: _Relay) -> None:
        while not self.disconnected:
            # Bytes bound a body; the count bounds a server that, out of spec, answers
            # receive() with empty messages instead of waiting for the client.
            if relay.buffered > self.read_ahead or len(relay.buffer) >= _MAX_AHEAD:
                relay.space.clear()
                await relay.space.wait()
                continue
            async with relay.lock:
                if self.disconnected:
                    return
                message = await self.real_receive()
            relay.buffer.append(message)
            relay.buffered += len(message.get("body", b""))
            self._note(message)

    async def receive(self) -> Message:
        relay = self.relay
        if relay is None:  # not watching (yet): the app reads on its own
            self.reading = True
            try:
                message = await self.real_receive()
            finally:
                self.reading = False
            self._note(message)
            return message
        while True:
            if relay.buffer:
                message = relay.buffer.popleft()
                relay.buffered -= len(message.get("body", b""))
                relay.space.set()
                return message
            if self.disconnected:
                return _DISCONNECT
            async with relay.lock:
                if relay.buffer or self.disconnected:
                    continue
                message = await self.real_receive()
            self._note(message)
            return message

    # -- send -------------------------------------------------------------------------------

    def send(self, message: Message) -> Awaitable[None]:
        # A plain function handing back the server's own awaitable: one coroutine less
        # for every message of every request.
        if self.stopping is not None:
            return _dropped()  # the request is being cancelled: the middleware answers for it
        kind = message["type"]
        if kind == "http.response.start":
            self.started = True
        elif (kind == "http.response.body" and not message.get("more_body", False)) or (
            kind == "http.response.trailers" and not message.get("more_trailers", False)
        ):
            self.complete = True
            self.active = False  # _stop_watching(), inline: once for every request
            if self.slot is not None:
                self.slot.discard(self)
                self.slot = None
            if self.pump is not None:
                self._stop_watching()  # and the task watching for a disconnect
        return self.real_send(message)

    async def _answer(self) -> None:
        if self.complete or self.stopping == "disconnect":
            return
        if not self.started:
            await send_json(self.real_send, 504, DEADLINE_DETAIL)
        else:
            await self.real_send({"type": "http.response.body", "body": b"", "more_body": False})


async def send_json(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers: list[tuple[bytes, bytes]] = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
