"""A small service built the way the README shows: items, created in transactions."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

from fastapi_dbpool import ConnectionDep, DBPool, TransactionDep

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name text NOT NULL CHECK (name <> ''),
    quantity int NOT NULL DEFAULT 0 CHECK (quantity >= 0)
)
"""


class ItemIn(BaseModel):
    name: str
    quantity: int = 0


class Item(ItemIn):
    id: int


def create_app(db: DBPool) -> FastAPI:
    """The example app on `db`; the schema is created (idempotently) at startup."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        async with db.lifespan(app) as state:
            async with db.connection() as conn:
                await conn.execute(SCHEMA)
            yield state

    app = FastAPI(title="fastapi_dbpool example", lifespan=lifespan)

    @app.get("/items")
    async def list_items(conn: ConnectionDep, limit: int = 50, after: int = 0) -> list[Item]:
        cur = await conn.execute(
            "SELECT id, name, quantity FROM items WHERE id > %s ORDER BY id LIMIT %s",
            (after, min(limit, 500)),
        )
        return [Item(id=i, name=n, quantity=q) for i, n, q in await cur.fetchall()]

    @app.get("/items/{item_id}")
    async def get_item(item_id: int, conn: ConnectionDep) -> Item:
        cur = await conn.execute("SELECT id, name, quantity FROM items WHERE id = %s", (item_id,))
        row = await cur.fetchone()
        if row is None:
            raise HTTPException(404, f"item {item_id} not found")
        return Item(id=row[0], name=row[1], quantity=row[2])

    @app.post("/items", status_code=201)
    async def create_item(item: ItemIn, tx: TransactionDep) -> Item:
        cur = await tx.execute(
            "INSERT INTO items (name, quantity) VALUES (%s, %s) RETURNING id",
            (item.name, item.quantity),
        )
        row = await cur.fetchone()
        assert row is not None
        return Item(id=row[0], **item.model_dump())

    @app.post("/items/{source}/move/{target}")
    async def move(source: int, target: int, quantity: int, tx: TransactionDep) -> list[Item]:
        """Both updates commit, or neither: a 409 rolls the first one back."""
        await tx.execute(
            "UPDATE items SET quantity = quantity + %s WHERE id = %s", (quantity, target)
        )
        cur = await tx.execute(
            "UPDATE items SET quantity = quantity - %s WHERE id = %s AND quantity >= %s "
            "RETURNING id",
            (quantity, source, quantity),
        )
        if await cur.fetchone() is None:
            raise HTTPException(409, f"item {source} does not hold {quantity}")
        cur = await tx.execute(
            "SELECT id, name, quantity FROM items WHERE id IN (%s, %s) ORDER BY id",
            (source, target),
        )
        return [Item(id=i, name=n, quantity=q) for i, n, q in await cur.fetchall()]

    return app
