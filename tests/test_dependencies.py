"""ConnectionDep and TransactionDep against a real server."""

import asyncio
from typing import Annotated, Any

import pytest
from fastapi import Depends, FastAPI, HTTPException
from psycopg import AsyncConnection
from psycopg.pq import TransactionStatus

from fastapi_dbpool import ConnectionDep, TransactionDep, get_connection

from .conftest import Server, make_db, serve

pytestmark = pytest.mark.anyio


async def test_a_request_without_database_takes_no_connection(
    database_url: str, app_name: str
) -> None:
    db = make_db(database_url, app_name)
    app = FastAPI()

    @app.get("/plain")
    async def plain() -> dict[str, int]:
        return {"out": db.pool.get_stats().get("requests_num", 0)}

    async with serve(app, db) as client:
        for _ in range(3):
            r = await client.get("/plain")
            assert r.status_code == 200
        assert db.pool.get_stats().get("requests_num", 0) == 0


async def test_all_dependencies_of_a_request_share_one_connection(
    database_url: str, app_name: str
) -> None:
    """Two checkouts per request could deadlock an exhausted pool."""
    db = make_db(database_url, app_name, max_size=1)
    app = FastAPI()

    async def helper(conn: ConnectionDep) -> int:
        return id(conn)

    @app.get("/shared")
    async def shared(
        conn: ConnectionDep, tx: TransactionDep, other: Annotated[int, Depends(helper)]
    ) -> dict[str, bool]:
        return {"same": conn is tx and id(conn) == other}

    @app.get("/transaction-first")
    async def transaction_first(
        tx: TransactionDep, conn: Annotated[AsyncConnection[Any], Depends(get_connection)]
    ) -> dict[str, bool]:
        in_tx = conn.pgconn.transaction_status == TransactionStatus.INTRANS
        return {"same": conn is tx and in_tx}

    async with serve(app, db) as client:
        results = await asyncio.gather(
            *(client.get(path) for path in ["/shared", "/transaction-first"] * 5)
        )
    assert [r.json() for r in results] == [{"same": True}] * 10


async def test_connection_dep_is_autocommit(database_url: str, app_name: str) -> None:
    db = make_db(database_url, app_name)
    app = FastAPI()

    @app.post("/write/{n}")
    async def write(n: int, conn: ConnectionDep) -> dict[str, Any]:
        await conn.execute(f"CREATE TABLE IF NOT EXISTS {app_name} (n int)")
        await conn.execute(f"INSERT INTO {app_name} VALUES (%s)", (n,))
        status = conn.info.transaction_status
        raise HTTPException(418, detail=status.name)

    async with serve(app, db) as client:
        r = await client.post("/write/7")
        assert r.status_code == 418
        assert r.json()["detail"] == "IDLE"  # no transaction left open by a plain statement
        async with db.connection() as conn:
            rows = await (await conn.execute(f"SELECT n FROM {app_name}")).fetchall()
    assert rows == [(7,)]  # the write survived the error: nothing was rolled back


async def test_transaction_commits_before_the_response(database_url: str, app_name: str) -> None:
    db = make_db(database_url, app_name)
    app = FastAPI()
    seen: list[Any] = []

    @app.post("/items/{n}")
    async def create(n: int, tx: TransactionDep) -> dict[str, int]:
        await tx.execute(f"INSERT INTO {app_name} VALUES (%s)", (n,))
        seen.append(tx.info.transaction_status)
        return {"n": n}

    async with serve(app, db) as client:
        async with db.connection() as conn:
            await conn.execute(f"CREATE TABLE {app_name} (n int)")
        r = await client.post("/items/1")
        assert r.status_code == 200
        # the response is out: the row must be visible to anyone, at once
        async with db.connection() as conn:
            rows = await (await conn.execute(f"SELECT n FROM {app_name}")).fetchall()
    assert rows == [(1,)]
    assert seen == [TransactionStatus.INTRANS]


async def test_any_error_rolls_back(database_url: str, app_name: str) -> None:
    db = make_db(database_url, app_name)
    app = FastAPI()

    @app.post("/fail/{kind}")
    async def fail(kind: str, tx: TransactionDep) -> None:
        await tx.execute(f"INSERT INTO {app_name} VALUES (1)")
        if kind == "http":
            raise HTTPException(409, "conflict")
        raise RuntimeError("boom")

    async with serve(app, db) as client:
        async with db.connection() as conn:
            await conn.execute(f"CREATE TABLE {app_name} (n int)")
        assert (await client.post("/fail/http")).status_code == 409
        assert (await client.post("/fail/error")).status_code == 500
        async with db.connection() as conn:
            rows = await (await conn.execute(f"SELECT count(*) FROM {app_name}")).fetchall()
    assert rows == [(0,)]


