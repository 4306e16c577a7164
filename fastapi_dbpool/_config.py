"""What DBPool hands psycopg_pool: the user's pool settings with the package's defaults."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from psycopg import AsyncConnection

from . import _credentials, _failover, _pooler
from ._connect_errors import ConnectLog, recording_class
from ._connection import guarded_class, request_lease
from .errors import ConfigurationError

#: psycopg_pool settings the package owns, and what to pass instead
OURS = {
    "open": "the lifespan opens the pool; drop open=",
    "timeout": "the wait for a connection is bounded per request by acquire_timeout=; "
    "pass that instead of timeout=",
}


#: Seconds a connection above ``min_size`` may sit unused before it is closed (at most
#: twice this after a burst, see `_pool_internals.release_idle_promptly`), so that a
#: burst's connections go back to the server for other workers and the next deploy.
#: psycopg_pool's own default is 600 s.
MAX_IDLE = 60.0
#: Seconds one connection attempt keeps trying while the server is unreachable (see
#: `_connect_errors.RecordingConnect`).
RETRY_WINDOW = 60.0


def pool_kwargs(
    name: str,
    kwargs: dict[str, Any],
    params: dict[str, str] | None,
    *,
    transaction_pooler: bool,
    connect_log: ConnectLog,
    password: _credentials.Source | None = None,
    writable: bool = False,
) -> dict[str, Any]:
    """`kwargs` for `AsyncConnectionPool`, with the connection class and defaults we need.

    `params`: the connection string's, or None when a callable gives it (then each
    answer is checked as it comes, see `_credentials.conninfo_source`).
    """
    for key, why in OURS.items():
        if key in kwargs:
            raise ConfigurationError(f"DBPool does not take {key}=: {why}.")
    conn_kwargs = kwargs.get("kwargs")
    if isinstance(password, str):
        conn_kwargs = _with_password(conn_kwargs, password)
        password = None
    if callable(conn_kwargs) or password is not None:
        user_kwargs, source = conn_kwargs, password

        async def resolved() -> dict[str, Any]:
            try:  # psycopg_pool only logs a failure here: say why connections fail
                got = await resolve_kwargs(user_kwargs)
                if source is not None:
                    got["password"] = await _credentials.resolve(source, "password")
            except Exception as ex:
                connect_log.failed(ex)
                raise
            return connect_kwargs(name, got, params, transaction_pooler)

        kwargs["kwargs"] = resolved
    else:
        kwargs["kwargs"] = connect_kwargs(name, dict(conn_kwargs or {}), params, transaction_pooler)
    guarded = guarded_class(kwargs.get("connection_class", AsyncConnection))
    cls = _pooler.pooler_class(guarded) if transaction_pooler else guarded
    on_connect = _failover.refuse_read_only if writable else None
    # a connect() that keeps trying through an outage gives up well before psycopg_pool does
    window = min(float(kwargs.get("reconnect_timeout", 300.0)) / 2, RETRY_WINDOW)
    kwargs["connection_class"] = recording_class(cls, connect_log, on_connect, window)
    if kwargs.get("check") is not None:
        kwargs["check"] = _outside_requests(kwargs["check"])
    # With a reset callback, psycopg_pool's putconn() queues the return for its own
    # worker without awaiting. Without one it awaits its lock after detaching the
    # connection, and a task.cancel() landing there loses the connection's pool slot.
    kwargs["reset"] = kwargs.get("reset") or keep_as_is
    kwargs.setdefault("max_idle", MAX_IDLE)
    return kwargs


def _with_password(conn_kwargs: Any, password: str) -> Any:
    if callable(conn_kwargs):
        user_kwargs = conn_kwargs

        async def with_password() -> dict[str, Any]:
            return {**await resolve_kwargs(user_kwargs), "password": password}

        return with_password
    return {**(conn_kwargs or {}), "password": password}


def connect_kwargs(
    name: str, kwargs: dict[str, Any], params: dict[str, str] | None, transaction_pooler: bool
) -> dict[str, Any]:
    """The keyword arguments of each ``connect()``: autocommit, our application_name."""
    if kwargs.get("autocommit", True) is not True:
        raise ConfigurationError(
            "DBPool connections are in autocommit mode; use TransactionDep or "
            "`async with conn.transaction():` for transactions instead of autocommit=False."
        )
    kwargs["autocommit"] = True
    if params is not None and "application_name" not in params:
        kwargs.setdefault("application_name", name)  # (a conninfo callable's: added to it)
    if transaction_pooler:
        _pooler.check_settings(params or {}, kwargs)
    return kwargs


async def resolve_kwargs(source: Any) -> dict[str, Any]:
    """A psycopg_pool ``kwargs=`` value as a dict: a mapping, or a (sync or async) callable."""
    got = source() if callable(source) else source
    if inspect.isawaitable(got):
        got = await got
    return dict(got or {})


async def keep_as_is(conn: AsyncConnection[Any]) -> None:
    """A reset that changes nothing: connections come back idle already (see give_back)."""


def _outside_requests(
    check: Callable[[Any], Awaitable[None]],
) -> Callable[[Any], Awaitable[None]]:
    """psycopg_pool runs `check` in the task asking for a connection, before it is ours."""

    async def checked(conn: Any) -> None:
        token = request_lease.set(None)
        try:
            await check(conn)
        finally:
            request_lease.reset(token)

    return checked
