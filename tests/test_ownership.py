"""Failure 2: a connection belongs to one request and one task."""

import asyncio
from typing import Any

import pytest
from fastapi import BackgroundTasks, FastAPI
from fastapi.responses import StreamingResponse
from psycopg import AsyncConnection

from fastapi_dbpool import (
    ConnectionDep,
    ConnectionReleasedError,
    DBPool,
    TransactionDep,
)

from .conftest import Server, make_db, pid_of, serve

pytestmark = pytest.mark.anyio


def add_spawn_route(app: FastAPI, sql: str) -> tuple[asyncio.Event, list[BaseException | None]]:
    """``GET /spawn`` starts a task that keeps the request's connection and, once the
    returned event is set, runs `sql` on it; the outcome (None or the error) is recorded."""
    go = asyncio.Event()
    outcome: list[BaseException | None] = []

    async def outlive(conn: AsyncConnection[Any]) -> None:
        await go.wait()
        try:
            await conn.execute(sql)
            outcome.append(None)
        except BaseException as ex:
            outcome.append(ex)

    @app.get("/spawn")
    async def spawn(conn: ConnectionDep) -> None:
        app.state.task = asyncio.create_task(outlive(conn))

    return go, outcome


async def test_a_task_that_outlives_its_request_cannot_touch_the_next_request(
    database_url: str, server: Server, app_name: str
) -> None:
    db = make_db(database_url, app_name, min_size=1, max_size=1)
    app = FastAPI()
    go, errors = add_spawn_route(app, "INSERT INTO nowhere VALUES (1)")

    @app.get("/hold")
    async def hold(tx: TransactionDep) -> int:
        # the stale task strikes while this request holds the same (only) connection
        go.set()
        await app.state.task
        await tx.execute("SELECT 1")  # would fail if the stale INSERT had aborted our tx
        return await pid_of(tx)

    async with serve(app, db) as client:
        await client.get("/spawn")
        r = await client.get("/hold")
        assert r.status_code == 200
    assert len(errors) == 1
    assert isinstance(errors[0], ConnectionReleasedError)
    assert "db.connection()" in str(errors[0])


async def test_background_task_using_the_request_connection_gets_a_clear_error(
    database_url: str, app_name: str
) -> None:
    db = make_db(database_url, app_name, max_size=1)
    app = FastAPI()
    errors: list[BaseException] = []
    done = asyncio.Event()

    async def job(conn: AsyncConnection[Any]) -> None:
        try:
            await conn.execute("SELECT 1")
        except BaseException as ex:
            errors.append(ex)
        # the right way: a connection of its own
        async with db.connection() as own:
            await own.execute("SELECT 1")
        done.set()

    @app.post("/later")
    async def later(conn: ConnectionDep, background: BackgroundTasks) -> None:
        background.add_task(job, conn)

    async with serve(app, db) as client:
        r = await client.post("/later")
        assert r.status_code == 200
        await asyncio.wait_for(done.wait(), 5)
    assert len(errors) == 1
    assert isinstance(errors[0], ConnectionReleasedError)
    assert "db.connection()" in str(errors[0])


async def test_a_spawned_task_after_the_request_ended_is_refused_even_while_idle_in_pool(
    database_url: str, server: Server, app_name: str
) -> None:
    db = make_db(database_url, app_name, min_size=1, max_size=1)
    app = FastAPI()
    go, outcome = add_spawn_route(app, "BEGIN")

    async with serve(app, db) as client:
        await client.get("/spawn")
        go.set()
        await app.state.task
        # the connection was not touched: still idle, not idle in transaction
        assert server.states() == ["idle"]
    assert len(outcome) == 1
    assert isinstance(outcome[0], ConnectionReleasedError)


async def test_concurrent_use_by_a_second_task_is_refused_by_default(
    database_url: str, app_name: str
) -> None:
    db = make_db(database_url, app_name)
    app = FastAPI()

    @app.get("/gather")
    async def gather(tx: TransactionDep) -> str:
        results = await asyncio.gather(
            asyncio.create_task(tx.execute("SELECT 1")), return_exceptions=True
        )
        return type(results[0]).__name__

    async with serve(app, db) as client:
        assert (await client.get("/gather")).json() == "ConnectionInUseError"


async def test_concurrent_use_can_be_allowed(database_url: str, app_name: str) -> None:
    db = make_db(database_url, app_name, allow_concurrent_tasks=True)
    app = FastAPI()

    @app.get("/gather")
    async def gather(conn: ConnectionDep) -> list[int]:
        pids = await asyncio.gather(*(asyncio.create_task(pid_of(conn)) for _ in range(3)))
        return list(pids)

    async with serve(app, db) as client:
        r = await client.get("/gather")
        assert r.status_code == 200
        assert len(set(r.json())) == 1


async def test_streaming_body_needs_its_own_connection(database_url: str, app_name: str) -> None:
    """Request connections go back before the response is sent; a stream takes its own."""
    db: DBPool = make_db(database_url, app_name)
    app = FastAPI()

    @app.get("/stream-wrong")
    async def stream_wrong(conn: ConnectionDep) -> StreamingResponse:
        async def body() -> Any:
            try:
                await conn.execute("SELECT 1")
                yield b"used"
            except ConnectionReleasedError:
                yield b"refused"

        return StreamingResponse(body())

    @app.get("/stream-right")
    async def stream_right() -> StreamingResponse:
        async def body() -> Any:
            async with db.connection() as conn:
                cur = await conn.execute("SELECT generate_series(1, 3)")
                async for row in cur:
                    yield f"{row[0]}\n".encode()

        return StreamingResponse(body())

    async with serve(app, db) as client:
        assert (await client.get("/stream-wrong")).text == "refused"
        assert (await client.get("/stream-right")).text == "1\n2\n3\n"
