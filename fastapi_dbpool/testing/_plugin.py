"""The pytest plugin: a real database per session, the app on the test's loop, rollback per test.

Registered through the ``pytest11`` entry point as ``fastapi_dbpool`` (disable it with
``-p no:fastapi_dbpool``). Nothing starts unless a test asks for one of its fixtures.

Fixtures:

- ``dbpool_server_url`` (session): ``--dbpool-url``, the ``dbpool_url`` ini option or
  ``DATABASE_URL``; otherwise one embedded PostgreSQL for the session.
- ``dbpool_schema`` (session; override it): SQL, or a callable given a database URL (to
  run migrations), creating the schema. It runs once per session, into a template.
- ``dbpool_url`` (session): a database of the session, a copy of the template; dropped
  at the end.
- ``dbpool_seed`` (module; override it): SQL, or a callable given a database URL, adding
  data the module's tests share. It runs once per module, committed, on a copy of the
  template of the module's own.
- ``dbpool_module_url`` (module): the database the module's tests share, ``dbpool_url``
  unless the module has a seed.
- ``dbpool_fresh_url``: a database of its own for one test, a copy of the template, with
  the module's seed.
- ``dbpool_isolation``: ``"rollback"`` (the default) or ``"database"``; override it for
  tests that must commit for real.
- ``dbpool_app``: an `AppHarness` for the user's ``app`` fixture, started on the test's
  own event loop and stopped when the test ends.
- ``dbpool_client``: an ``httpx.AsyncClient`` on ``dbpool_app``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Generator, Iterator
from typing import Any

import pytest

from .. import _pinned
from ..errors import ConfigurationError
from . import _app, _databases
from ._app import AppHarness
from ._postgres import database_url

_ISOLATION_MODES = ("rollback", "database")


def pytest_addoption(parser: pytest.Parser) -> None:
    help_url = (
        "PostgreSQL server for fastapi_dbpool's test databases (default: DATABASE_URL, "
        "else an embedded PostgreSQL)"
    )
    parser.getgroup("fastapi_dbpool").addoption("--dbpool-url", default=None, help=help_url)
    parser.addini("dbpool_url", help=help_url, default="")


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config) -> None:
    """DBPool.from_env() may go without DATABASE_URL from now on: the fixtures bind it.

    From before the first conftest.py is imported (pytest_configure comes after), since
    a conftest that imports the app runs its module-level ``DBPool.from_env()`` then.
    """
    _pinned.plugin_sessions += 1

    def done() -> None:
        _pinned.plugin_sessions -= 1

    early_config.add_cleanup(done)


@pytest.fixture(scope="session")
def dbpool_server_url(pytestconfig: pytest.Config) -> Iterator[str]:
    """The PostgreSQL server the test databases are created on."""
    given = pytestconfig.getoption("dbpool_url") or pytestconfig.getini("dbpool_url")
    if given:
        yield str(given)
        return
    with database_url() as url:
        yield url


@pytest.fixture(scope="session")
def dbpool_schema() -> _databases.Schema:
    """The schema of the test databases: override it (SQL, or a callable given the URL)."""
    return None


@pytest.fixture(scope="session")
def dbpool_template(
    dbpool_server_url: str, dbpool_schema: _databases.Schema
) -> Iterator[str | None]:
    """The name of a template database holding `dbpool_schema`, built once per session."""
    with _databases.template(dbpool_server_url, dbpool_schema) as name:
        yield name


@pytest.fixture(scope="session")
def dbpool_url(dbpool_server_url: str, dbpool_template: str | None) -> Iterator[str]:
    """A database for the session, with the schema; tests share it under rollback isolation."""
    with _databases.database(dbpool_server_url, "dbpool_test", dbpool_template) as url:
        yield url


@pytest.fixture(scope="module")
def dbpool_seed() -> _databases.Schema:
    """Data the tests of a module share: override it, module-scoped (SQL, or a callable
    given the URL). Committed once, on a database of the module's own (`dbpool_module_url`)."""
    return None


