"""Read-only transactions on streaming replicas, the primary when none is fit.

A `ReadReplicas` holds a primary `DBPool` and one or more replica pools. Its `ReadDep`
gives a request a ``READ ONLY`` transaction on a replica whose lag is within
``max_replica_lag``, taking the fit replicas in turn; on the primary when none is fit,
and when the request already holds a connection of the primary (read-your-writes). A
task measures each replica's lag every ``check_interval`` seconds, on the replica itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Annotated, Any

import anyio
import psycopg
from fastapi import Depends
from psycopg import AsyncConnection, Rollback
from starlette.requests import HTTPConnection

from ._cleanup import roll_back
from ._connection import held_lease, request_lease_of, run_own
from ._dbpool import DBPool
from ._env import positive_seconds
from ._lifespan import lifespan
from ._log import error, fields
from ._metrics import route_of
from ._pooler import bound_transaction
from ._registry import Finder, pools_of
from ._transaction import begin
from .errors import ConfigurationError, DBPoolError, DeadlineExceededError, PoolExhaustedError

if TYPE_CHECKING:
    from ._state import PoolRuntime

logger = logging.getLogger("fastapi_dbpool")

#: Seconds the replica is behind: 0 when it has replayed all it received (an idle
#: primary sends nothing, so the last replay's age would grow with no lag at all; after
#: a restart the receive position starts at its segment's beginning, behind the replay
#: position, hence <=); NULL when it is not a standby any more (promoted: it no longer
#: follows the primary).
_LAG = """
SELECT CASE WHEN NOT pg_is_in_recovery() THEN NULL
            WHEN pg_last_wal_receive_lsn() <= pg_last_wal_replay_lsn() THEN 0
            ELSE coalesce(extract(epoch FROM now() - pg_last_xact_replay_timestamp()), 0)
       END
