"""SQLAlchemy 2 and SQLModel sessions on a DBPool's connections, with its guarantees.

``pip install 'fastapi_dbpool[sqlalchemy]'``, then::

    db = DBPool.from_env()
    orm = Sessions(db)  # session_class=sqlmodel.ext.asyncio.session.AsyncSession for SQLModel
    SessionDep = orm.SessionDep

    @app.post("/items")
    async def create(item: Item, session: SessionDep) -> Item:
        session.add(item)
        return item  # committed before the response is sent

Each session runs on the request's lease of the pool, the one `ConnectionDep` and
`TransactionDep` share: checked out lazily (503 on exhaustion), bounded by the request's
deadline (its statements cancelled on the server first), owned by the request's task,
and given back by the package, rolled back, however the request ends. SQLAlchemy never
opens, resets or closes a connection itself (`_sqlalchemy_dialect`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Annotated, Any, Generic, TypeVar, cast, overload

from fastapi import Depends
from psycopg import Rollback
from psycopg.rows import tuple_row
from sqlalchemy import event
from sqlalchemy.dialects import registry
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.pool import NullPool
from starlette.requests import HTTPConnection

from . import _cleanup, _sqlalchemy_dialect
from . import _sqlalchemy_lending as _lending
from ._connection import Lease, held_lease
from ._metrics import route_of
from ._registry import Finder
from .errors import ConfigurationError

if TYPE_CHECKING:
    from ._connection import GuardedConnection
    from ._dbpool import DBPool
    from ._replicas import ReadReplicas
    from ._state import PoolRuntime

__all__ = ["Sessions"]

logger = logging.getLogger("fastapi_dbpool")
S = TypeVar("S", bound=AsyncSession)

registry.register(_sqlalchemy_dialect.NAME, "fastapi_dbpool._sqlalchemy_dialect", "GuardedDialect")

# what Sessions decides itself, and why a user's value cannot apply
_OWNED_ENGINE_OPTIONS = {
    "poolclass": "the connections are the DBPool's",
    "pool": "the connections are the DBPool's",
    "creator": "the connections are the DBPool's",
    "async_creator": "the connections are the DBPool's",
    "pool_size": "set min_size/max_size on the DBPool",
    "max_overflow": "set max_size on the DBPool",
    "pool_timeout": "set acquire_timeout on the DBPool",
    "pool_recycle": "set max_lifetime on the DBPool",
    "pool_pre_ping": "the DBPool checks each connection it hands out",
    "pool_reset_on_return": "the DBPool rolls back each connection it takes back",
    "isolation_level": "pass it per connection: execution_options(isolation_level=...)",
    "connect_args": "pass connection settings to the DBPool",
}


class Sessions(Generic[S]):
    """SQLAlchemy sessions and Core connections on `db`'s connections.

    - ``SessionDep``: the request's `AsyncSession` (or `session_class`), committed when
      the endpoint returns, before the response (a failed COMMIT is a 500, never a 2xx),
      rolled back on any exception, `HTTPException` and cancellation included; under
      `CancellationMiddleware`, a request being cut never commits.
    - ``CoreDep``: the request's SQLAlchemy `AsyncConnection`, the same way.
    - `session` and `connect`: the same outside a request (jobs, scripts).
    - `engine`: for ``run_sync(metadata.create_all)`` on `connect`, and SQLAlchemy's
      events; it connects only through these.

    A request's session, Core connection, `ConnectionDep` and `TransactionDep` of one pool
    are one connection. With `TransactionDep` (or a test's rollback isolation) the session's
    transactions are savepoints inside that transaction. ``expire_on_commit`` defaults to
    False: the session is committed before the response is serialised, and expired
    objects would load again, one query each, or fail outside the session.
    With ``reader=ReadReplicas(db, ...)``, ``ReadSessionDep`` (and
    ``read_session_dependency``) is a session routed as `ReadReplicas.ReadDep` is: a
    ``READ ONLY`` transaction on a fit replica, or the request's own primary connection.
    `session_options` go to the session class; `engine_options` to
    ``create_async_engine`` (``echo``, ``json_serializer``...), except those the DBPool
    owns (pool sizes and timeouts, creators, isolation level), which raise
    `ConfigurationError` naming their place.
    """

    @overload
    def __init__(
        self: Sessions[AsyncSession],
        db: DBPool,
        *,
        expire_on_commit: bool = False,
        engine_options: Mapping[str, Any] | None = None,
        reader: ReadReplicas | None = None,
        **session_options: Any,
    ) -> None: ...

    @overload
    def __init__(
        self,
        db: DBPool,
        *,
        session_class: type[S],
        expire_on_commit: bool = False,
        engine_options: Mapping[str, Any] | None = None,
        reader: ReadReplicas | None = None,
        **session_options: Any,
    ) -> None: ...

    def __init__(
        self,
        db: DBPool,
        *,
        session_class: type[Any] = AsyncSession,
        expire_on_commit: bool = False,
        engine_options: Mapping[str, Any] | None = None,
        reader: ReadReplicas | None = None,
        **session_options: Any,
    ) -> None:
        if reader is not None and reader.primary is not db:
            raise ConfigurationError(
                "Sessions(db, reader=...): the reader's primary is "
                f"{reader.primary.name!r}, not {db.name!r}; pass the ReadReplicas whose "
                "primary is this DBPool, so that a request's reads and writes share its "
                "connection."
            )
        options = dict(engine_options or {})
        for name in options:
            if name in _OWNED_ENGINE_OPTIONS:
                raise ConfigurationError(
                    f"Sessions(engine_options={{{name!r}: ...}}) cannot apply: "
                    f"{_OWNED_ENGINE_OPTIONS[name]}."
                )
        if "bind" in session_options or "binds" in session_options:
            raise ConfigurationError(
                "Sessions binds each session to its request's connection; create another "
                "Sessions on another DBPool for another database."
            )
        if not (isinstance(session_class, type) and issubclass(session_class, AsyncSession)):
            raise ConfigurationError(
                "session_class must be sqlalchemy.ext.asyncio.AsyncSession or a subclass "
                f"(SQLModel's AsyncSession is one); got {session_class!r}."
            )
        self.db = db
        self.session_class: type[S] = cast("type[S]", session_class)
        self.session_options = {"expire_on_commit": expire_on_commit, **session_options}
        #: SQLAlchemy's engine on the pool's connections (see the class docstring)
        self.engine: AsyncEngine = create_async_engine(
            _sqlalchemy_dialect.URL,
            poolclass=NullPool,
            async_creator=_lending.lend,
            pool_reset_on_return=None,
            **options,
        )
        event.listen(
            self.engine.sync_engine, "handle_error", _lending.unwrap_own_errors, retval=True
        )
        db._on_open.append(self._prepare)
        find = Finder(db.name)

        async def session_(connection: HTTPConnection) -> AsyncIterator[S]:
            async with (
                self._request_lease(find(connection), connection) as lease,
                self._session_on(lease) as session,
            ):
                yield session

        async def core_(connection: HTTPConnection) -> AsyncIterator[AsyncConnection]:
            async with (
                self._request_lease(find(connection), connection) as lease,
                self._connection_on(lease) as conn,
            ):
                yield conn

        #: ``Depends(...)`` of the request's session, for a typed alias of your own:
        #: ``SessionDep = Annotated[AsyncSession, orm.session_dependency]``
        self.session_dependency: Any = Depends(session_, scope="function")
        #: ``Depends(...)`` of the request's Core connection, as `session_dependency`
        self.core_dependency: Any = Depends(core_, scope="function")
        #: The request's session, committed before the response (see the class docstring).
        self.SessionDep: Any = Annotated[session_class, self.session_dependency]
        #: The request's SQLAlchemy Core connection, committed before the response.
        self.CoreDep: Any = Annotated[AsyncConnection, self.core_dependency]
        self._read_dependency: Any = None
        if reader is not None:
            read = asynccontextmanager(reader._read)

            async def read_session_(connection: HTTPConnection) -> AsyncIterator[S]:
                async with read(connection) as conn:
                    lease = cast("GuardedConnection", conn)._dbpool_lease
                    assert lease is not None
                    async with self._session_on(lease) as session:
                        yield session

            self._read_dependency = Depends(read_session_, scope="function")

    @property
    def read_session_dependency(self) -> Any:
        """``Depends(...)`` of the request's read session: ``ReadSessionDep`` for an alias of
        your own, ``Annotated[AsyncSession, orm.read_session_dependency]``."""
        if self._read_dependency is None:
            raise ConfigurationError(
                f"Sessions({self.db.name!r}) has no read sessions: create it with "
                "reader=ReadReplicas(db, replica, ...) to route them to the replicas."
            )
        return self._read_dependency

    @property
    def ReadSessionDep(self) -> Any:
        """The request's session in a ``READ ONLY`` transaction on a fit replica, routed
        as `ReadReplicas.ReadDep` is (the request's own primary connection when it holds
        one; the primary, read-only, when no replica is fit)."""
        return Annotated[self.session_class, self.read_session_dependency]

    def __repr__(self) -> str:
        return f"<Sessions of {self.db!r} {self.session_class.__name__}>"

    @asynccontextmanager
    async def session(self, timeout: float | None = None) -> AsyncIterator[S]:
        """A session on a connection of its own, for work outside a request.

        Waits up to `timeout` (default ``acquire_timeout``) for the connection
        (`PoolExhaustedError` after that); commits when the block succeeds, rolls back on
        anything else, and gives the connection back, shielded and bounded.
        """
        async with (
            self.db._running().lease(timeout, for_request=False) as lease,
            self._session_on(lease) as session,
        ):
            yield session

    @asynccontextmanager
    async def connect(self, timeout: float | None = None) -> AsyncIterator[AsyncConnection]:
        """A SQLAlchemy Core connection of its own, committed when the block succeeds.

        For schema work: ``async with orm.connect() as conn: await
        conn.run_sync(metadata.create_all)``.
        """
        async with (
            self.db._running().lease(timeout, for_request=False) as lease,
            self._connection_on(lease) as conn,
        ):
            yield conn

    @asynccontextmanager
    async def _request_lease(
        self, runtime: PoolRuntime, connection: HTTPConnection
    ) -> AsyncIterator[Lease]:
        """The request's lease of `runtime`'s pool: the one its other dependencies hold,
        or a new one, given back when the endpoint has returned or raised."""
        held = held_lease(runtime)
        if held is not None:
            yield held
            return
        async with runtime.lease(for_request=True, route=route_of(connection.scope)) as lease:
            yield lease

    @asynccontextmanager
    async def _connection_on(self, lease: Lease) -> AsyncIterator[AsyncConnection]:
        """SQLAlchemy's connection on `lease`: committed if the block succeeds, and let go
        of whatever happens, its transaction rolled back (the lease is not released).

        One per lease: a request's session and Core connection share it, so that they see
        one transaction (the session joins the connection's, as SQLAlchemy does for a
        session bound to a connection already in one); the first to take it ends it.
        """
        shared = lease.orm
        if shared is not None:
            if shared.engine is not self.engine:
                raise ConfigurationError(
                    "Two Sessions of one DBPool in one request: they would run two "
                    "transactions on one connection. Use one Sessions per DBPool."
                )
            yield shared
            return
        driver = lease.conn
        # what SQLAlchemy may change on the connection and not undo when it invalidates it
        # (after a cancelled statement): put back when it lets go. Its cursors need tuples.
        settings = (driver.isolation_level, driver.read_only, driver.deferrable)
        row_factory, driver.row_factory = driver.row_factory, tuple_row
        lease.helper = functools.partial(_lending.acting_for, lease)
        token = _lending.lent.set(driver)
        try:
            try:
                conn = await self.engine.connect()
            finally:
                _lending.lent.reset(token)
            lease.orm = conn
            try:
                yield conn
                # (after a session's commit, nothing is left to commit)
                if conn.in_transaction() and _lending.may_commit(lease):
                    await conn.commit()
            finally:
                await self._let_go(lease, conn.close)
        finally:
            lease.orm = lease.helper = None
            driver.row_factory = row_factory
            if _lending.changed(driver, *settings):
                await _cleanup.run_shielded(
                    functools.partial(_lending.restore, driver, *settings),
                    lease.cleanup_timeout,
                    "restoring a connection's settings after SQLAlchemy",
                )

    @asynccontextmanager
    async def _session_on(self, lease: Lease) -> AsyncIterator[S]:
        async with self._connection_on(lease) as conn:
            session = self.session_class(bind=conn, **self.session_options)
            try:
                yield session
                if _lending.may_commit(lease):
                    await session.commit()
            finally:
                # the rollback it could not do is the connection's to do (_connection_on):
                # its transaction may be the Core connection's the session joined
                await _cleanup.run_shielded(
                    session.close, lease.cleanup_timeout, "closing a SQLAlchemy session"
                )
                # used again (a background task, a task it spawned), it connects through
                # the engine, which names the misuse (see _lending.lend)
                session.bind = self.engine
                session.sync_session.bind = self.engine.sync_engine

    async def _let_go(self, lease: Lease, close: Callable[[], Any]) -> None:
        """SQLAlchemy's close of its connection, then the rollback it could not do (a
        connection it invalidated, a cancelled close), shielded and bounded."""
        await _cleanup.run_shielded(close, lease.cleanup_timeout, "closing a SQLAlchemy connection")
        conn = lease.conn
        tx, conn._dbpool_orm_tx = conn._dbpool_orm_tx, None
        if tx is not None:
            await _cleanup.roll_back(tx, Rollback(), lease.cleanup_timeout)

    async def _prepare(self, runtime: PoolRuntime) -> None:
        """SQLAlchemy's one-time look at the server (its version, schema, isolation level,
        hstore), when the pool opens rather than in the first request."""
        async with runtime.lease(for_request=False) as lease, self._connection_on(lease):
            pass
