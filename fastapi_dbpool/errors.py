"""Every error fastapi_dbpool raises, rooted at `DBPoolError`.

::

    DBPoolError
    ├── ConfigurationError      bad settings, found before anything connects
    ├── PoolNotRunningError     no lifespan ran for this app, or it already ended
    ├── WrongEventLoopError     the pool is used from a loop other than the one that opened it
    ├── PoolOpenError           startup could not reach PostgreSQL in time
    ├── PoolExhaustedError      no connection within the acquire timeout (an HTTP 503)
    ├── DeadlineExceededError   the request's deadline ran out (an HTTP 504)
    ├── ConnectionLostError     the connection broke under a statement (an HTTP 503); also
    │                           a psycopg.OperationalError, as psycopg would have raised
    ├── SessionStateError       a session-level statement refused behind a transaction pooler
    └── ConnectionMisuseError   a connection used outside the request and task it belongs to
        ├── ConnectionReleasedError   used after its request ended
        └── ConnectionInUseError      used by a second task while its request holds it

psycopg's own errors (a failing query, a failed COMMIT) pass through unwrapped, but for a
broken connection's: `ConnectionLostError` is a psycopg.OperationalError too.
`fastapi_dbpool.handle_database_errors` answers the ones a client can act on (409, 503).
Messages say what happened and what to do; none contains a password.
"""

from __future__ import annotations

import time

import psycopg
from starlette.exceptions import HTTPException

__all__ = [
    "ConfigurationError",
    "ConnectionInUseError",
    "ConnectionLostError",
    "ConnectionMisuseError",
    "ConnectionReleasedError",
    "DBPoolError",
    "DeadlineExceededError",
    "IsolationError",
    "PoolExhaustedError",
    "PoolNotRunningError",
    "PoolOpenError",
    "SessionStateError",
    "WrongEventLoopError",
]

_USE_OWN_CONNECTION = (
    "Work that outlives the request or runs in another task must take its own connection: "
    "`async with db.connection() as conn: ...`."
)

DEADLINE_DETAIL = "The request did not complete within its deadline."
COMMIT_UNKNOWN_DETAIL = (
    "The request did not complete within its deadline: the database did not answer its "
    "COMMIT, so whether the transaction was committed is unknown."
)


class DBPoolError(Exception):
    """Base class of every error raised by fastapi_dbpool."""


class ConfigurationError(DBPoolError, ValueError):
    """A setting is missing or malformed; the message names it and how to fix it."""


class PoolNotRunningError(DBPoolError, RuntimeError):
    """A connection was asked for while no pool is running for the app."""

    def __init__(self, detail: str = "", ended_at: float | None = None) -> None:
        if ended_at is not None:
            when = time.strftime("%H:%M:%S", time.localtime(ended_at))
            super().__init__(
                f"The connection pool is no longer running ({detail}): its lifespan ended at "
                f"{when}, {max(time.time() - ended_at, 0.0):.1f}s ago. A DBPool serves only "
                "while its lifespan (or `async with db.open():`) runs; work after that (a "
                "task that outlived shutdown, a second asyncio.run()) needs a block of its own."
            )
            return
        super().__init__(
            "No connection pool is running for this app"
            + (f" ({detail})" if detail else "")
            + ". Pass `lifespan=db.lifespan` to FastAPI(), or enter `db.lifespan(app)` inside "
            "your own lifespan; outside an app (a job, a script), use `async with db.open():`. "
            "With Starlette's TestClient, use it as a context manager "
            "(`with TestClient(app) as client:`) so that the lifespan runs."
        )


class WrongEventLoopError(DBPoolError, RuntimeError):
    """The pool was opened on one event loop and is used from another.

    asyncio objects cannot cross loops; psycopg_pool would wait until its timeout.
    """

    def __init__(self, name: str, opened_in: str, used_in: str, hint: str = "") -> None:
        super().__init__(
            f"The connection pool {name!r} was opened on the event loop of {opened_in} but is "
            f"used from a different event loop ({used_in}). A pool works only on the loop that "
            "opened it: run the app's lifespan on the loop that serves its requests (in tests, "
            "give the app fixture and the test the same event loop scope), or open another "
            "DBPool for the other loop." + (f" {hint}" if hint else "")
        )


class PoolOpenError(DBPoolError, RuntimeError):
    """The lifespan could not open the pool: PostgreSQL unreachable, refused or too slow."""

    def __init__(
        self, target: str, timeout: float, cause: str, name: str | None = None, hint: str = ""
    ) -> None:
        self.pool_name = name
        pool = "the connection pool" if name is None else f"pool {name!r}"
        super().__init__(
            f"Could not open {pool} to {target} within {timeout:g}s: {cause}. "
            + (
                f"hint: {hint}."
                if hint
                else "Check the connection URL (host, port, database, user, password), that "
                "the server is running and accepts connections, or raise open_timeout."
            )
        )


