"""DBPool: a pool's settings, checked when it is made, and what the app uses of it."""

from __future__ import annotations

import functools
import math
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from . import _config, _credentials, _dsn, _env, _lifespan, _pinned, _pooler
from ._connect_errors import ConnectLog
from ._connection import CLEANUP_TIMEOUT
from ._dependencies import PoolDependencies
from ._metrics import Observer, PoolStats, snapshot
from ._registry import Finder
from ._state import PoolRuntime, Settings
from ._transaction import transaction
from .errors import ConfigurationError, PoolNotRunningError


def _no_check(params: dict[str, str]) -> None:
    """A conninfo callable's answer needs no check beyond parsing (see `_pooler`)."""


class DBPool:
    """A psycopg_pool `AsyncConnectionPool` for one FastAPI app, run by the app's lifespan.

    ``DBPool(conninfo, **pool_kwargs)``: `conninfo` is a libpq URL or key=value string,
    or a callable (sync or async) returning one, asked again for each new connection;
    `pool_kwargs` go to `psycopg_pool.AsyncConnectionPool` unchanged (``min_size``,
    ``max_size``, ``max_waiting``, ``max_idle``, ``configure``, ``reset``...), except
    ``open`` and ``timeout``, which this class owns. Connections are in autocommit mode.
    ``max_idle`` defaults to 60 s, and all the connections above ``min_size`` left unused
    that long are closed (psycopg_pool closes one per period), so a burst's connections go
    back to the server within ``2 x max_idle``.

    Own settings:

    - ``password`` (None): a password, or a source asked for each new connection, so that
      a rotated secret is used from the next connection on: `PasswordFile` (a mounted
      secret, re-read), or a sync or async callable (a cloud IAM token). It wins over a
      password in `conninfo`; its answer is never logged.
    - ``acquire_timeout`` (5 s): how long a request waits for a connection before it is
      answered 503 with ``Retry-After: retry_after`` (1 s).
    - ``open_timeout`` (10 s): startup fails with `PoolOpenError` if PostgreSQL cannot
      be reached and ``min_size`` connections opened by then.
    - ``close_timeout`` (5 s): bound on closing the pool at shutdown.
    - ``release_timeout`` (5 s): bound on each cleanup step (server-side cancel, rollback,
      return); a connection that cannot be cleaned up in time is closed and replaced.
    - ``watchdog`` (0.1 s; None for none): a thread warns, naming the code, whenever the
      event loop is blocked longer than this (``time.sleep``, blocking I/O, heavy CPU).
    - ``hold_warning`` (None): seconds; a connection still checked out that long is logged
      once, naming its route and where the app's code took it, before it starves the pool.
    - ``allow_concurrent_tasks`` (False): let tasks spawned by a request use its
      connection while the request holds it (psycopg runs their statements one at a time).
    - ``transaction_pooler`` (None): True behind a pooler that pools by transaction
      (PgBouncer ``pool_mode=transaction``, RDS Proxy, Supavisor...): no prepared
      statements, deadlines as transaction-local timeouts, session-level statements
      refused (`SessionStateError`). None: this mode if a pooler answers at open (it
      cannot tell how the pooler pools; the mode is safe under both), logged once;
      False: connected directly or through a session pooler.
    - ``writable`` (False): True for a pool that must reach the primary. Each new
      connection is checked (``SHOW transaction_read_only``) and a read-only server
      refused, at startup (`PoolOpenError`) and after a failover, until the writable
      server answers; a statement failing as read-only (SQLSTATE 25006) replaces every
      connection; ``/readyz`` says "connected server is read-only" meanwhile.

    Nothing connects and nothing binds to an event loop until `lifespan` runs, so a
    DBPool can be created at import time. Misconfiguration raises `ConfigurationError`
    here, before any connection is made.
    """

    def __init__(
        self,
        conninfo: _credentials.Source = "",
        *,
        password: _credentials.Source | None = None,
        acquire_timeout: float = 5.0,
        open_timeout: float = 10.0,
        close_timeout: float = 5.0,
        release_timeout: float = CLEANUP_TIMEOUT,
        retry_after: int = 1,
        allow_concurrent_tasks: bool = False,
        watchdog: float | None = 0.1,
        transaction_pooler: bool | None = None,
        writable: bool = False,
        hold_warning: float | None = None,
        **pool_kwargs: Any,
    ) -> None:
        params: dict[str, str] | None = None
        if isinstance(conninfo, str):
            try:
                params = _dsn.parse(conninfo)
            except psycopg.Error as ex:
                raise ConfigurationError(
                    f"The connection string is malformed: {_dsn.scrub(str(ex))}."
                ) from None
        elif not callable(conninfo):
            raise ConfigurationError(
                "conninfo must be a string (a URL or key=value pairs) or a callable, sync or "
                f"async, returning one; got {type(conninfo).__name__}."
            )
        if not (password is None or isinstance(password, str) or callable(password)):
            raise ConfigurationError(
                "password must be a string or a callable, sync or async, returning one (e.g. "
                f"PasswordFile(path)); got {type(password).__name__}."
            )
        self._settings = Settings(
            acquire_timeout=_env.positive_seconds("acquire_timeout", acquire_timeout),
            open_timeout=_env.positive_seconds("open_timeout", open_timeout),
            close_timeout=_env.positive_seconds("close_timeout", close_timeout),
            release_timeout=_env.positive_seconds("release_timeout", release_timeout),
            retry_after=max(1, math.ceil(retry_after)),
            allow_concurrent_tasks=bool(allow_concurrent_tasks),
            transaction_pooler=None if transaction_pooler is None else bool(transaction_pooler),
            writable=bool(writable),
            hold_warning=None
            if hold_warning is None
            else _env.positive_seconds("hold_warning", hold_warning, none_allowed=True),
            watchdog=None
            if watchdog is None
            else _env.positive_seconds("watchdog", watchdog, none_allowed=True),
        )
        self.name: str = pool_kwargs.setdefault("name", "fastapi_dbpool")
        #: told each wait, hold and connection time as it is counted (fastapi_dbpool.otel)
        self._observers: list[Observer] = []
        self._connect_log = ConnectLog(self.name, self._observers)
        undecided = dict(pool_kwargs)  # as given: pool_kwargs() fills pool_kwargs in
        build = functools.partial(
            _config.pool_kwargs,
            self.name,
            connect_log=self._connect_log,
            password=password,
            writable=bool(writable),
        )
        self._pool_kwargs = build(pool_kwargs, params, transaction_pooler=bool(transaction_pooler))
        #: the pool's settings in transaction-pooler mode, taken at open if a pooler answers
        #: and the user did not choose (see _lifespan.open_runtime); raises as DBPool would
        self._pooler_kwargs: Callable[[], dict[str, Any]] | None = None
        if transaction_pooler is None:
            self._pooler_kwargs = lambda: build(dict(undecided), params, transaction_pooler=True)
        self._conninfo: _credentials.Source = conninfo
        if not isinstance(conninfo, str):
            check = _pooler.check_options if transaction_pooler else _no_check
            self._conninfo = _credentials.conninfo_source(
                conninfo, self.name, self._connect_log, check
            )
        self._runtime: PoolRuntime | None = None
        #: run once the pool is open, before the app starts serving (fastapi_dbpool.sqlalchemy)
        self._on_open: list[Callable[[PoolRuntime], Awaitable[None]]] = []
        self._ended_at: float | None = None  # when its lifespan last ended (time.time())
        own = PoolDependencies(Finder(self.name))
        #: This pool's request connection (autocommit), for an app with several pools.
        self.ConnectionDep: Any = own.ConnectionDep
        #: This pool's request transaction, committed before the response.
        self.TransactionDep: Any = own.TransactionDep
        #: This pool's transaction held until a streamed response has been sent.
        self.StreamTransactionDep: Any = own.StreamTransactionDep
        #: ``Depends(db.get_connection)``: as `fastapi_dbpool.get_connection`, of this pool.
        self.get_connection = own.get_connection
        self.get_transaction = own.get_transaction
        self.get_stream_transaction = own.get_stream_transaction
        self._unbound = False  # from_env() under pytest without DATABASE_URL: tests bind it
        try:  # psycopg_pool checks sizes and names; nothing connects with open=False
            AsyncConnectionPool(conninfo, open=False, **self._pool_kwargs)
        except (TypeError, ValueError) as ex:
            hint = " (psycopg_pool's min_size defaults to 4)" if "min_size" in str(ex) else ""
            raise ConfigurationError(f"Invalid pool setting: {ex}{hint}.") from None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> DBPool:
        """A DBPool from ``DATABASE_URL`` and ``DBPOOL_*`` variables.

        One variable per setting, ``DBPOOL_`` and its name in capitals (``DBPOOL_MAX_SIZE``,
        ``DBPOOL_WATCHDOG=off``...), and ``DBPOOL_PASSWORD_FILE`` (a `PasswordFile`); the
        list, with each default, is in docs/settings.md. Keyword `overrides`
        win over the environment. A missing or malformed variable, or an unknown ``DBPOOL_*`` one,
        raises `ConfigurationError` naming it.

        Under pytest with fastapi_dbpool's plugin, a missing ``DATABASE_URL`` (in
        ``os.environ``) is allowed here, so that an app module creating its DBPool at
        import can be imported: the plugin's fixtures bind the pool to a test database,
        and opening it any other way raises `ConfigurationError`.
        """
        # Under the plugin (os.environ only), a missing URL is left for a test to bind.
        unbound_ok = environ is None and _pinned.plugin_sessions > 0
        url, settings = _env.read(
            os.environ if environ is None else environ, url_required=not unbound_ok
        )
        if not url:
            db = cls(**{**settings, **overrides})
            db._unbound = True
            return db
        return cls(url, **{**settings, **overrides})

    def __repr__(self) -> str:
        state = "running" if self._runtime else "stopped"
        return f"<DBPool {self.name!r} {_credentials.describe(self._conninfo)} {state}>"

    def stats(self) -> PoolStats:
        """A snapshot of the running pool: psycopg_pool's figures and ours (see `PoolStats`).

        Raises `PoolNotRunningError` when the lifespan is not running.
        """
        return self._snapshot(self._running())

    def _snapshot(self, runtime: PoolRuntime) -> PoolStats:
        """`stats()` from any thread (a metrics server's): reading tallies needs no loop."""
        return snapshot(
            self.name,
            runtime.pool_stats(),
            runtime.counters,
            runtime.leases,
            runtime.watchdog,
            runtime.connect_log,
            runtime.replica_lag,
        )

    @property
    def pool(self) -> AsyncConnectionPool[Any]:
        """The running psycopg_pool pool (for its stats); `PoolNotRunningError` if none."""
        return self._running().pool

    def _running(self) -> PoolRuntime:
        if self._runtime is None or self._runtime.closing:
            raise PoolNotRunningError(f"DBPool {self.name!r} is not running", self._ended_at)
        self._runtime.check_loop()
        return self._runtime

    def lifespan(self, app: Any) -> AbstractAsyncContextManager[dict[str, Any]]:
        """Open the pool for `app`, yield the lifespan state, close the pool on exit.

        Use as ``FastAPI(lifespan=db.lifespan)``, or compose it in your own lifespan with
        ``async with db.lifespan(app):``. The pool opens on the running loop, eagerly:
        startup waits for ``min_size`` connections and raises `PoolOpenError` (host and
        database named, no password) if that takes over ``open_timeout``. On exit,
        connections still checked out are logged, their queries cancelled and closed,
        and the pool is closed within ``close_timeout``, even if the exit is cancelled.
        """
        return _lifespan.run(self, app)

    def open(self) -> AbstractAsyncContextManager[dict[str, Any]]:
        """Run the pool without an app: ``async with db.open():`` in a job, a worker, a script.

        The same as `lifespan` (opened eagerly on the running loop, refused from another
        loop, closed bounded on exit), for work outside FastAPI: take connections with
        `connection` and `transaction` inside the block.
        """
        return _lifespan.run(self, None)

    @asynccontextmanager
    async def connection(self, timeout: float | None = None) -> AsyncIterator[AsyncConnection[Any]]:
        """A connection of its own, for work outside a request (jobs, spawned tasks).

        Waits up to `timeout` (default ``acquire_timeout``) and raises
        `PoolExhaustedError` after that. The connection is in autocommit mode, owned by
        the calling task, and given back (rolled back if needed) when the block exits,
        whatever the exit, shielded from cancellation and bounded.
        """
        async with self._running().lease(timeout, for_request=False) as lease:
            yield lease.conn

    @asynccontextmanager
    async def transaction(
        self, timeout: float | None = None
    ) -> AsyncIterator[AsyncConnection[Any]]:
        """Like `connection`, inside one transaction: committed if the block succeeds."""
        async with (
            self.connection(timeout) as conn,
            transaction(conn, self._settings.release_timeout),
        ):
            yield conn
