"""docs/sqlalchemy.md's Alembic recipe (tests/alembic_project/), run as a user runs it:
``alembic upgrade head`` in a subprocess against a real server, its URL read as the app
reads its own, and as the plugin's ``dbpool_schema``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import psycopg
import pytest

pytest.importorskip("sqlalchemy", reason="fastapi_dbpool[sqlalchemy] is not installed")
pytest.importorskip("alembic", reason="alembic is not installed")

from fastapi_dbpool.testing import _databases

from .conftest import Server, plugin_ini

pytest_plugins = ["pytester"]

PROJECT = Path(__file__).resolve().parent / "alembic_project"


def alembic(
    url: str, *args: str, cwd: Path = PROJECT, **env: str
) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DBPOOL_")}
    return subprocess.run(
        [sys.executable, "-m", "alembic", *args],
        cwd=cwd,
        env={**environ, "DATABASE_URL": url, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def tables(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1"
        ).fetchall()
    return [name for (name,) in rows]


def test_upgrade_and_downgrade_run_on_the_apps_url_handling(database_url: str) -> None:
    with _databases.database(database_url, "dbpool_alembic") as url:
        up = alembic(url, "upgrade", "head")
        assert up.returncode == 0, up.stderr
        assert "Running upgrade  -> 0001, create notes" in up.stderr
        assert tables(url) == ["alembic_version", "notes"]
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [("0001",)]
        # and nothing left behind: the pool closed its connection (backends leave the view
        # a moment after their client)
        assert Server(url, "migrations").wait_until(lambda states: not states) == []
        down = alembic(url, "downgrade", "base")
        assert down.returncode == 0, down.stderr
        assert tables(url) == ["alembic_version"]


def test_a_bad_setting_fails_with_the_apps_error(database_url: str) -> None:
    with _databases.database(database_url, "dbpool_alembic") as url:
        failed = alembic(url, "upgrade", "head", DBPOOL_MAX_SIZ="1")
        assert failed.returncode != 0
        assert "DBPOOL_MAX_SIZ is not a fastapi_dbpool setting; did you mean DBPOOL_MAX_SIZE?" in (
            failed.stderr
        )
        assert tables(url) == []


APP = """
from typing import Annotated

import pytest
from fastapi import FastAPI
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from fastapi_dbpool import DBPool
from fastapi_dbpool.sqlalchemy import Sessions
from notes_models import Note

db = DBPool.from_env(min_size=1, max_size=2)
orm = Sessions(db)
SessionDep = Annotated[AsyncSession, orm.session_dependency]
app_ = FastAPI(lifespan=db.lifespan)


@app_.post("/notes")
async def create(text: str, session: SessionDep):
    session.add(Note(text=text))


@app_.get("/notes")
async def notes(session: SessionDep):
    return list((await session.execute(select(Note.text).order_by(Note.id))).scalars())


@pytest.fixture
def app():
    return app_


@pytest.fixture(scope="session")
def dbpool_schema():
    import os, subprocess, sys

    def upgrade(url):  # the test database's URL, migrated as in production
        subprocess.run(
            [sys.executable, "-m", "alembic", "upgrade", "head"],
            env={**os.environ, "DATABASE_URL": url},
            check=True,
        )

    return upgrade
"""

TESTS = """
import pytest

pytestmark = pytest.mark.asyncio


async def test_1_writes(dbpool_client):
    assert (await dbpool_client.post("/notes", params={"text": "a"})).status_code == 200
    assert (await dbpool_client.get("/notes")).json() == ["a"]


async def test_2_sees_the_migrated_table_empty(dbpool_client):
    assert (await dbpool_client.get("/notes")).json() == []
"""


def test_the_plugin_builds_the_test_database_with_alembic(
    pytester: pytest.Pytester, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    shutil.copytree(PROJECT, pytester.path, dirs_exist_ok=True)
    pytester.makeconftest(APP)
    pytester.makepyfile(test_notes=textwrap.dedent(TESTS))
    plugin_ini(pytester, database_url)
    result = pytester.runpytest_subprocess(timeout=180)
    result.assert_outcomes(passed=2)