async def test_failed_commit_is_a_5xx_not_a_2xx(database_url: str, app_name: str) -> None:
    """A deferred constraint fails at COMMIT: the client must not get a 200."""
    db = make_db(database_url, app_name)
    app = FastAPI()

    @app.post("/deferred")
    async def deferred(tx: TransactionDep) -> dict[str, str]:
        await tx.execute(f"INSERT INTO {app_name}_child VALUES (42)")  # no such parent
        return {"status": "created"}

    async with serve(app, db) as client:
        async with db.connection() as conn:
            await conn.execute(f"CREATE TABLE {app_name}_parent (id int PRIMARY KEY)")
            await conn.execute(
                f"CREATE TABLE {app_name}_child (pid int REFERENCES {app_name}_parent "
                "DEFERRABLE INITIALLY DEFERRED)"
            )
        r = await client.post("/deferred")
        assert r.status_code == 500
        async with db.connection() as conn:
            rows = await (await conn.execute(f"SELECT count(*) FROM {app_name}_child")).fetchall()
    assert rows == [(0,)]


async def test_connection_is_idle_when_handed_out_and_returned(
    database_url: str, server: Server, app_name: str
) -> None:
    db = make_db(database_url, app_name, max_size=1)
    app = FastAPI()

    @app.get("/leave-open")
    async def leave_open(conn: ConnectionDep) -> dict[str, str]:
        status = conn.info.transaction_status.name
        await conn.execute("BEGIN")
        await conn.execute("SELECT 1")
        return {"status": status}

    async with serve(app, db) as client:
        for _ in range(3):
            r = await client.get("/leave-open")
            assert r.json() == {"status": "IDLE"}
        assert server.wait_until(lambda s: s == ["idle"]) == ["idle"]


async def test_exhaustion_answers_503_with_retry_after(database_url: str, app_name: str) -> None:
    db = make_db(database_url, app_name, max_size=1, acquire_timeout=0.3, retry_after=2)
    app = FastAPI()
    holding = asyncio.Event()
    finish = asyncio.Event()

    @app.get("/hold")
    async def hold(conn: ConnectionDep) -> None:
        holding.set()
        await finish.wait()

    @app.get("/one")
    async def one(conn: ConnectionDep) -> dict[str, int]:
        return {"one": 1}

    async with serve(app, db) as client:
        holder = asyncio.create_task(client.get("/hold"))
        await holding.wait()
        r = await client.get("/one")
        assert r.status_code == 503
        assert r.headers["retry-after"] == "2"
        finish.set()
        assert (await holder).status_code == 200
        assert (await client.get("/one")).json() == {"one": 1}  # nothing was lost


async def test_max_waiting_sheds_load(database_url: str, app_name: str) -> None:
    db = make_db(database_url, app_name, max_size=1, max_waiting=1, acquire_timeout=5)
    app = FastAPI()
    finish = asyncio.Event()

    @app.get("/hold")
    async def hold(conn: ConnectionDep) -> None:
        await finish.wait()

    async with serve(app, db) as client:
        tasks = [asyncio.create_task(client.get("/hold")) for _ in range(2)]
        while db.stats().requests_waiting < 1:
            await asyncio.sleep(0.01)
        r = await client.get("/hold")
        assert r.status_code == 503
        finish.set()
        assert [t.status_code for t in await asyncio.gather(*tasks)] == [200, 200]


async def test_typed_alias_with_a_row_factory(database_url: str, app_name: str) -> None:
    from psycopg.rows import DictRow, dict_row

    db = make_db(database_url, app_name, kwargs={"row_factory": dict_row})
    app = FastAPI()
    DictConnectionDep = Annotated[AsyncConnection[DictRow], Depends(get_connection)]

    @app.get("/row")
    async def row(conn: DictConnectionDep) -> dict[str, Any]:
        cur = await conn.execute("SELECT 1 AS one")
        return dict(await cur.fetchone() or {})

    async with serve(app, db) as client:
        assert (await client.get("/row")).json() == {"one": 1}
