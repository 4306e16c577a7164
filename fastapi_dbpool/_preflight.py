"""The startup check: one direct connection before the pool opens its own.

A wrong password or a missing database then fails startup with libpq's reason (instead
of psycopg_pool's retries until ``open_timeout``), and the same connection tells what
stands in front of PostgreSQL (a pooler, see `_pooler.detect`) and whether the server
can give this app the connections it may ask for.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from . import _config, _credentials, _failover, _network, _pooler
from ._connect_errors import HINTS, ConnectLog, classify
from ._connection import run_own
from ._log import error, fields
from ._state import Settings
from .errors import PoolOpenError

logger = logging.getLogger("fastapi_dbpool")
_FIRST_WAIT, _MAX_WAIT = 0.25, 2.0  # seconds between tries of a server not up yet

#: What the server can give: its usable slots, those other clients hold, the role's and
#: the database's CONNECTION LIMIT (-1: none). Other clients are those of another
#: application_name: this app's other workers use the same one, and are counted by
#: ``workers`` x ``max_size`` instead.
_CAPACITY = """
SELECT current_setting('max_connections')::int
       - current_setting('superuser_reserved_connections')::int
       - coalesce(current_setting('reserved_connections', true)::int, 0),
       (SELECT count(*) FROM pg_stat_activity
         WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()
           AND application_name IS DISTINCT FROM current_setting('application_name')),
       (SELECT rolconnlimit FROM pg_roles WHERE rolname = current_user),
       (SELECT datconnlimit FROM pg_database WHERE datname = current_database()),
       current_user, current_database()
"""


async def preflight(
    pool: AsyncConnectionPool[Any],
    conninfo: _credentials.Source,
    target: str,
    settings: Settings,
    log: ConnectLog,
    environ: Mapping[str, str] | None = None,
) -> bool:
    """Connect once as the pool will; `PoolOpenError` if a source fails; warn what to fix.

    Whether a pooler answered in front of PostgreSQL (`_pooler.detect`).

    A server not up yet (refused, starting up: `_network.TRANSIENT`) is waited for, each
    wait logged, until the caller's ``open_timeout``; every failure goes to `log`, so that
    the lifespan's `PoolOpenError` names the last one.
    """
    try:
        kwargs = await _config.resolve_kwargs(pool.kwargs)
    except Exception as ex:
        raise PoolOpenError(
            target,
            settings.open_timeout,
            f"getting the connection's kwargs= or password failed ({error(ex)})",
            pool.name,
        ) from None
    try:
        resolved = await _credentials.resolve(conninfo, "conninfo")
    except Exception as ex:
        raise PoolOpenError(
            target,
            settings.open_timeout,
            f"the conninfo callable failed ({error(ex)})",
            pool.name,
        ) from None
    conn = await _first_connection(resolved, kwargs, pool.name, log)
    try:
        if settings.writable:
            await _failover.refuse_read_only(conn)
        pooled = settings.transaction_pooler or await _pooler.detect(conn)
        if not pooled:  # behind a pooler, the pooler's own pool size is the bound
            await _check_capacity(conn, pool, os.environ if environ is None else environ)
    finally:
        await conn.close()
    return bool(pooled)


async def _first_connection(
    conninfo: str, kwargs: dict[str, Any], name: str, log: ConnectLog
) -> AsyncConnection[Any]:
    """The first connection, given the time a server still starting takes (docker compose,
    Kubernetes: the app often starts first); any other failure is raised at once."""
    delay = _FIRST_WAIT
    while True:
        try:
            return await AsyncConnection.connect(conninfo, **kwargs)
        except psycopg.OperationalError as ex:
            log.failed(ex)
            cause = classify(ex)
            if cause not in _network.TRANSIENT:
                raise
            logger.warning(
                "pool %r: the server cannot be reached yet (%s); trying again in %.2gs, "
                "until open_timeout. hint: %s",
                name,
                error(ex),
                delay,
                HINTS[cause],
                extra=fields("open_waiting", name, cause=cause, error=error(ex)),
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, _MAX_WAIT)


def workers(environ: Mapping[str, str]) -> int:
    """How many processes run this app: ``WEB_CONCURRENCY`` (uvicorn's and gunicorn's)."""
    try:
        return max(1, int(environ.get("WEB_CONCURRENCY", "1")))
    except ValueError:
        return 1


async def _check_capacity(
    conn: AsyncConnection[Any], pool: AsyncConnectionPool[Any], environ: Mapping[str, str]
) -> None:
    row = await (await run_own(conn, _CAPACITY)).fetchone()
    if row is None:
        return
    usable, others, role_limit, db_limit, user, dbname = row
    n = workers(environ)
    wanted = n * pool.max_size
    sum_ = f"{n} worker(s) x max_size {pool.max_size} = {wanted} connections"
    free = usable - others
    limits = [(free, f"PostgreSQL has {free} free ({usable} usable, {others} held by others)")]
    if role_limit >= 0:
        limits.append((role_limit, f"role {user!r} has CONNECTION LIMIT {role_limit}"))
    if db_limit >= 0:
        limits.append((db_limit, f"database {dbname!r} has CONNECTION LIMIT {db_limit}"))
    for limit, why in limits:
        if wanted > limit:
            logger.warning(
                "pool %r may ask for more connections than the server gives: %s, but %s; "
                "under load the extra ones are refused ('too many clients', 'remaining "
                "connection slots are reserved') and requests get 503. hint: keep max_size "
                "<= %d per worker (WEB_CONCURRENCY=%d), raise the limit, or put PgBouncer "
                "in front",
                pool.name,
                sum_,
                why,
                max(limit // n, 0),
                n,
                extra=fields("capacity_exceeded", pool.name, limit=limit, workers=n),
            )
            return
