"""Transaction-pooler mode: correct behind PgBouncer (pool_mode=transaction) and its peers.

Behind a transaction pooler each transaction, and each autocommit statement, may run on
another server backend, shared with other clients. Session state set by one client is
then seen by others, and state one statement relies on may be gone at the next. In this
mode (``DBPool(transaction_pooler=True)``):

- no server-side prepared statements (psycopg's ``prepare_threshold=None``), unless the
  user sets ``prepare_threshold`` (PgBouncer 1.21+ with ``max_prepared_statements``);
- the deadline reaches PostgreSQL as a ``statement_timeout`` local to the request's
  transaction (`bound_transaction`), never as a session ``SET``;
- statements that would set or rely on session state (`session_statement`) are refused
  before they are sent, with the alternative;
- startup ``options`` are refused when the pool is built (PgBouncer rejects them).

`detect` tells, at open, whether a pooler stands in front at all; a pool left undecided
takes this mode when one does (`undecided_behind_a_pooler`): from the client, a pooler that
pools by transaction looks like one that pools by session, and this mode is safe behind both.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from psycopg import AsyncConnection, AsyncCursor, sql
from psycopg.pq import TransactionStatus

from ._connection import GuardedConnection, run_own
from ._deadline import current_control, statement_timeout_ms
from ._log import fields
from .errors import ConfigurationError, SessionStateError

logger = logging.getLogger("fastapi_dbpool")

_LEADING = re.compile(r"(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/)*", re.S)
_FIRST_WORDS = re.compile(r"([A-Za-z]+)(?:\s+([A-Za-z]+))?")
_SESSION_LOCK = re.compile(r"\bpg_(?:try_)?advisory_(?:un)?lock(?:_shared|_all)?\s*\(", re.I)
# SET forms that change only the current transaction
_SET_OK = {"LOCAL", "TRANSACTION", "CONSTRAINTS"}

_FIXES = {
    "SET": "use SET LOCAL inside a transaction (TransactionDep, or `async with "
    "conn.transaction():`), or set it per role or database (ALTER ROLE ... SET)",
    "LISTEN": "LISTEN needs a session of its own: use a DBPool connected to PostgreSQL "
    "directly (not through the pooler) for notifications",
    "PREPARE": "prepared statements do not survive the transaction; run the statement itself",
    "LOCK": "use pg_advisory_xact_lock() (or pg_try_advisory_xact_lock()) inside a "
    "transaction: it is released at COMMIT or ROLLBACK, on the backend that took it",
}


def session_statement(query: object) -> str | None:
    """The kind of session-level statement `query` is ("SET", "LISTEN"...), or None.

    A look at the statement's first words and for session advisory-lock calls, not a
    parser: `sql.Composed` queries are rendered first; anything else passes.
    """
    if isinstance(query, sql.Composable):
        try:
            query = query.as_string(None)
        except Exception:
            return None
    if isinstance(query, bytes):
        query = query.decode("utf-8", "replace")
    if not isinstance(query, str):
        return None
    start = _LEADING.match(query)
    words = _FIRST_WORDS.match(query, start.end() if start else 0)
    if words:
        first = words.group(1).upper()
        second = (words.group(2) or "").upper()
        if first == "SET" and second not in _SET_OK:
            return "SET"
        if first in ("LISTEN", "PREPARE"):
            return first
    if _SESSION_LOCK.search(query):
        return "LOCK"
    return None


def _refuse(query: object) -> None:
    kind = session_statement(query)
    if kind is not None:
        what = "a session advisory lock" if kind == "LOCK" else f"a {kind} statement"
        raise SessionStateError(
            f"Refused {what}: behind a transaction pooler (transaction_pooler=True) session "
            f"state is shared with other clients or lost between statements; {_FIXES[kind]}."
        )


class PoolerCursorMixin:
    """Refuses session-level statements (see `session_statement`) before they are sent."""

    async def execute(self, query: Any, *args: Any, **kwargs: Any) -> Any:
        _refuse(query)
        return await super().execute(query, *args, **kwargs)  # type: ignore[misc]

    async def executemany(self, query: Any, *args: Any, **kwargs: Any) -> Any:
        _refuse(query)
        return await super().executemany(query, *args, **kwargs)  # type: ignore[misc]

    def stream(self, query: Any, *args: Any, **kwargs: Any) -> Any:
        _refuse(query)
        return super().stream(query, *args, **kwargs)  # type: ignore[misc]


_cursor_classes: dict[type[Any], type[Any]] = {}


def pooler_cursor(base: type[Any] | None) -> type[Any]:
    """`base` (psycopg's `AsyncCursor` by default) with the session-statement check."""
    base = base or AsyncCursor
    if issubclass(base, PoolerCursorMixin):
        return base
    if base not in _cursor_classes:
        _cursor_classes[base] = type(f"Pooler{base.__name__}", (PoolerCursorMixin, base), {})
    return _cursor_classes[base]


def check_options(params: dict[str, str]) -> None:
    """Refuse startup ``options`` in connection parameters: a transaction pooler cannot."""
    if params.get("options"):
        raise ConfigurationError(
            "transaction_pooler=True: PgBouncer refuses the startup parameter `options` "
            "(unsupported startup parameter: options), and poolers share the session it "
            "would configure. Set those settings per role or database (ALTER ROLE ... SET), "
            "or SET LOCAL them in a transaction."
        )


def check_settings(params: dict[str, str], kwargs: dict[str, Any]) -> None:
    """Refuse what a transaction pooler cannot take; set psycopg's defaults for it."""
    check_options({**params, **kwargs})
    kwargs.setdefault("prepare_threshold", None)
    kwargs["cursor_factory"] = pooler_cursor(kwargs.get("cursor_factory"))


async def detect(conn: AsyncConnection[Any]) -> bool:
    """Whether a pooler stands between `conn` and PostgreSQL.

    A pooler answers the connection's start-up itself: the backend PID it reports is not
    that of the server process running the statements.
    """
    row = await (await run_own(conn, "SELECT pg_backend_pid()")).fetchone()
    return row is not None and row[0] != conn.info.backend_pid


def undecided_behind_a_pooler(
    name: str, build: Callable[[], dict[str, Any]]
) -> dict[str, Any] | None:
    """A pooler answered at open, and the pool's mode was not chosen: the pool's settings
    in this mode (`build`), logged; None when its connection settings cannot take the mode
    (startup ``options``), warned, and the pool stays as it is."""
    silence = (
        "transaction_pooler=True (DBPOOL_TRANSACTION_POOLER=1) if it pools by transaction, "
        "False if it pools by session"
    )
    try:
        kwargs = build()
    except ConfigurationError as ex:
        logger.warning(
            "pool %r: a connection pooler stands between the app and PostgreSQL (the "
            "backend PID it reports is not the server's), and the pool stays in session "
            "mode: %s If the pooler pools by transaction (PgBouncer pool_mode=transaction, "
            "RDS Proxy, Supavisor), session state leaks between clients. hint: say which "
            "it is: %s.",
            name,
            ex,
            silence,
            extra=fields("pooler_detected", name, mode="session"),
        )
        return None
    logger.warning(
        "pool %r: a connection pooler stands between the app and PostgreSQL (the backend "
        "PID it reports is not the server's): running in transaction-pooler mode, safe "
        "whether it pools by transaction or by session (no prepared statements, deadlines "
        "as transaction-local timeouts, session-level statements refused). hint: say which "
        "it is to silence this: %s (keeps prepared statements and session settings).",
        name,
        silence,
        extra=fields("pooler_detected", name, mode="transaction"),
    )
    return kwargs


async def bound_transaction(conn: AsyncConnection[Any]) -> None:
    """In a just-begun transaction: the request's deadline as a transaction-local timeout.

    Never looser than the session's own ``statement_timeout``; nothing when the request
    has no deadline (or runs outside `CancellationMiddleware`).
    """
    control = current_control.get()
    if control is None or not control.active or control.deadline == float("inf"):
        return
    if conn.pgconn.transaction_status != TransactionStatus.INTRANS:
        return
    want = statement_timeout_ms(max(control.deadline - time.monotonic(), 0.0))
    await run_own(
        conn,
        "SELECT set_config('statement_timeout', (CASE WHEN setting::bigint = 0 THEN "
        f"{want} ELSE least(setting::bigint, {want}) END)::text, true) "
        "FROM pg_settings WHERE name = 'statement_timeout'",
    )


class PoolerConnectionMixin:
    """A `GuardedConnection` behind a transaction pooler: deadlines local to transactions."""

    _dbpool_local_timeouts = True

    @asynccontextmanager
    async def transaction(
        self, savepoint_name: str | None = None, force_rollback: bool = False
    ) -> AsyncIterator[Any]:
        conn: Any = self
        outermost = conn.pgconn.transaction_status == TransactionStatus.IDLE
        async with super().transaction(savepoint_name, force_rollback) as tx:  # type: ignore[misc]
            if outermost:
                await bound_transaction(conn)
            yield tx


_pooler_classes: dict[type[GuardedConnection], type[GuardedConnection]] = {}


def pooler_class(guarded: type[GuardedConnection]) -> type[GuardedConnection]:
    """`guarded` with `PoolerConnectionMixin` mixed in."""
    if issubclass(guarded, PoolerConnectionMixin):
        return guarded
    if guarded not in _pooler_classes:
        name = f"Pooler{guarded.__name__}"
        _pooler_classes[guarded] = type(name, (PoolerConnectionMixin, guarded), {})
    return _pooler_classes[guarded]
