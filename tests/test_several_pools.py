"""Several named pools in one app: each keeps its own state and dependencies, a second
pool can never take the first one's place, and the module-level aliases refuse to guess."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from fastapi.responses import StreamingResponse
from psycopg import AsyncConnection
from psycopg.conninfo import make_conninfo

from fastapi_dbpool import (
    CancellationMiddleware,
    ConfigurationError,
    ConnectionDep,
    ConnectionReleasedError,
    DBPool,
    PoolOpenError,
    deadline,
    health_router,
    lifespan,
)

from .conftest import Server, make_db, needs_pool_internals

pytestmark = pytest.mark.anyio


def two_pools(url: str, app_name: str, **kwargs: Any) -> tuple[DBPool, DBPool]:
    return make_db(url, f"{app_name}_a", **kwargs), make_db(url, f"{app_name}_b", **kwargs)


def app_of(a: DBPool, b: DBPool, **kwargs: Any) -> FastAPI:
    app = FastAPI(**kwargs)
    app.include_router(health_router())
    # as a type checker needs them (db.TransactionDep is not a type to mypy or pyright)
    ATransaction = Annotated[AsyncConnection[Any], Depends(a.get_transaction)]
    AConnection = Annotated[AsyncConnection[Any], Depends(a.get_connection)]
    BConnection = Annotated[AsyncConnection[Any], Depends(b.get_connection)]
    shortcut: Any = b.ConnectionDep  # the same, written shorter

    @app.get("/names")
    async def names(tx: ATransaction, conn: shortcut) -> list[str]:
        shown = []
        for c in (tx, conn):
            cur = await c.execute("SELECT current_setting('application_name')")
            shown.append((await cur.fetchone() or ("",))[0])
        return shown

    @app.post("/a/{n}")
    async def write_a(n: int, tx: ATransaction, also: AConnection) -> bool:
        assert also is tx  # one checkout per pool per request
        await tx.execute("SELECT %s", (n,))
        return True

    @app.get("/ambiguous")
    async def ambiguous(conn: ConnectionDep) -> None:
        await conn.execute("SELECT 1")

    @app.get("/slow", dependencies=[deadline(0.5)])
    async def slow(conn_a: AConnection, conn_b: BConnection) -> None:
        await asyncio.gather(
            conn_a.execute("SELECT pg_sleep(5)"), conn_b.execute("SELECT pg_sleep(5)")
        )

    return app


@asynccontextmanager
async def client_for(app: FastAPI, **kwargs: Any) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, **kwargs)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


async def test_each_pool_serves_its_own_dependencies(database_url: str, app_name: str) -> None:
    a, b = two_pools(database_url, app_name)
    app = app_of(a, b, lifespan=lifespan(a, b))
    async with app.router.lifespan_context(app) as state, client_for(app) as client:
        assert (await client.get("/names")).json() == [a.name, b.name]
        assert (await client.post("/a/1")).json() is True
        ready = (await client.get("/readyz")).json()
        assert ready["status"] == "ready"
        assert set(ready["pools"]) == {a.name, b.name}
        assert list(state or {}) == ["fastapi_dbpool"]  # one key, whatever the pool count
        if not needs_pool_internals.args[0]:  # the direct return puts it back at once
            assert a.stats().pool_size == b.stats().pool_size == 1
        else:  # psycopg_pool's own return goes through a task: the next request may grow it
            assert a.stats().pool_size <= 2
            assert b.stats().pool_size <= 2


async def test_the_module_level_aliases_refuse_to_guess(database_url: str, app_name: str) -> None:
    a, b = two_pools(database_url, app_name)
    app = app_of(a, b, lifespan=lifespan(a, b))
    async with app.router.lifespan_context(app), client_for(app) as client:
        with pytest.raises(ConfigurationError) as raised:
            await client.get("/ambiguous")
        assert f"several pools ('{a.name}', '{b.name}')" in str(raised.value)
        assert "db.ConnectionDep" in str(raised.value)


async def test_composed_lifespans_keep_both_pools(database_url: str, app_name: str) -> None:
    """The README's composition, with two pools whose states are merged: no hijack."""
    a, b = two_pools(database_url, app_name)

    @asynccontextmanager
    async def both(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        async with a.lifespan(app) as sa, b.lifespan(app) as sb:
            yield {**sa, **sb}

    app = app_of(a, b, lifespan=both)
    async with app.router.lifespan_context(app), client_for(app) as client:
        assert (await client.get("/names")).json() == [a.name, b.name]


async def test_a_second_pool_of_the_same_name_is_refused_at_startup(
    database_url: str, app_name: str, server: Server
) -> None:
    first, second = make_db(database_url, app_name), make_db(database_url, app_name)
    with pytest.raises(ConfigurationError, match=f"Two pools named '{app_name}' in one app"):
        lifespan(first, second)

    @asynccontextmanager
    async def both(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        async with first.lifespan(app) as sa, second.lifespan(app) as sb:
            yield {**sa, **sb}

    app = FastAPI(lifespan=both)
    with pytest.raises(ConfigurationError, match=f"Two pools named '{app_name}' in one app"):
        async with app.router.lifespan_context(app):
            pass
    assert server.wait_until(lambda s: s == []) == []  # the first one closed again


async def test_one_pool_failing_to_open_closes_those_already_open(
    database_url: str, app_name: str, server: Server
) -> None:
    a = make_db(database_url, app_name)
    nowhere = make_conninfo(database_url, host="127.0.0.1", port="1")  # nothing listens
    b = make_db(nowhere, f"{app_name}_b", open_timeout=2)
    app = FastAPI(lifespan=lifespan(a, b))
    with pytest.raises(PoolOpenError, match=f"Could not open pool '{app_name}_b' to"):
        async with app.router.lifespan_context(app):
            pass
    assert server.wait_until(lambda s: s == []) == []  # a's connections are gone


async def test_a_deadline_cuts_the_statements_of_every_pool_the_request_holds(
    database_url: str, app_name: str
) -> None:
    # gather() runs each statement in a task of its own
    a, b = two_pools(database_url, app_name, allow_concurrent_tasks=True)
    app = app_of(a, b, lifespan=lifespan(a, b))
    app.add_middleware(CancellationMiddleware)
    async with app.router.lifespan_context(app), client_for(app) as client:
        cut = await client.get("/slow")
        assert cut.status_code == 504
        for name in (a.name, b.name):  # no statement left running on either server side
            states = await asyncio.to_thread(
                Server(database_url, name).wait_until, lambda s: s == ["idle"], 5
            )
            assert states == ["idle"], name
        assert a.stats().cancelled_requests == b.stats().cancelled_requests == 1
        assert (await client.get("/names")).status_code == 200


async def test_each_pools_connection_is_refused_after_its_request_ended(
    database_url: str, app_name: str
) -> None:
    """The ownership check follows every pool a request used, not only the latest."""
    a, b = two_pools(database_url, app_name)
    kept: list[AsyncConnection[Any]] = []
    app = FastAPI(lifespan=lifespan(a, b))
    AConnection = Annotated[AsyncConnection[Any], Depends(a.get_connection)]
    BConnection = Annotated[AsyncConnection[Any], Depends(b.get_connection)]

    @app.get("/both")
    async def both(conn_a: AConnection, conn_b: BConnection) -> None:
        kept.extend([conn_a, conn_b])

    async with app.router.lifespan_context(app), client_for(app) as client:
        assert (await client.get("/both")).status_code == 200
        for conn in kept:  # in the request's context, after it ended
            with pytest.raises(ConnectionReleasedError):
                await conn.execute("SELECT 1")


async def test_a_pools_stream_transaction_commits_after_the_last_chunk(
    database_url: str, app_name: str, server: Server
) -> None:
    a, b = two_pools(database_url, app_name)
    table = f"{app_name}_stream"
    app = FastAPI(lifespan=lifespan(a, b))
    BStream = Annotated[AsyncConnection[Any], Depends(b.get_stream_transaction)]

    @app.get("/stream")
    async def stream(tx: BStream) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            await tx.execute(f"INSERT INTO {table} VALUES (1)")
            yield b"written"

        return StreamingResponse(body())

    server.query(f"CREATE TABLE {table} (x int)")
    try:
        async with app.router.lifespan_context(app), client_for(app) as client:
            assert (await client.get("/stream")).text == "written"
        assert server.query(f"SELECT count(*) FROM {table}") == [(1,)]
    finally:
        server.query(f"DROP TABLE {table}")