@pytest.fixture(scope="module")
def dbpool_module_url(
    dbpool_url: str,
    dbpool_server_url: str,
    dbpool_template: str | None,
    dbpool_seed: _databases.Schema,
) -> Iterator[str]:
    """The database the module's tests share under rollback isolation: the session's
    (`dbpool_url`), or, with a `dbpool_seed`, a copy of the template holding it, dropped
    after the module."""
    if dbpool_seed is None:
        yield dbpool_url
        return
    with _databases.database(dbpool_server_url, "dbpool_module", dbpool_template) as url:
        _databases.apply_schema(url, dbpool_seed, "dbpool_seed")
        yield url


@pytest.fixture
def dbpool_fresh_url(
    dbpool_server_url: str, dbpool_template: str | None, dbpool_seed: _databases.Schema
) -> Iterator[str]:
    """A database for one test, with the schema and the module's seed, dropped after it."""
    with _databases.database(dbpool_server_url, "dbpool_fresh", dbpool_template) as url:
        _databases.apply_schema(url, dbpool_seed, "dbpool_seed")
        yield url


@pytest.fixture
def dbpool_isolation() -> str:
    """How tests are kept apart: "rollback" (one transaction, rolled back) or "database"."""
    return "rollback"


@pytest.fixture
def dbpool_app(request: pytest.FixtureRequest, dbpool_isolation: str) -> Iterator[AppHarness]:
    """The user's ``app`` fixture, run on the test's loop with its pools on a test database."""
    if dbpool_isolation not in _ISOLATION_MODES:
        raise ConfigurationError(
            f"The dbpool_isolation fixture returned {dbpool_isolation!r}; it must return "
            "'rollback' (the test's writes are rolled back) or 'database' (a fresh database "
            "for the test, for code that must commit for real)."
        )
    try:
        app = request.getfixturevalue("app")
    except pytest.FixtureLookupError:
        raise ConfigurationError(
            "dbpool_app and dbpool_client need an `app` fixture that returns your FastAPI "
            "app (or any ASGI app whose lifespan opens a DBPool). Define it in conftest.py:\n"
            "    @pytest.fixture\n    def app():\n        return myproject.main.app"
        ) from None
    isolate = dbpool_isolation == "rollback"
    fixture = "dbpool_module_url" if isolate else "dbpool_fresh_url"
    harness = AppHarness(app, request.getfixturevalue(fixture), isolate=isolate)
    yield harness
    harness.close()


@pytest.fixture
def dbpool_client(dbpool_app: AppHarness) -> Any:
    """An ``httpx.AsyncClient`` on the app (base URL ``http://test``)."""
    return dbpool_app.client()


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(
    fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest
) -> Generator[None, object, object]:
    """An app started by an async fixture stops when that fixture is torn down.

    That fixture depends on its event loop, so it goes before the loop does: the app's
    shutdown runs on a live loop. Left to the teardown of `dbpool_app` it could come after
    a loop of narrower scope than the test's had cancelled every task on it, psycopg_pool's
    workers and the app's shutdown included, and left its connections open. Registered
    before the fixture runs, so the fixture's own teardown still has the app.
    """
    started: list[AppHarness] = []
    fixturedef.addfinalizer(functools.partial(_close_all, started))
    outer, _app.started_during = _app.started_during, started
    try:
        return (yield)
    finally:
        _app.started_during = outer


def _close_all(harnesses: list[AppHarness]) -> None:
    for harness in harnesses:
        harness.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    """Start the app in the test's own coroutine, so on its loop, and stop it there.

    Whatever runs the coroutine (pytest-asyncio at any loop scope, anyio's plugin), the
    app's pools open and close on the loop the test body runs on.
    """
    harness = getattr(item, "funcargs", {}).get("dbpool_app")
    test = getattr(item, "obj", None)
    if not isinstance(harness, AppHarness) or not inspect.iscoroutinefunction(test):
        return (yield)

    @functools.wraps(test)
    async def run(*args: Any, **kwargs: Any) -> Any:
        started_here = not harness.started
        await harness.start()
        try:
            return await test(*args, **kwargs)
        finally:
            if started_here:
                await harness.stop()

    item.obj = run  # type: ignore[attr-defined]
    try:
        return (yield)
    finally:
        item.obj = test  # type: ignore[attr-defined]
