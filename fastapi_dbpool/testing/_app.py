"""AppHarness: an app's lifespan on the test's loop, its pools bound to a test database."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import MutableMapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .. import _cleanup
from .._pinned import Binding, binding
from .._pool_internals import idle_connections
from ..errors import ConfigurationError, IsolationError, WrongEventLoopError

if TYPE_CHECKING:
    import httpx

Scope = MutableMapping[str, Any]
_SHUTDOWN_TIMEOUT = 30.0
#: Where harnesses that start now are recorded: the plugin sets it around each fixture's
#: setup, and stops them when that fixture is torn down, while its event loop still runs.
started_during: list[AppHarness] | None = None
LOOP_HINT = (
    "hint: under pytest, the app starts on the loop of the first test or async fixture "
    "that uses dbpool_client or dbpool_app. Give the test and those fixtures the same loop "
    "scope (pytest-asyncio: loop_scope= on @pytest.mark.asyncio and @pytest_asyncio.fixture, "
    "or asyncio_default_test_loop_scope and asyncio_default_fixture_loop_scope in the ini "
    "file), or use the client in the test only."
)


class AppHarness:
    """Run `app`'s lifespan on the running event loop, as a server would, for a test.

    Every `DBPool` the app opens while starting connects to `database_url` instead of its
    own; with `isolate` (the default) each pins one connection inside a transaction that is
    rolled back by `stop`, so nothing the test writes outlives it (see `fastapi_dbpool`'s
    docs, "Testing your app"). `client()` is an ``httpx.AsyncClient`` on the app that
    starts it on first use. The app runs on the loop that started it, and using it from
    another loop raises `WrongEventLoopError` at once instead of hanging.
    """

    def __init__(
        self, app: Any, database_url: str, *, isolate: bool = True, hint: str = LOOP_HINT
    ) -> None:
        self.app = app
        self.state: dict[str, Any] = {}
        self._binding = Binding(database_url, isolate, hint)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._started = asyncio.Event()
        self._stopping = asyncio.Event()
        self._failure: str | None = None
        self._stopped = False
        self._origin = ""  # where it started: the test and phase, or the task

    @property
    def started(self) -> bool:
        return self._task is not None

    async def start(self) -> None:
        """Run the app's startup on the running loop; again on the same loop does nothing."""
        loop = _running_loop()
        if self._task is not None:
            if loop is not self._loop:
                names = ", ".join(r.pool.name for r in self._binding.runtimes)
                raise WrongEventLoopError(
                    names or "of the app under test",
                    opened_in=self._origin,
                    used_in=_where(),
                    hint=self._binding.hint,
                )
            if self._stopped:
                raise ConfigurationError("This app has been stopped; start a new AppHarness.")
            await self._started.wait()
            return
        self._loop = loop
        self._origin = _where()
        if started_during is not None:
            started_during.append(self)
        token = binding.set(self._binding)
        try:  # the task copies the context, binding included
            self._task = loop.create_task(self._lifespan(), name="fastapi_dbpool-test-lifespan")
        finally:
            binding.reset(token)
        started = loop.create_task(self._started.wait())
        await asyncio.wait({self._task, started}, return_when=asyncio.FIRST_COMPLETED)
        started.cancel()
        if self._task.done():
            self._stopped = True
            self._task.result()  # the startup's own exception (PoolOpenError...)
        if self._failure is not None:
            raise RuntimeError(f"The app's startup failed: {self._failure}")

    async def stop(self) -> None:
        """Run the app's shutdown (the pools roll back and close), then check isolation.

        Raises `IsolationError` if the code under test ended the test's transaction itself:
        what it committed is in the test database and cannot be rolled back.
        """
        if self._task is None or self._stopped:
            return
        self._stopped = True
        self._stopping.set()
        await asyncio.wait_for(self._task, _SHUTDOWN_TIMEOUT)
        self._check_isolation()

    def close(self) -> None:
        """Stop from synchronous code (a fixture's teardown), whatever state the loop is in.

        If the loop that runs the app is closed, nothing can be awaited: the connections
        are dropped, and PostgreSQL rolls back what they had not committed.
        """
        loop = self._loop
        if self._task is None or self._stopped or loop is None:
            return
        if not loop.is_closed() and not loop.is_running():
            loop.run_until_complete(self.stop())
            return
        self._stopped = True
        for runtime in self._binding.runtimes:
            if runtime.pinned is not None:
                _cleanup.close_now(runtime.pinned.conn)
            for lease in list(runtime.leases):
                _cleanup.close_now(lease.conn)
            for conn in idle_connections(runtime.pool):
                _cleanup.close_now(conn)
        self._check_isolation()

    def _check_isolation(self) -> None:
        for runtime in self._binding.runtimes:
            if runtime.pinned is not None and runtime.pinned.escaped is not None:
                raise IsolationError(runtime.pool.name, runtime.pinned.escaped)

    def client(
        self, base_url: str = "http://test", *, raise_app_exceptions: bool = True, **kwargs: Any
    ) -> httpx.AsyncClient:
        """An ``httpx.AsyncClient`` on the app; the app starts at its first request.

        ``raise_app_exceptions=False``: an exception of the app is its 500 response, as a
        server would send it, instead of raised in the test (to test that 500).
        """
        import httpx

        transport = httpx.ASGITransport(app=self._asgi, raise_app_exceptions=raise_app_exceptions)
        return httpx.AsyncClient(transport=transport, base_url=base_url, **kwargs)

    async def _asgi(self, scope: Scope, receive: Any, send: Any) -> None:
        await self.start()
        if scope["type"] in ("http", "websocket"):
            scope = {**scope, "state": dict(self.state)}  # what a server passes on
        await self.app(scope, receive, send)

    async def _lifespan(self) -> None:
        """The ASGI lifespan protocol, as uvicorn speaks it."""
        scope = {
            "type": "lifespan",
            "asgi": {"version": "3.0", "spec_version": "2.0"},
            "state": self.state,
        }
        sent_startup = False

        async def receive() -> dict[str, Any]:
            nonlocal sent_startup
            if not sent_startup:
                sent_startup = True
                return {"type": "lifespan.startup"}
            await self._stopping.wait()
            return {"type": "lifespan.shutdown"}

        async def send(message: dict[str, Any]) -> None:
            kind = message["type"]
            if kind == "lifespan.startup.failed":
                self._failure = message.get("message", "")
            if kind.startswith("lifespan.startup."):
                self._started.set()
            elif kind == "lifespan.shutdown.failed":
                raise RuntimeError(f"The app's shutdown failed: {message.get('message', '')}")

        await self.app(scope, receive, send)

    async def __aenter__(self) -> AppHarness:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


def _running_loop() -> asyncio.AbstractEventLoop:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        raise ConfigurationError(
            "fastapi_dbpool runs on asyncio (psycopg's async connections do), and no asyncio "
            "loop is running here. Run the test on asyncio: @pytest.mark.asyncio, or "
            "@pytest.mark.anyio with an anyio_backend fixture that returns 'asyncio'."
        ) from None


def _where() -> str:
    """Where the running code is: the test and phase under pytest, else the task."""
    test = os.environ.get("PYTEST_CURRENT_TEST")
    if test:
        return test
    task = asyncio.current_task()
    name = task.get_name() if task is not None else "?"
    return f"task {name!r} in thread {threading.current_thread().name!r}"