class PoolExhaustedError(DBPoolError, HTTPException):
    """No connection could be had in time; served to the client as 503 with Retry-After.

    Raised when the acquire timeout runs out or when psycopg_pool's ``max_waiting``
    queue is full. The request holds nothing when this is raised.
    """

    def __init__(self, name: str, timeout: float, retry_after: int, reason: str) -> None:
        self.pool_name = name
        DBPoolError.__init__(self, f"pool {name!r}: {reason}")
        HTTPException.__init__(
            self,
            status_code=503,
            detail=(
                f"The database is busy: no connection became free within {timeout:g}s. Retry later."
            ),
            headers={"Retry-After": str(retry_after)},
        )

    def __str__(self) -> str:
        return f"{self.status_code}: {self.detail} ({self.args[0]})"


class DeadlineExceededError(DBPoolError, HTTPException):
    """The request's deadline (see `CancellationMiddleware`) ran out; served as 504.

    Raised when the deadline, not ``acquire_timeout``, cut the wait for a connection; the
    middleware answers the same 504 when it cancels a request at its deadline.
    """

    def __init__(self) -> None:
        DBPoolError.__init__(self, DEADLINE_DETAIL)
        HTTPException.__init__(self, status_code=504, detail=DEADLINE_DETAIL)

    def __str__(self) -> str:
        return f"{self.status_code}: {self.detail}"


class ConnectionLostError(DBPoolError, HTTPException, psycopg.OperationalError):
    """The connection broke under a statement: served as 503 with Retry-After.

    A socket timeout (libpq's ``tcp_user_timeout``, keepalives), a reset, a server that
    went away: the statement's outcome is unknown and the connection is replaced. It is a
    ``psycopg.OperationalError`` too, with psycopg's error as its cause, so code that
    catches psycopg's error keeps working; uncaught, the client gets 503, not 500.
    """

    def __new__(cls, target: str, retry_after: int, cause: BaseException) -> ConnectionLostError:
        # Also of psycopg's own class (AdminShutdown, ...): `except` clauses naming it still
        # catch it, and its sqlstate and diag are psycopg's.
        own = type(cause)
        if (
            cls is ConnectionLostError
            and issubclass(own, psycopg.OperationalError)
            and own is not psycopg.OperationalError
        ):
            found = _lost_classes.get(own)
            if found is None:
                found = _lost_classes[own] = type(cls.__name__, (cls, own), {})
            cls = found
        return super().__new__(cls)

    def __init__(self, target: str, retry_after: int, cause: BaseException) -> None:
        self.target = target
        message = f"the connection to {target} broke under a statement: {cause}"
        DBPoolError.__init__(self, message)
        if isinstance(cause, psycopg.Error):
            psycopg.OperationalError.__init__(
                self, message, info=cause.pgresult, pgconn=cause.pgconn
            )
        else:
            psycopg.OperationalError.__init__(self, message)
        HTTPException.__init__(
            self,
            status_code=503,
            detail="The connection to the database was lost. Retry later.",
            headers={"Retry-After": str(retry_after)},
        )

    def __str__(self) -> str:
        return str(self.args[0])


_lost_classes: dict[type[BaseException], type[ConnectionLostError]] = {}


class SessionStateError(DBPoolError, RuntimeError):
    """A statement that sets or relies on session state, refused before it was sent.

    Only with ``DBPool(transaction_pooler=True)``: behind a transaction pooler a session
    ``SET``, ``LISTEN``, ``PREPARE`` or a session advisory lock would be shared with other
    clients, or lost at the next statement. The message names the alternative.
    """


class ConnectionMisuseError(DBPoolError, RuntimeError):
    """A connection was used outside the request and task it was handed to."""


class ConnectionReleasedError(ConnectionMisuseError):
    """A request's connection was used after the request gave it back to the pool."""

    def __init__(self) -> None:
        super().__init__(
            "This connection was handed to a request that has ended; it went back to the pool "
            "and may now serve another request, so it was not touched. This happens in "
            "BackgroundTasks, in tasks that outlive the handler, and in streaming response "
            f"bodies. {_USE_OWN_CONNECTION}"
        )


class ConnectionInUseError(ConnectionMisuseError):
    """A second task used a connection while the request it belongs to holds it."""

    def __init__(self, same_request: bool) -> None:
        whose = "its request" if same_request else "another request"
        super().__init__(
            f"This connection belongs to a task of {whose} and was used from a different task. "
            "A connection runs one statement at a time, and a task may outlive the request. "
            f"{_USE_OWN_CONNECTION}"
            + (
                " To share it with tasks that you await before the handler returns, create "
                "the pool with DBPool(..., allow_concurrent_tasks=True)."
                if same_request
                else ""
            )
        )


class IsolationError(DBPoolError, AssertionError):
    """The code under test ended the transaction a test's isolation rolls back at its end.

    Raised by `fastapi_dbpool.testing` when the test ends: what was committed is in the
    test database, and later tests may see it.
    """

    def __init__(self, name: str, how: str) -> None:
        super().__init__(
            f"Rollback isolation was broken in pool {name!r}: the code under test ended the "
            f"test's transaction ({how}), so what it wrote was committed and may be seen by "
            "later tests. Use `async with conn.transaction():` or TransactionDep instead of "
            "COMMIT/ROLLBACK statements or conn.commit(); or, for a test that must commit "
            "for real, override the dbpool_isolation fixture to return 'database' (a fresh "
            "database for the test)."
        )
