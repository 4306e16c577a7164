"""Typed rows through the package's dependencies, as the README shows: checked by mypy
--strict (the suite's own configuration) and run against a real PostgreSQL."""

from dataclasses import dataclass
from typing import Annotated, Any

import pytest
from fastapi import Depends, FastAPI
from psycopg import AsyncConnection
from psycopg.rows import DictRow, class_row, dict_row

from fastapi_dbpool import get_connection, get_transaction

from .conftest import make_db, running

pytestmark = pytest.mark.anyio

# the pool's row_factory makes the rows; the alias tells type checkers what they are
DictConnection = Annotated[AsyncConnection[DictRow], Depends(get_connection)]
DictTransaction = Annotated[AsyncConnection[DictRow], Depends(get_transaction)]


@dataclass
class Item:
    id: int
    name: str


async def test_dict_rows_and_class_rows(database_url: str, app_name: str) -> None:
    db = make_db(database_url, app_name, kwargs={"row_factory": dict_row})
    app = FastAPI(lifespan=db.lifespan)

    @app.get("/dict")
    async def as_dict(conn: DictConnection) -> dict[str, Any]:
        cur = await conn.execute("SELECT 1 AS id, 'one' AS name")
        row: DictRow | None = await cur.fetchone()
        assert row is not None
        return row

    @app.get("/item")
    async def as_item(tx: DictTransaction) -> str:
        async with tx.cursor(row_factory=class_row(Item)) as cur:
            await cur.execute("SELECT 2 AS id, 'two' AS name")
            item: Item | None = await cur.fetchone()
        assert isinstance(item, Item)
        return item.name

    async with running(app) as client:
        assert (await client.get("/dict")).json() == {"id": 1, "name": "one"}
        assert (await client.get("/item")).json() == "two"
