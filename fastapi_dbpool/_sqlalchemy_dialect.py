"""SQLAlchemy's psycopg dialect, with the connection's fate left to the package.

SQLAlchemy is lent a request's connection (`fastapi_dbpool.sqlalchemy`). Its own pool
would close that connection when its session ends, roll it back on return, and close it
after a cancelled statement; its dialect would add a notice handler on every checkout
and open its transactions with psycopg's implicit BEGIN, outside the package's cleanup.
Here each of those goes through the package instead:

- BEGIN, COMMIT and ROLLBACK are a psycopg transaction block (`_transaction.begin`,
  `commit`, `_cleanup.roll_back`): the same path as `TransactionDep`, so an interrupted
  BEGIN is undone, a deadline's ``SET LOCAL`` applies behind a transaction pooler, a cut
  request never commits, and a rollback is shielded and bounded. Inside a transaction
  already open (`TransactionDep`, a test's isolation) the block is a savepoint.
- Closing or invalidating the connection hands it back to nobody: the package's release
  decides (reuse when clean, close when not).
- The per-connection set-up (the notice handler, JSON and hstore adapters) is done once
  per psycopg connection, not once per checkout.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import psycopg.types.string
from psycopg import AsyncConnection, Rollback
from psycopg.types.hstore import register_hstore
from psycopg.types.json import set_json_dumps, set_json_loads
from sqlalchemy.dialects.postgresql.psycopg import PGDialectAsync_psycopg
from sqlalchemy.util import await_only

from . import _cleanup
from ._connection import CLEANUP_TIMEOUT, GuardedConnection
from ._pooler import bound_transaction
from ._transaction import begin, commit

#: how SQLAlchemy finds this dialect (``sqlalchemy.dialects.registry``)
NAME = "postgresql.fastapi_dbpool"
URL = "postgresql+fastapi_dbpool://"


def driver_of(dbapi_connection: Any) -> GuardedConnection:
    """The psycopg connection under SQLAlchemy's adapter (or its pool's proxy of it)."""
    conn = getattr(dbapi_connection, "driver_connection", None)
    if conn is None:  # the adapter itself, as SQLAlchemy's pool events see it
        conn = dbapi_connection._connection
    assert isinstance(conn, GuardedConnection)
    return conn


def _timeout(conn: GuardedConnection) -> float:
    lease = conn._dbpool_lease
    return lease.cleanup_timeout if lease is not None else CLEANUP_TIMEOUT


class GuardedDialect(PGDialectAsync_psycopg):
    """``postgresql+psycopg`` (async), on connections lent by a `DBPool`."""

    driver = "psycopg"  # what SQLAlchemy, Alembic and the user's code expect to see
    supports_statement_cache = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # type: ignore[no-untyped-call]
        self._prepared: weakref.WeakSet[AsyncConnection[Any]] = weakref.WeakSet()
        self._hstore: Any = None  # hstore's TypeInfo, once initialize() found it

    @classmethod
    def get_async_dialect_cls(cls, url: Any) -> type[GuardedDialect]:
        return cls

    @classmethod
    def get_dialect_cls(cls, url: Any) -> type[GuardedDialect]:
        return cls

    def _type_info_fetch(self, connection: Any, name: str) -> Any:
        info = super()._type_info_fetch(connection, name)  # type: ignore[no-untyped-call]
        if name == "hstore":
            self._hstore = info
        return info

    def on_connect(self) -> Callable[[Any], None]:
        """SQLAlchemy's set-up, once per psycopg connection, however often it is lent."""
        theirs: Callable[[Any], None] = super().on_connect()  # type: ignore[no-untyped-call]

        def connect(dbapi_connection: Any) -> None:
            conn = driver_of(dbapi_connection)
            if conn in self._prepared:
                return
            theirs(dbapi_connection)
            # what SQLAlchemy passes as connect(context=...), which it does not make here
            if self._native_inet_types is False:
                for name in ("inet", "cidr"):
                    conn.adapters.register_loader(name, psycopg.types.string.TextLoader)
            loads: Any = self._json_deserializer
            dumps: Any = self._json_serializer
            if loads:
                set_json_loads(loads, conn)
            if dumps:
                set_json_dumps(dumps, conn)
            if self._hstore is not None:
                register_hstore(self._hstore, conn)
            self._prepared.add(conn)

        return connect

    def do_begin(self, dbapi_connection: Any) -> None:
        conn = driver_of(dbapi_connection)
        if conn._dbpool_orm_tx is not None:  # a previous one left open by an invalidation
            await_only(_cleanup.roll_back(conn._dbpool_orm_tx, Rollback(), _timeout(conn)))
        conn._dbpool_orm_tx = await_only(begin(conn, _timeout(conn)))
        if conn._dbpool_local_timeouts:
            await_only(bound_transaction(conn))

    def do_commit(self, dbapi_connection: Any) -> None:
        conn = driver_of(dbapi_connection)
        tx, conn._dbpool_orm_tx = conn._dbpool_orm_tx, None
        if tx is not None:
            # no request control: a commit in the endpoint's middle must not hold its
            # deadline back; the final one is checked against it (_sqlalchemy_lending.may_commit)
            await_only(commit(tx, _timeout(conn), None))

    def do_rollback(self, dbapi_connection: Any) -> None:
        # With no block of ours open there is nothing to undo: SQLAlchemy's reset on return
        # is off, and its first-connect rollback comes after statements in autocommit.
        conn = driver_of(dbapi_connection)
        tx, conn._dbpool_orm_tx = conn._dbpool_orm_tx, None
        if tx is not None:
            await_only(_cleanup.roll_back(tx, Rollback(), _timeout(conn)))

    def do_close(self, dbapi_connection: Any) -> None:
        """Nothing: the connection is the package's, which gives it back (see module)."""

    def do_terminate(self, dbapi_connection: Any) -> None:
        """Nothing, as `do_close`: after a cancelled statement the package has already
        stopped it on the server; a broken connection is closed by the release."""

    def set_isolation_level(self, dbapi_connection: Any, level: str) -> None:
        """``execution_options(isolation_level=...)``: the level of the transactions the
        connection begins, never autocommit off (the package's connections stay in it)."""
        if level == "AUTOCOMMIT":
            raise NotImplementedError(
                "fastapi_dbpool.sqlalchemy sessions run in transactions; for autocommit "
                "statements, use the pool's ConnectionDep or db.connection()."
            )
        conn = driver_of(dbapi_connection)
        await_only(conn.set_isolation_level(self._isolation_lookup[level]))

    def reset_isolation_level(self, dbapi_connection: Any) -> None:
        """Back to the server's default, as the connection came from the pool."""
        await_only(driver_of(dbapi_connection).set_isolation_level(None))