"""


class ReadReplicas:
    """A primary and its read replicas, with a dependency that routes reads.

    ``reader = ReadReplicas(primary, replica1, replica2, max_replica_lag=5)`` and
    ``FastAPI(lifespan=reader.lifespan)``, which opens every pool (all or nothing, like
    `lifespan`) and measures the replicas' lag while the app runs. A route takes
    ``conn: reader.ReadDep``: a ``READ ONLY`` transaction, so a write through it fails
    with psycopg's ``ReadOnlySqlTransaction`` instead of reaching the primary unseen.

    Routing, for each request:

    - a request that already holds a connection of the primary (its `TransactionDep`
      or `ConnectionDep`, declared before the reader) reads through that connection,
      and so sees its own writes;
    - otherwise a replica whose last measured lag is at most ``max_replica_lag``
      seconds, the fit ones in turn;
    - the primary (in a ``READ ONLY`` transaction) when no replica is fit: all
      unreachable, promoted, or lagging past the bound.

    A replica whose checkout fails, or whose connection breaks under a statement, is
    left out until its next measure says it is fit again; the request that found it
    down fails (its statement's error, or 503), later ones go elsewhere. `lag()` and
    each replica's `DBPool.stats()` give the last measure. With no replica at all, every
    read is a ``READ ONLY`` transaction on the primary: code written for replicas runs
    unchanged where there are none. The transaction ends with a ROLLBACK, having
    nothing to commit; an error or a cut deadline ends it the same way.
    """

    def __init__(
        self,
        primary: DBPool,
        *replicas: DBPool,
        max_replica_lag: float = 10.0,
        check_interval: float = 1.0,
    ) -> None:
        pools = (primary, *replicas)
        if not all(isinstance(db, DBPool) for db in pools):
            raise ConfigurationError(
                "ReadReplicas(primary, replica, ...) takes a primary DBPool and any number "
                "of replica DBPools, each with its own name=."
            )
        self._open_all = lifespan(*pools)  # refuses two pools of one name, now
        self.primary = primary
        self.replicas = replicas
        self.max_replica_lag = positive_seconds("max_replica_lag", max_replica_lag)
        self.check_interval = positive_seconds("check_interval", check_interval)
        self._turn = itertools.count()
        self._measuring = 0  # lifespans of this reader running (each measures the lag)
        self._warned_unmeasured = False
        self._find_primary = Finder(primary.name)
        self._find = [Finder(db.name) for db in replicas]
        read_dep = Annotated[AsyncConnection[Any], Depends(self._read, scope="function")]

        async def get_read_transaction(conn: AsyncConnection[Any]) -> AsyncConnection[Any]:
            """A request's ``READ ONLY`` transaction on a fit replica (see `ReadReplicas`);
            ``Annotated[AsyncConnection[DictRow], Depends(reader.get_read_transaction)]``
            for an alias of your own."""
            return conn

        get_read_transaction.__annotations__["conn"] = read_dep  # see PoolDependencies
        self.get_read_transaction = get_read_transaction
        #: A request's ``READ ONLY`` transaction on a fit replica (see the class doc).
        self.ReadDep: Any = read_dep

    def lag(self) -> dict[str, float | None]:
        """Each replica's last measured lag in seconds; None: unreachable or not a standby."""
        return {
            db.name: None if db._runtime is None else db._runtime.replica_lag
            for db in self.replicas
        }

    @asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncIterator[dict[str, Any]]:
        """Open the primary and the replicas, measure the lag while the app runs."""
        async with self._open_all(app) as state:
            self._measuring += 1
            pools = pools_of(app)
            pools.optional.update(db.name for db in self.replicas)
            monitor = None
            if self.replicas:
                await self._measure_all(app)
                monitor = asyncio.get_running_loop().create_task(
                    self._monitor(app), name=f"{self.primary.name}-replica-lag"
                )
            try:
                yield state
            finally:
                if monitor is not None:
                    monitor.cancel()
                    with anyio.move_on_after(self.check_interval + 1, shield=True):
                        with contextlib.suppress(asyncio.CancelledError):
                            await monitor
                pools.optional.difference_update(db.name for db in self.replicas)
                self._measuring -= 1

    async def _monitor(self, app: Any) -> None:
        while True:
            await asyncio.sleep(self.check_interval)
            await self._measure_all(app)

    async def _measure_all(self, app: Any) -> None:
        runtimes = pools_of(app).by_name
        await asyncio.gather(
            *(self._measure(db.name, runtimes.get(db.name)) for db in self.replicas)
        )

    async def _measure(self, name: str, runtime: PoolRuntime | None) -> None:
        lag: float | None = None
        if runtime is not None and not runtime.closing:
            try:
                async with runtime.lease(self.check_interval, for_request=False) as lease:
                    row = await (await run_own(lease.conn, _LAG)).fetchone()
                lag = None if row is None or row[0] is None else float(row[0])
            except (DBPoolError, psycopg.Error) as ex:
                logger.debug(
                    "replica %r: lag not measured: %r",
                    name,
                    ex,
                    extra=fields("replica_lag_unmeasured", name, error=error(ex)),
                )
        if runtime is None:
            return
        if (lag is None) != (runtime.replica_lag is None):
            logger.info(
                "replica %r is %s",
                name,
                "unreachable" if lag is None else "back",
                extra=fields("replica_back" if lag is not None else "replica_unreachable", name),
            )
        runtime.replica_lag = lag

    def _fit(self, connection: HTTPConnection) -> list[PoolRuntime]:
        fit = []
        for find in self._find:
            try:
                runtime = find(connection)
            except DBPoolError:
                continue
            lag = runtime.replica_lag
            if lag is None or lag > self.max_replica_lag:
                continue
            if runtime.connect_log.current is None:  # new connections do not fail
                fit.append(runtime)
        return fit

    def _unmeasured(self) -> None:
        """Nothing measures the replicas' lag, so none is ever fit: say so, once."""
        if not self._warned_unmeasured:
            self._warned_unmeasured = True
            logger.warning(
                "ReadReplicas(%r, ...): its lifespan is not running, so no replica's lag is "
                "measured and every read goes to the primary. hint: FastAPI(lifespan="
                "reader.lifespan), which opens the pools too, instead of lifespan(%s)",
                self.primary.name,
                ", ".join(db.name for db in (self.primary, *self.replicas)),
                extra=fields("replicas_unmeasured", self.primary.name),
            )

    def _left_out(self, runtime: PoolRuntime, why: BaseException) -> None:
        if runtime.replica_lag is not None:
            logger.warning(
                "replica %r left out of reads until its next lag check: %s. hint: is it up?",
                runtime.pool.name,
                why,
                extra=fields("replica_left_out", runtime.pool.name, reason=str(why)),
            )
            runtime.replica_lag = None

    async def _read(self, connection: HTTPConnection) -> AsyncIterator[AsyncConnection[Any]]:
        primary = self._find_primary(connection)
        held = held_lease(primary)
        if held is not None:  # read-your-writes: the request's own primary connection
            yield held.conn
            return
        runtime = primary
        lease = None
        route = route_of(connection.scope)
        if request_lease_of(primary) is None:
            if self.replicas and not self._measuring:
                self._unmeasured()
            fit = self._fit(connection)
            while fit and lease is None:
                runtime = fit.pop(next(self._turn) % len(fit))
                try:
                    lease = await runtime.acquire(for_request=True, route=route)
                except DeadlineExceededError:
                    raise
                except DBPoolError as ex:  # down, or only busy: this request reads elsewhere
                    busy = isinstance(ex, PoolExhaustedError) and not runtime.connect_log.current
                    if not busy:
                        self._left_out(runtime, ex)
                    runtime = primary
        if lease is None:
            lease = await primary.acquire(for_request=True, route=route)
        try:
            tx = await begin(lease.conn, lease.cleanup_timeout)
            try:
                if runtime is primary:  # a replica is read-only anyway
                    await run_own(lease.conn, "SET TRANSACTION READ ONLY")
                if lease.conn._dbpool_local_timeouts:
                    await bound_transaction(lease.conn)
                yield lease.conn
            except BaseException as exc:
                # an ORM's error wraps psycopg's (SQLAlchemy's .orig)
                cause = getattr(exc, "orig", exc)
                if runtime is not primary and isinstance(cause, psycopg.OperationalError):
                    self._left_out(runtime, exc)
                await roll_back(tx, exc, lease.cleanup_timeout)
                raise
            # nothing to commit; a rollback also ends a READ ONLY savepoint without
            # leaving its enclosing transaction read-only (a test's, see testing)
            await roll_back(tx, Rollback(), lease.cleanup_timeout)
        finally:
            await runtime.release(lease)
