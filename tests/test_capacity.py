"""At startup, a pool that may ask for more connections than the server gives says so.

Asked of the real server: its max_connections less the reserved slots and the
backends of other clients, and the role's and the database's CONNECTION LIMIT, against
WEB_CONCURRENCY workers x max_size.
"""

from __future__ import annotations

import logging

import pytest
from fastapi import FastAPI
from psycopg.conninfo import make_conninfo

from benchmarks._pgbouncer import PgBouncer
from fastapi_dbpool import DBPool

from .conftest import Server, make_db

pytestmark = pytest.mark.anyio


def capacity_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "than the server gives" in r.getMessage()]


async def opened(db: DBPool) -> None:
    async with db.lifespan(FastAPI()):
        pass


async def test_workers_times_max_size_over_the_server_is_named(
    database_url: str,
    app_name: str,
    server: Server,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.WARNING, "fastapi_dbpool")
    await opened(make_db(database_url, app_name, max_size=4))  # 1 x 4: room enough
    assert capacity_warnings(caplog) == []

    (usable,) = server.query(
        "SELECT current_setting('max_connections')::int "
        "- current_setting('superuser_reserved_connections')::int "
        "- current_setting('reserved_connections')::int"
    )[0]
    workers = usable // 4 + 1  # one worker too many
    monkeypatch.setenv("WEB_CONCURRENCY", str(workers))
    await opened(make_db(database_url, app_name, max_size=4))
    (warning,) = capacity_warnings(caplog)
    assert f"{workers} worker(s) x max_size 4 = {workers * 4} connections" in warning
    assert f"({usable} usable, " in warning
    suggested = int(warning.split("keep max_size <= ")[1].split()[0])
    assert 0 < suggested * workers <= usable  # the advice fits the server
    assert f"(WEB_CONCURRENCY={workers})" in warning


async def test_a_role_limit_is_named(
    database_url: str, app_name: str, server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "fastapi_dbpool")
    server.query(f"CREATE ROLE {app_name} LOGIN CONNECTION LIMIT 3")
    try:
        await opened(make_db(make_conninfo(database_url, user=app_name), app_name, max_size=4))
    finally:
        server.query(f"DROP ROLE {app_name}")
    (warning,) = capacity_warnings(caplog)
    assert f"role '{app_name}' has CONNECTION LIMIT 3" in warning
    assert "max_size <= 3 per worker" in warning


async def test_behind_a_pooler_the_server_limit_is_not_ours_to_check(
    app_name: str,
    pgbouncer: PgBouncer,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.WARNING, "fastapi_dbpool")
    monkeypatch.setenv("WEB_CONCURRENCY", "1000")
    for pooler in (True, False):  # told, or found (a session pooler, say)
        await opened(make_db(pgbouncer.url, app_name, max_size=4, transaction_pooler=pooler))
    assert capacity_warnings(caplog) == []
