"""The pytest plugin isolates tests whose app uses SQLAlchemy sessions, run as a user runs
it: a sample project in a subprocess, its schema built by ``metadata.create_all``."""

from __future__ import annotations

import textwrap

import pytest

pytest.importorskip("sqlalchemy", reason="fastapi_dbpool[sqlalchemy] is not installed")

from .conftest import Server, plugin_ini

pytest_plugins = ["pytester"]

CONFTEST = """
from typing import Annotated

import pytest
from fastapi import FastAPI
from sqlalchemy import String, create_engine, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from fastapi_dbpool import DBPool
from fastapi_dbpool.sqlalchemy import Sessions

db = DBPool.from_env(name="{app_name}", min_size=1, max_size=2)  # DATABASE_URL is unset
orm = Sessions(db)
SessionDep = Annotated[AsyncSession, orm.session_dependency]
app_ = FastAPI(lifespan=db.lifespan)


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(String(50), unique=True)


@app_.post("/notes")
async def create(text: str, session: SessionDep):
    session.add(Note(text=text))  # committed by the dependency, before the response


@app_.post("/notes/now")
async def create_now(text: str, session: SessionDep):
    session.add(Note(text=text))
    await session.commit()  # the endpoint's own COMMIT


@app_.post("/notes/undo")
async def undo(text: str, session: SessionDep):
    session.add(Note(text=text))
    await session.flush()
    await session.rollback()


@app_.get("/notes")
async def notes(session: SessionDep):
    return list((await session.execute(select(Note.text).order_by(Note.id))).scalars())


@pytest.fixture
def app():
    return app_


@pytest.fixture(scope="session")
def dbpool_schema():
    def create_all(url):  # a postgresql:// URL: SQLAlchemy's sync engine builds the schema
        engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
        try:
            Base.metadata.create_all(engine)
        finally:
            engine.dispose()

    return create_all
"""

TESTS = """
import pytest

pytestmark = pytest.mark.asyncio


async def test_1_writes(dbpool_client):
    assert (await dbpool_client.post("/notes", params={"text": "a"})).status_code == 200
    assert (await dbpool_client.post("/notes/now", params={"text": "b"})).status_code == 200
    assert (await dbpool_client.post("/notes/undo", params={"text": "c"})).status_code == 200
    assert (await dbpool_client.get("/notes")).json() == ["a", "b"]


async def test_2_sees_an_empty_table(dbpool_client):
    assert (await dbpool_client.get("/notes")).json() == []
    # and the same text again: test 1's unique row is gone, not hidden
    assert (await dbpool_client.post("/notes/now", params={"text": "b"})).status_code == 200
    assert (await dbpool_client.get("/notes")).json() == ["b"]


async def test_3_still_empty(dbpool_client):
    assert (await dbpool_client.get("/notes")).json() == []
"""


def test_session_writes_are_rolled_back_between_tests(
    pytester: pytest.Pytester,
    database_url: str,
    app_name: str,
    server: Server,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A session's commits, the dependency's and the endpoint's own, are savepoints inside
    each test's pinned transaction: the next test finds the table empty."""
    monkeypatch.delenv("DATABASE_URL", raising=False)
    pytester.makeconftest(CONFTEST.format(app_name=app_name))
    plugin_ini(pytester, database_url)
    pytester.makepyfile(test_notes=textwrap.dedent(TESTS))
    before = {
        row[0]
        for row in server.query("SELECT datname FROM pg_database WHERE datname LIKE 'dbpool_%%'")
    }
    result = pytester.runpytest_subprocess(timeout=180)
    result.assert_outcomes(passed=3)
    after = {
        row[0]
        for row in server.query("SELECT datname FROM pg_database WHERE datname LIKE 'dbpool_%%'")
    }
    assert after - before == set()  # the session's test database was dropped
    assert server.wait_until(lambda states: not states) == []  # backends leave a moment after
