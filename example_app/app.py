"""A small service built the way the README shows.

Items, created in transactions; a move between two items that commits as a whole or not at
all; a paginated list and single items read through `ReadReplicas` (from read replicas when
``DATABASE_REPLICA_URLS`` names some, else read-only on the primary); a streamed export; a
deliberately slow report that shows deadlines and client disconnects; health, readiness
and Prometheus metrics.
"""

import json
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import StreamingResponse
from prometheus_client import CollectorRegistry
from psycopg import AsyncConnection
from pydantic import BaseModel

from fastapi_dbpool import (
    CancellationMiddleware,
    ConnectionDep,
    DBPool,
    ReadReplicas,
    StreamTransactionDep,
    TransactionDep,
    deadline,
    health_router,
)
from fastapi_dbpool.prometheus import DBPoolCollector, metrics_router

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


def create_app(db: DBPool, *replicas: DBPool) -> FastAPI:
    """The example app on `db` (the primary) and its read `replicas`, if any; the schema is
    created (idempotently) at startup."""
    reader = ReadReplicas(db, *replicas, max_replica_lag=5)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        async with reader.lifespan(app) as state:
            async with db.connection() as conn:
                await conn.execute(SCHEMA)
            yield state

    app = FastAPI(title="fastapi_dbpool example", lifespan=lifespan)
    # every request: 10 s at most (a gateway may ask for less), its queries cancelled in
    # PostgreSQL when it runs out or when the client hangs up
    app.add_middleware(CancellationMiddleware, timeout=10, timeout_header="X-Request-Timeout")
    app.include_router(health_router())
    registry = CollectorRegistry()
    registry.register(DBPoolCollector(db, *replicas))
    app.include_router(metrics_router(registry))
    # a READ ONLY transaction, on a replica when one is fit
    ReadDep = Annotated[AsyncConnection[Any], Depends(reader.get_read_transaction)]

    @app.get("/items")
    async def list_items(conn: ReadDep, limit: int = 50, after: int = 0) -> list[Item]:
        cur = await conn.execute(
            "SELECT id, name, quantity FROM items WHERE id > %s ORDER BY id LIMIT %s",
            (after, min(limit, 500)),
        )
        return [Item(id=i, name=n, quantity=q) for i, n, q in await cur.fetchall()]

    @app.get("/items/{item_id}")
    async def get_item(item_id: int, conn: ReadDep) -> Item:
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

    @app.get("/export")
    async def export(tx: StreamTransactionDep) -> StreamingResponse:
        """Every item as NDJSON, from one snapshot, ending with a `{"end": n}` line so that a
        client can tell a whole export from a cut one."""

        async def lines() -> AsyncIterator[bytes]:
            n = 0
            async with tx.cursor(name="export") as cur:  # server-side: rows come in batches
                await cur.execute("SELECT id, name, quantity FROM items ORDER BY id")
                async for item_id, name, quantity in cur:
                    n += 1
                    row = {"id": item_id, "name": name, "quantity": quantity}
                    yield json.dumps(row).encode() + b"\n"
            yield json.dumps({"end": n}).encode() + b"\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    @app.get("/report", dependencies=[deadline(30)])
    async def report(conn: ConnectionDep, seconds: float = 5.0) -> dict[str, Any]:
        """A slow query (`seconds` of it). Past the deadline (30 s here, or less with
        `X-Request-Timeout`) or when the client hangs up, it is cancelled in PostgreSQL."""
        cur = await conn.execute(
            "SELECT count(*), coalesce(sum(quantity), 0) FROM items, pg_sleep(%s)", (seconds,)
        )
        row = await cur.fetchone()
        assert row is not None
        return {"items": row[0], "quantity": row[1]}

    return app


def replicas_from_env(environ: Mapping[str, str] = os.environ) -> list[DBPool]:
    """A pool for each URL of ``DATABASE_REPLICA_URLS`` (separated by spaces)."""
    urls = environ.get("DATABASE_REPLICA_URLS", "").split()
    return [DBPool(url, name=f"replica{i}", min_size=1) for i, url in enumerate(urls, 1)]


#: The example's pool, unless ``DBPOOL_*`` variables say otherwise: room for a slow report
#: and the requests around it, and a primary that must be writable.
DEFAULTS: dict[str, tuple[str, Any]] = {
    "DBPOOL_MIN_SIZE": ("min_size", 2),
    "DBPOOL_MAX_SIZE": ("max_size", 10),
    "DBPOOL_WRITABLE": ("writable", True),
}


def primary_from_env() -> DBPool:
    """The primary's pool from ``DATABASE_URL`` and ``DBPOOL_*``, with the example's defaults
    (under pytest, the plugin binds it to a test database: see "Testing your app")."""
    unset = {key: value for var, (key, value) in DEFAULTS.items() if var not in os.environ}
    return DBPool.from_env(None, **unset)


def from_env() -> FastAPI:
    """The app on ``DATABASE_URL``, ``DATABASE_REPLICA_URLS`` and ``DBPOOL_*`` (for
    ``uvicorn --factory``, as in the Dockerfile)."""
    return create_app(primary_from_env(), *replicas_from_env())
