"""psycopg's errors that a client caused, or that a retry would undo, as HTTP answers (opt-in).

Without a handler, a unique violation or a serialization failure is a 500 with a traceback,
and every service writes the same mapping. `handle_database_errors` installs it: an
integrity violation (SQLSTATE class 23) is the request's conflict with stored data, 409; a
serialization failure, a deadlock or a lock not available ends a transaction that the same
request, sent again, would likely complete: 503 with ``Retry-After``. A failed COMMIT of
`TransactionDep` (a deferred constraint) is answered the same way, before the response.

The body names the SQLSTATE and the constraint, never PostgreSQL's message: that quotes row
values (``Key (email)=(...) already exists``), another user's among them.
"""

from __future__ import annotations

import sys

import psycopg
from psycopg import errors as e
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .errors import ConfigurationError

#: answered 409 Conflict
CONFLICTS: tuple[type[psycopg.Error], ...] = (e.IntegrityError,)
#: answered 503 with Retry-After: the transaction was rolled back, and a retry may succeed
RETRYABLE: tuple[type[psycopg.Error], ...] = (
    e.SerializationFailure,
    e.DeadlockDetected,
    e.LockNotAvailable,
)


def handle_database_errors(app: Starlette, *, retry_after: int = 1) -> None:
    """Answer psycopg's integrity errors 409 and its retryable errors 503 with ``Retry-After``.

    Call once on the app (``handle_database_errors(app)``); a handler of your own for one of
    these classes, added after it, wins. Other psycopg errors stay 500s: they are bugs.
    PostgreSQL logs each deadlock itself; the answers are counted by your HTTP metrics.
    With SQLAlchemy imported first, its wrappers of these errors are answered the same.
    """
    if not isinstance(retry_after, int) or retry_after < 1:
        raise ConfigurationError(
            f"retry_after must be a whole number of seconds, at least 1; got {retry_after!r}."
        )

    async def conflict(request: Request, exc: Exception) -> Response:
        return JSONResponse(
            _body(exc, "The request conflicts with data already stored"), status_code=409
        )

    async def retry(request: Request, exc: Exception) -> Response:
        body = _body(exc, "The transaction conflicted with another one and was rolled back")
        body["detail"] += "; send the request again"
        return JSONResponse(body, status_code=503, headers={"Retry-After": str(retry_after)})

    for cls in CONFLICTS:
        app.add_exception_handler(cls, conflict)
    for cls in RETRYABLE:
        app.add_exception_handler(cls, retry)
    # SQLAlchemy (fastapi_dbpool.sqlalchemy) raises psycopg's error wrapped, as `.orig`
    orm_errors = sys.modules.get("sqlalchemy.exc")
    if orm_errors is not None:

        async def unwrap(request: Request, exc: Exception) -> Response:
            original = getattr(exc, "orig", None)
            if isinstance(original, CONFLICTS):
                return await conflict(request, original)
            if isinstance(original, RETRYABLE):
                return await retry(request, original)
            raise exc

        app.add_exception_handler(orm_errors.DBAPIError, unwrap)


def _body(exc: Exception, what: str) -> dict[str, str]:
    assert isinstance(exc, psycopg.Error)  # registered for psycopg's classes only
    sqlstate, constraint = exc.sqlstate or "", exc.diag.constraint_name or ""
    detail = f"{what} ({type(exc).__name__}"
    detail += f" on constraint {constraint})" if constraint else ")"
    body = {"detail": detail, "sqlstate": sqlstate}
    if constraint:
        body["constraint"] = constraint
    return body
