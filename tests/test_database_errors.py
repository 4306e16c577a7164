"""handle_database_errors(app): conflicts with stored data are 409s, transactions a retry may
complete are 503s with Retry-After, each raised by a real server; other errors stay 500s."""

import asyncio
from typing import Any

import psycopg
import pytest
from fastapi import FastAPI

from fastapi_dbpool import ConfigurationError, TransactionDep, handle_database_errors

from .conftest import Server, make_db, serve

pytestmark = pytest.mark.anyio


async def test_database_errors_answer_what_the_client_can_do(
    database_url: str, app_name: str, server: Server
) -> None:
    table = app_name
    server.query(
        f"CREATE TABLE {table} (id int PRIMARY KEY, email text UNIQUE,"
        f" code text UNIQUE DEFERRABLE INITIALLY DEFERRED, hits int DEFAULT 0)"
    )
    server.query(f"INSERT INTO {table} (id, email, code) VALUES (1, 'taken@example.com', 'a')")
    db = make_db(database_url, app_name)
    app = FastAPI()
    handle_database_errors(app, retry_after=2)
    read = asyncio.Event()
    updated = asyncio.Event()

    @app.post("/users/{uid}")
    async def create(uid: int, email: str, tx: TransactionDep) -> dict[str, int]:
        await tx.execute(f"INSERT INTO {table} (id, email) VALUES (%s, %s)", [uid, email])
        return {"id": uid}

    @app.post("/codes")
    async def codes(tx: TransactionDep) -> dict[str, str]:
        # the deferred constraint fails at COMMIT, after the endpoint returned
        await tx.execute(f"INSERT INTO {table} (id, code) VALUES (10, 'b'), (11, 'b')")
        return {"status": "stored"}

    @app.post("/hit")
    async def hit(tx: TransactionDep) -> dict[str, str]:
        await tx.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        await tx.execute(f"SELECT hits FROM {table} WHERE id = 1")
        read.set()
        await updated.wait()  # another client updates the row meanwhile
        await tx.execute(f"UPDATE {table} SET hits = hits + 1 WHERE id = 1")
        return {"status": "counted"}

    @app.post("/locked")
    async def locked(tx: TransactionDep) -> dict[str, str]:
        await tx.execute(f"SELECT 1 FROM {table} WHERE id = 1 FOR UPDATE NOWAIT")
        return {"status": "locked"}

    @app.get("/bug")
    async def bug(tx: TransactionDep) -> dict[str, str]:
        await tx.execute("SELECT 1 / 0")
        return {"status": "unreachable"}

    async with serve(app, db) as client:
        r = await client.post("/users/2", params={"email": "taken@example.com"})
        assert r.status_code == 409, r.text
        assert r.json() == {
            "detail": "The request conflicts with data already stored "
            f"(UniqueViolation on constraint {table}_email_key)",
            "sqlstate": "23505",
            "constraint": f"{table}_email_key",
        }
        assert "taken@example.com" not in r.text  # PostgreSQL's message quotes the value

        r = await client.post("/codes")
        assert r.status_code == 409, r.text
        assert r.json()["constraint"] == f"{table}_code_key"

        async def update_meanwhile() -> None:
            await read.wait()
            async with await psycopg.AsyncConnection.connect(database_url) as other:
                await other.execute(f"UPDATE {table} SET hits = hits + 1 WHERE id = 1")
                await other.commit()
            updated.set()

        r, _ = await asyncio.gather(client.post("/hit"), update_meanwhile())
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "2"
        assert r.json()["sqlstate"] == "40001"
        assert r.json()["detail"].endswith(
            "was rolled back (SerializationFailure); send the request again"
        )

        async with await psycopg.AsyncConnection.connect(database_url) as holder:
            await holder.execute(f"SELECT 1 FROM {table} WHERE id = 1 FOR UPDATE")
            r = await client.post("/locked")
            assert r.status_code == 503, r.text
            assert r.json()["sqlstate"] == "55P03"
        assert (await client.post("/locked")).status_code == 200  # the retry succeeds

        assert (await client.get("/bug")).status_code == 500  # a bug stays a 500

    rows: list[Any] = server.query(f"SELECT id, hits FROM {table} ORDER BY id")
    assert rows == [(1, 1)]  # only the other client's update: nothing of the failed ones
    assert server.wait_until(lambda states: states == []) == []


def test_retry_after_must_be_whole_seconds() -> None:
    with pytest.raises(ConfigurationError, match="retry_after must be a whole number"):
        handle_database_errors(FastAPI(), retry_after=0)
