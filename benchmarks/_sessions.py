"""fastapi_dbpool's SQLAlchemy sessions (``fastapi_dbpool.sqlalchemy``) on the endpoints of
`benchmarks._apps`, beside SQLAlchemy's own pools in `benchmarks._peers`, and on those of
`benchmarks.cancel_storm` (``--orm``).

(No `from __future__ import annotations`: FastAPI must see the local `Annotated` alias.)
"""

import asyncio
import os
import random
from typing import Annotated, Any

from fastapi import FastAPI
from sqlalchemy import Integer, Text, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from fastapi_dbpool import CancellationMiddleware, DBPool
from fastapi_dbpool.sqlalchemy import Sessions

from ._apps import INSERT, POOL_SIZE, SELECT, WATCHDOG, _nodb
from .cancel_storm import HEADER


def fastapi_dbpool_sqlalchemy() -> FastAPI:
    """An AsyncSession per request on fastapi_dbpool's connection, committed before the
    response (the /tx transaction is the session's; /select's BEGIN and COMMIT too)."""
    db = DBPool(
        os.environ["DATABASE_URL"], min_size=POOL_SIZE, max_size=POOL_SIZE, watchdog=WATCHDOG
    )
    orm = Sessions(db)
    Session = Annotated[AsyncSession, orm.session_dependency]
    app = FastAPI(lifespan=db.lifespan)

    @app.get("/select/{item_id}")
    async def select(item_id: int, session: Session) -> Any:
        row = (await session.execute(text(SELECT + ":id"), {"id": item_id})).one_or_none()
        return None if row is None else tuple(row)

    @app.get("/tx/{item_id}")
    async def tx(item_id: int, session: Session) -> Any:
        await session.execute(text(INSERT + "(:id)"), {"id": item_id})
        row = (await session.execute(text(SELECT + ":id"), {"id": item_id})).one_or_none()
        return None if row is None else tuple(row)

    _nodb(app)
    return app


def storm_app(db: DBPool, table: str) -> FastAPI:
    """`benchmarks.cancel_storm`'s routes through sessions on the same pool (``--orm``; no
    stream): an ORM insert and flush, then the sleep that the cut interrupts."""

    class Base(DeclarativeBase):
        pass

    class Row(Base):
        __tablename__ = table
        id: Mapped[int] = mapped_column(Integer, primary_key=True)
        src: Mapped[str] = mapped_column(Text)

    orm = Sessions(db)
    Session = Annotated[AsyncSession, orm.session_dependency]
    app = FastAPI(lifespan=db.lifespan)
    app.add_middleware(CancellationMiddleware, timeout=10, timeout_header=HEADER)

    @app.get("/sleep")
    async def sleep(session: Session) -> None:
        await session.execute(text("SELECT pg_sleep(3)"))

    @app.get("/tx")
    async def tx(session: Session) -> None:
        session.add(Row(src="orm"))
        await session.flush()
        await asyncio.sleep(random.uniform(0, 0.2))
        await session.execute(text("SELECT pg_sleep(3)"))

    @app.get("/pid/{wait}")
    async def pid(wait: float, session: Session) -> int:
        result = await session.execute(text("SELECT pg_backend_pid(), pg_sleep(:w)"), {"w": wait})
        return int(result.one()[0])

    return app
