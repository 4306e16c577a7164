"""The same endpoints as `benchmarks._apps`, built the way each peer's documentation shows.

(No `from __future__ import annotations`: FastAPI must see the local `Annotated` aliases.)
"""

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import asyncpg
from fastapi import Depends, FastAPI
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from ._apps import INSERT, POOL_SIZE, SELECT, _nodb


def psycopg_pool_baseline() -> FastAPI:
    """psycopg_pool hand-wired as psycopg's docs show: a lifespan and a yield dependency."""
    return _psycopg_recipe(tuned=False)


def psycopg_pool_autocommit() -> FastAPI:
    """The same recipe tuned as its readers would: autocommit connections (a read is one
    statement, not BEGIN/SELECT/COMMIT) and a dependency that ends with the endpoint
    (``scope="function"``), so that the connection is back before the response is sent."""
    return _psycopg_recipe(tuned=True)


def _psycopg_recipe(tuned: bool) -> FastAPI:
    pool = AsyncConnectionPool(
        os.environ["DATABASE_URL"],
        open=False,
        min_size=POOL_SIZE,
        max_size=POOL_SIZE,
        kwargs={"autocommit": True} if tuned else None,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await pool.open(wait=True)
        yield
        await pool.close()

    async def get_conn() -> AsyncIterator[AsyncConnection[Any]]:
        async with pool.connection() as conn:
            yield conn

    # as the docs show it: FastAPI's default scope, cleanup after the response is sent
    dependency = Depends(get_conn, scope="function") if tuned else Depends(get_conn)
    Conn = Annotated[AsyncConnection[Any], dependency]
    app = FastAPI(lifespan=lifespan)

    @app.get("/select/{item_id}")
    async def select(item_id: int, conn: Conn) -> Any:
        cur = await conn.execute(SELECT + "%s", (item_id,))
        return await cur.fetchone()

    @app.get("/tx/{item_id}")
    async def tx(item_id: int, conn: Conn) -> Any:
        async with conn.transaction():
            await conn.execute(INSERT + "(%s)", (item_id,))
            cur = await conn.execute(SELECT + "%s", (item_id,))
            return await cur.fetchone()

    _nodb(app)
    return app


def _asyncpg_url() -> str:
    return os.environ["DATABASE_URL"]


def sqlalchemy_asyncpg() -> FastAPI:
    """SQLAlchemy 2 async with asyncpg and an AsyncSession dependency."""
    return _sqlalchemy("asyncpg")


def sqlalchemy_psycopg() -> FastAPI:
    """SQLAlchemy 2 async with psycopg (its own pool) and an AsyncSession dependency."""
    return _sqlalchemy("psycopg")


def _sqlalchemy(driver: str) -> FastAPI:
    """SQLAlchemy's own pool and session dependency, as its docs and FastAPI's show them."""
    url = _asyncpg_url().replace("postgresql://", f"postgresql+{driver}://", 1)
    engine = create_async_engine(url, pool_size=POOL_SIZE, max_overflow=0)
    sessions = async_sessionmaker(engine, expire_on_commit=False)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await engine.dispose()

    async def get_session() -> AsyncIterator[AsyncSession]:
        async with sessions() as session:
            yield session

    Session = Annotated[AsyncSession, Depends(get_session)]
    app = FastAPI(lifespan=lifespan)

    @app.get("/select/{item_id}")
    async def select(item_id: int, session: Session) -> Any:
        row = (await session.execute(text(SELECT + ":id"), {"id": item_id})).one_or_none()
        return None if row is None else tuple(row)

    @app.get("/tx/{item_id}")
    async def tx(item_id: int, session: Session) -> Any:
        async with session.begin():
            await session.execute(text(INSERT + "(:id)"), {"id": item_id})
            row = (await session.execute(text(SELECT + ":id"), {"id": item_id})).one_or_none()
        return None if row is None else tuple(row)

    _nodb(app)
    return app


def raw_asyncpg() -> FastAPI:
    """A raw asyncpg pool with a yield dependency."""
    pools: list[asyncpg.Pool] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pools.append(
            await asyncpg.create_pool(_asyncpg_url(), min_size=POOL_SIZE, max_size=POOL_SIZE)
        )
        yield
        await pools[0].close()

    async def get_conn() -> AsyncIterator[asyncpg.Connection]:
        async with pools[0].acquire() as conn:
            yield conn

    Conn = Annotated[asyncpg.Connection, Depends(get_conn)]
    app = FastAPI(lifespan=lifespan)

    @app.get("/select/{item_id}")
    async def select(item_id: int, conn: Conn) -> Any:
        row = await conn.fetchrow(SELECT + "$1", item_id)
        return None if row is None else tuple(row)

    @app.get("/tx/{item_id}")
    async def tx(item_id: int, conn: Conn) -> Any:
        async with conn.transaction():
            await conn.execute(INSERT + "($1)", item_id)
            row = await conn.fetchrow(SELECT + "$1", item_id)
        return None if row is None else tuple(row)

    _nodb(app)
    return app
