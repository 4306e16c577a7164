"""ConnectionDep and TransactionDep: one lazy checkout per request, released before the response.

Both depend on `_checkout`, which FastAPI caches per request, so every dependency of a
request shares one connection and a request can never wait for a second one while it
holds the first. `scope="function"` ends them when the endpoint returns, before the
response is sent: a failed COMMIT becomes a 500, and the connection goes back to the pool
without waiting for a slow client to read the response.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends
from psycopg import AsyncConnection
from starlette.requests import HTTPConnection

from ._connection import Lease
from ._state import runtime_of
from ._transaction import transaction


async def _checkout(connection: HTTPConnection) -> AsyncIterator[Lease]:
    async with runtime_of(connection).lease(for_request=True) as lease:
        yield lease


_Checkout = Annotated[Lease, Depends(_checkout, scope="function")]


async def get_connection(lease: _Checkout) -> AsyncConnection[Any]:
    """The request's connection, in autocommit mode: each statement commits on its own.

    Use ``async with conn.transaction():`` for a transaction inside the handler. The
    connection is checked out when the first dependency of the request asks for it
    (waiting at most ``acquire_timeout``, else 503) and given back when the endpoint
    returns or raises, rolled back if a transaction was left open. If the request also
    uses `TransactionDep`, both are the same connection, inside that transaction.
    """
    return lease.conn


async def get_transaction(lease: _Checkout) -> AsyncIterator[AsyncConnection[Any]]:
    """The request's connection inside a transaction, committed before the response is sent.

    COMMIT when the endpoint returns; ROLLBACK when anything is raised, `HTTPException`
    and cancellation included. A failed COMMIT propagates (a 500 by default), never a 2xx
    for data that is not there. Nested ``conn.transaction()`` blocks are savepoints.
    """
    async with transaction(lease.conn, lease.cleanup_timeout, lease.control) as conn:
        yield conn


async def _stream_checkout(connection: HTTPConnection) -> AsyncIterator[Lease]:
    async with runtime_of(connection).lease(for_request=True, shared=True) as lease:
        yield lease


async def get_stream_transaction(
    lease: Annotated[Lease, Depends(_stream_checkout, scope="request")],
) -> AsyncIterator[AsyncConnection[Any]]:
    """A connection inside a transaction that lasts until the response has been sent.

    For a `StreamingResponse` whose body reads or writes the database. COMMIT after the
    last chunk is sent; ROLLBACK if the body raises, or if `CancellationMiddleware` cancels
    the request (deadline, or the client hung up mid-stream): a cut stream never commits.
    Without the middleware a client that hangs up is not noticed by every server, and the
    work is committed. A failed COMMIT cannot change a response already sent: it is raised
    to the server, which logs it. The connection is held for the whole response, so keep
    such streams few; a request that uses this cannot also use `ConnectionDep` or
    `TransactionDep` (`ConnectionInUseError`).
    """
    async with transaction(lease.conn, lease.cleanup_timeout, lease.control) as conn:
        yield conn


ConnectionDep = Annotated[AsyncConnection[Any], Depends(get_connection)]
"""A request's connection (autocommit); see `get_connection`."""

TransactionDep = Annotated[AsyncConnection[Any], Depends(get_transaction, scope="function")]
"""A request's connection inside one transaction; see `get_transaction`."""

StreamTransactionDep = Annotated[AsyncConnection[Any], Depends(get_stream_transaction)]
"""A transaction that lasts until a streamed response has been sent; see
`get_stream_transaction`."""
