"""The tutorial project's conftest.py, switched to the plugin: no SQLite engine override;
each test runs in a transaction of its own, rolled back after it."""

import pytest
from fastapi import FastAPI
from heroes import app as heroes_app
from sqlmodel import SQLModel, create_engine


@pytest.fixture
def app() -> FastAPI:
    return heroes_app


@pytest.fixture(scope="session")
def dbpool_schema():  # type: ignore[no-untyped-def]
    def create_all(url: str) -> None:  # the test database's postgresql:// URL
        engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
        try:
            SQLModel.metadata.create_all(engine)
        finally:
            engine.dispose()

    return create_all
