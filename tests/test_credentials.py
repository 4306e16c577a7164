"""Rotating credentials, against a real role whose password PostgreSQL really checks.

The suite's server trusts local connections; these tests put one scram-sha-256 line for
their own role at the top of its pg_hba.conf (and take it out again), so a wrong
password is refused by PostgreSQL itself.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi import FastAPI
from psycopg.conninfo import make_conninfo

from fastapi_dbpool import ConfigurationError, ConnectionDep, DBPool, PasswordFile, PoolOpenError
from fastapi_dbpool._credentials import Source

from .conftest import Server, make_db, serve

pytestmark = pytest.mark.anyio

# Passwords no temporary path or role name can contain by chance (a socket directory
# named "dbpool-pg-uonefn2v" once held "one").
FIRST = "pw-first-Q7xK"
SECOND = "pw-second-M3zR"


@pytest.fixture
def role(server: Server, app_name: str, database_url: str) -> Iterator[str]:
    """A LOGIN role with password FIRST, which PostgreSQL asks for (scram-sha-256)."""
    (hba_file,) = server.query("SHOW hba_file")[0]
    if not os.access(hba_file, os.W_OK):
        pytest.skip(f"the server's pg_hba.conf ({hba_file}) is not writable from here")
    original = Path(hba_file).read_text()
    server.query(f"CREATE ROLE {app_name} LOGIN PASSWORD '{FIRST}'")
    Path(hba_file).write_text(f"local all {app_name} scram-sha-256\n{original}")
    server.query("SELECT pg_reload_conf()")
    try:
        url = make_conninfo(database_url, user=app_name, password="wrong")
        for _ in range(50):  # the reload is asynchronous: wait until the password counts
            try:
                psycopg.connect(url).close()
            except psycopg.OperationalError:
                break
            time.sleep(0.1)
        else:
            pytest.fail("PostgreSQL did not start asking for the role's password")
        yield app_name
    finally:
        Path(hba_file).write_text(original)
        server.query("SELECT pg_reload_conf()")
        server.query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", app_name
        )
        server.query(f"DROP ROLE IF EXISTS {app_name}")


def rotating_app(db: DBPool) -> FastAPI:
    app = FastAPI(lifespan=db.lifespan)

    @app.get("/pid")
    async def pid(conn: ConnectionDep) -> int:
        row = await (await conn.execute("SELECT pg_backend_pid()")).fetchone()
        assert row is not None
        return int(row[0])

    return app


async def rotate_under_load(
    db: DBPool, server: Server, role: str, secret: Path
) -> tuple[list[tuple[float, int, Any]], float, set[int]]:
    """40 requests a second for 3 s; at 1 s the password changes, at 1.5 s the app's
    backends are terminated, so the pool must open new connections with the new one.

    Returns (time, status, body) per request, when the new password was in place, and
    the backend PIDs serving before the change.
    """
    results: list[tuple[float, int, Any]] = []
    async with serve(rotating_app(db), db) as client:
        start = time.monotonic()

        async def one(at: float) -> None:
            await asyncio.sleep(max(at - (time.monotonic() - start), 0))
            answer = await client.get("/pid")
            body = answer.json() if answer.status_code == 200 else answer.text
            results.append((at, answer.status_code, body))

        async def rotate() -> float:
            await asyncio.sleep(1.0)
            server.query(f"ALTER ROLE {role} PASSWORD '{SECOND}'")
            await asyncio.to_thread(secret.write_text, f"{SECOND}\n")  # the store publishes it
            in_place = time.monotonic() - start
            await asyncio.sleep(0.5)
            server.query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", role
            )
            return in_place

        rotation = asyncio.create_task(rotate())
        await asyncio.gather(*(one(i / 40) for i in range(120)))
        in_place = await rotation
    before = {body for at, status, body in results if at < 1.0 and status == 200}
    return results, in_place, before


async def test_a_rotated_password_file_is_used_from_the_next_connection(
    database_url: str, app_name: str, role: str, server: Server, tmp_path: Path
) -> None:
    secret = tmp_path / "db-password"
    secret.write_text(f"{FIRST}\n")
    url = make_conninfo(database_url, user=role)
    db = make_db(url, app_name, password=PasswordFile(secret), min_size=2, max_size=4)
    assert FIRST not in repr(db)

    results, in_place, before = await rotate_under_load(db, server, role, secret)
    assert len(results) == 120
    assert [r for r in results if r[1] != 200] == []  # not one request failed
    # existing connections kept serving after the change, until they were terminated
    between = {body for at, status, body in results if in_place + 0.05 < at < 1.45}
    assert between
    assert between <= before
    after = {body for at, status, body in results if at > 2.0}
    assert after
    assert not (after & before)


async def test_a_password_read_once_fails_after_rotation_and_says_why(
    database_url: str, app_name: str, role: str, server: Server, tmp_path: Path
) -> None:
    """The control: the same rotation with a fixed password fails, naming the cause."""
    db = make_db(
        make_conninfo(database_url, user=role),
        app_name,
        password=FIRST,
        min_size=2,
        max_size=4,
        acquire_timeout=0.3,
    )
    results, _, _ = await rotate_under_load(db, server, role, tmp_path / "unused")
    late = [status for at, status, _ in results if at > 2.0]
    assert late
    assert set(late) == {503}
    assert db._connect_log.last is not None
    assert db._connect_log.last.cause == "authentication"
    assert SECOND not in str(db._connect_log.last)
    assert FIRST not in str(db._connect_log.last)


async def test_callable_sources_sync_and_async(database_url: str, app_name: str, role: str) -> None:
    calls: list[str] = []

    async def iam_token() -> str:  # a cloud IAM token: fetched for each connection
        calls.append("token")
        return FIRST

    def conninfo() -> str:
        calls.append("conninfo")
        return make_conninfo(database_url, user=role)

    sources: list[tuple[Source, Source]] = [(conninfo, iam_token), (conninfo, lambda: FIRST)]
    for conninfo_source, password in sources:
        calls.clear()
        db = make_db(conninfo_source, app_name, password=password, min_size=2)
        assert repr(db).startswith(f"<DBPool {app_name!r} <conninfo from ")
        async with serve(rotating_app(db), db) as client:
            assert (await client.get("/pid")).status_code == 200
        # once for the startup check, then once per pool connection
        assert calls.count("conninfo") >= 3
        assert password is not iam_token or calls.count("token") >= 3


async def test_bad_sources_fail_with_the_cause_and_no_secret(
    database_url: str, app_name: str, tmp_path: Path
) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(PoolOpenError, match=r"password file .*nowhere.* cannot be read"):
        async with make_db(database_url, app_name, password=PasswordFile(missing)).lifespan(
            FastAPI()
        ):
            pass
    with pytest.raises(PoolOpenError, match=r"conninfo callable failed .*malformed") as bad:
        async with make_db(lambda: "host=x password=hunter2 =bad", app_name).lifespan(FastAPI()):
            pass
    assert "hunter2" not in str(bad.value)
    with pytest.raises(ConfigurationError, match="password must be a string or a callable"):
        DBPool(database_url, password=42)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"conninfo must be a string .* or a callable"):
        DBPool(42)  # type: ignore[arg-type]
    environ = {"DATABASE_URL": database_url, "DBPOOL_PASSWORD_FILE": str(missing)}
    with pytest.raises(PoolOpenError, match=r"password file .*nowhere"):
        async with DBPool.from_env(environ, min_size=1).lifespan(FastAPI()):
            pass
