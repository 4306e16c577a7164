"""ConnectionDep and TransactionDep: one lazy checkout per request, released before the response.

Each is a single yield dependency, because FastAPI solves every level of dependencies on
every request. The first of them in a request checks a connection out and the other
shares it (`held_lease`), so a request never waits for a second connection while it
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

from ._cleanup import roll_back
from ._connection import Lease, held_lease
from ._pooler import bound_transaction
from ._state import runtime_of
from ._transaction import begin, commit, transaction


async def _connection(connection: HTTPConnection) -> AsyncIterator[AsyncConnection[Any]]:
    held = held_lease()
    if held is not None:  # TransactionDep of this request checked it out: share it
        yield held.conn
        return
    runtime = runtime_of(connection)
    lease = await runtime.acquire(for_request=True)
    try:
        yield lease.conn
    finally:
        await runtime.release(lease)


async def _transaction(connection: HTTPConnection) -> AsyncIterator[AsyncConnection[Any]]:
    # BEGIN and COMMIT inline rather than through `transaction()`: one context-manager
    # layer less on every request.
    lease = held_lease()  # ConnectionDep of this request checked it out: share it
    runtime = None
    if lease is None:
        runtime = runtime_of(connection)
        lease = await runtime.acquire(for_request=True)
    try:
        tx = await begin(lease.conn)
        try:
            if lease.conn._dbpool_local_timeouts:
                await bound_transaction(lease.conn)
            yield lease.conn
        except BaseException as exc:
            await roll_back(tx, exc, lease.cleanup_timeout)
            raise
        await commit(tx, lease.cleanup_timeout, lease.control)
    finally:
        if runtime is not None:
            await runtime.release(lease)


_Connection = Annotated[AsyncConnection[Any], Depends(_connection, scope="function")]
_Transaction = Annotated[AsyncConnection[Any], Depends(_transaction, scope="function")]


async def get_connection(conn: _Connection) -> AsyncConnection[Any]:
    """The request's connection, in autocommit mode: each statement commits on its own.

    Use ``async with conn.transaction():`` for a transaction inside the handler. The
    connection is checked out when the first dependency of the request asks for it
    (waiting at most ``acquire_timeout``, else 503) and given back when the endpoint
    returns or raises, rolled back if a transaction was left open. If the request also
    uses `TransactionDep`, both are the same connection, inside that transaction.
    For a typed alias: ``Annotated[AsyncConnection[DictRow], Depends(get_connection)]``.
    """
    return conn


async def get_transaction(conn: _Transaction) -> AsyncConnection[Any]:
    """The request's connection inside a transaction, committed before the response is sent.

    COMMIT when the endpoint returns; ROLLBACK when anything is raised, `HTTPException`
    and cancellation included. A failed COMMIT propagates (a 500 by default), never a 2xx
    for data that is not there. Nested ``conn.transaction()`` blocks are savepoints.
    """
    return conn


async def _stream_checkout(connection: HTTPConnection) -> AsyncIterator[Lease]:
    async with runtime_of(connection).lease(for_request=True, stream=True) as lease:
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


ConnectionDep = _Connection
"""A request's connection (autocommit); see `get_connection`."""

TransactionDep = _Transaction
"""A request's connection inside one transaction; see `get_transaction`."""

StreamTransactionDep = Annotated[AsyncConnection[Any], Depends(get_stream_transaction)]
"""A transaction that lasts until a streamed response has been sent; see
`get_stream_transaction`."""
