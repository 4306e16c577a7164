"""ConnectionDep and TransactionDep: one lazy checkout per request, released before the response.

Each is a single yield dependency, because FastAPI solves every level of dependencies on
every request. The first of them in a request checks a connection out and the other
shares it (`held_lease`), so a request never waits for a second connection while it
holds the first. `scope="function"` ends them when the endpoint returns, before the
response is sent: a failed COMMIT becomes a 500, and the connection goes back to the pool
without waiting for a slow client to read the response.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends
from psycopg import AsyncConnection
from starlette.requests import HTTPConnection

from ._cleanup import roll_back
from ._connection import Lease, held_lease
from ._metrics import route_of
from ._pooler import bound_transaction
from ._registry import runtime_of
from ._transaction import begin, commit, transaction
from .errors import ConfigurationError

if TYPE_CHECKING:
    from ._state import PoolRuntime


class PoolDependencies:
    """ConnectionDep, TransactionDep and StreamTransactionDep for one way of finding the
    request's pool: the app's only one (the module-level aliases), or a DBPool's own."""

    def __init__(self, find: Callable[[HTTPConnection], PoolRuntime]) -> None:
        async def connection_(connection: HTTPConnection) -> AsyncIterator[AsyncConnection[Any]]:
            runtime = find(connection)
            held = held_lease(runtime)
            if held is not None:  # TransactionDep of this request checked it out: share it
                yield held.conn
                return
            lease = await runtime.acquire(for_request=True, route=route_of(connection.scope))
            try:
                yield lease.conn
            except BaseException as exc:
                runtime.failed(exc)
                raise
            finally:
                await runtime.release(lease)

        async def transaction_(connection: HTTPConnection) -> AsyncIterator[AsyncConnection[Any]]:
            # BEGIN and COMMIT inline rather than through `transaction()`: one context-manager
            # layer less on every request.
            runtime = find(connection)
            lease = held_lease(runtime)  # ConnectionDep of this request checked it out: share
            ours = lease is None
            if lease is None:
                lease = await runtime.acquire(for_request=True, route=route_of(connection.scope))
            elif lease.orm is not None:
                # its transaction would end first, under the ORM's still open inside it
                raise ConfigurationError(
                    "TransactionDep is declared after a SQLAlchemy session (or Core "
                    "connection) of the same pool: declare TransactionDep first, and the "
                    "session's transaction is a savepoint inside it; or use the session alone."
                )
            try:
                tx = await begin(lease.conn, lease.cleanup_timeout)
                try:
                    if lease.conn._dbpool_local_timeouts:
                        await bound_transaction(lease.conn)
                    yield lease.conn
                except BaseException as exc:
                    runtime.failed(exc)
                    await roll_back(tx, exc, lease.cleanup_timeout)
                    raise
                await commit(tx, lease.cleanup_timeout, lease.control)
            finally:
                if ours:
                    await runtime.release(lease)

        connection_dep = Annotated[AsyncConnection[Any], Depends(connection_, scope="function")]
        transaction_dep = Annotated[AsyncConnection[Any], Depends(transaction_, scope="function")]

        async def get_connection(conn: AsyncConnection[Any]) -> AsyncConnection[Any]:
            """The request's connection, in autocommit mode: each statement commits on its own.

            Use ``async with conn.transaction():`` for a transaction inside the handler. The
            connection is checked out when the first dependency of the request asks for it
            (waiting at most ``acquire_timeout``, else 503) and given back when the endpoint
            returns or raises, rolled back if a transaction was left open. If the request also
            uses `TransactionDep`, both are the same connection, inside that transaction.
            For a typed alias: ``Annotated[AsyncConnection[DictRow], Depends(get_connection)]``.
            """
            return conn

        async def get_transaction(conn: AsyncConnection[Any]) -> AsyncConnection[Any]:
            """The request's connection inside a transaction, committed before the response is sent.

            COMMIT when the endpoint returns; ROLLBACK when anything is raised, `HTTPException`
            and cancellation included. A failed COMMIT propagates (a 500 by default), never a 2xx
            for data that is not there. Nested ``conn.transaction()`` blocks are savepoints.
            """
            return conn

        async def stream_checkout(connection: HTTPConnection) -> AsyncIterator[Lease]:
            async with find(connection).lease(
                for_request=True, stream=True, route=route_of(connection.scope)
            ) as lease:
                yield lease

        async def get_stream_transaction(lease: Lease) -> AsyncIterator[AsyncConnection[Any]]:
            """A connection inside a transaction that lasts until the response has been sent.

            For a `StreamingResponse` whose body reads or writes the database. COMMIT after the
            last chunk is sent; ROLLBACK if the body raises, or if `CancellationMiddleware`
            cancels the request (deadline, or the client hung up mid-stream): a cut stream
            never commits. Without the middleware a client that hangs up is not noticed by
            every server, and the work is committed. A failed COMMIT cannot change a response
            already sent: it is raised to the server, which logs it. The connection is held
            for the whole response, so keep such streams few; a request that uses this cannot
            also use `ConnectionDep` or `TransactionDep` of the same pool
            (`ConnectionInUseError`).
            """
            async with transaction(lease.conn, lease.cleanup_timeout, lease.control) as conn:
                yield conn

        # FastAPI reads what each parameter depends on from its annotation; these name
        # this instance's dependencies, which no module-level name could
        get_connection.__annotations__["conn"] = connection_dep
        get_transaction.__annotations__["conn"] = transaction_dep
        get_stream_transaction.__annotations__["lease"] = Annotated[
            Lease, Depends(stream_checkout, scope="request")
        ]
        self.connection_dependency = connection_
        self.transaction_dependency = transaction_
        self.get_connection = get_connection
        self.get_transaction = get_transaction
        self.get_stream_transaction = get_stream_transaction
        #: A request's connection (autocommit); see `get_connection`.
        self.ConnectionDep: Any = connection_dep
        #: A request's connection inside one transaction; see `get_transaction`.
        self.TransactionDep: Any = transaction_dep
        #: A transaction that lasts until a streamed response has been sent.
        self.StreamTransactionDep: Any = Annotated[
            AsyncConnection[Any], Depends(get_stream_transaction)
        ]


_only = PoolDependencies(runtime_of)  # the app's only pool

get_connection = _only.get_connection
get_transaction = _only.get_transaction
get_stream_transaction = _only.get_stream_transaction

ConnectionDep = Annotated[
    AsyncConnection[Any], Depends(_only.connection_dependency, scope="function")
]
"""A request's connection (autocommit); see `get_connection`."""

TransactionDep = Annotated[
    AsyncConnection[Any], Depends(_only.transaction_dependency, scope="function")
]
"""A request's connection inside one transaction; see `get_transaction`."""

StreamTransactionDep = Annotated[AsyncConnection[Any], Depends(get_stream_transaction)]
"""A transaction that lasts until a streamed response has been sent; see
`get_stream_transaction`."""
