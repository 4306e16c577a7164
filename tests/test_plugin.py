"""The pytest plugin, run on sample projects through pytester against the suite's PostgreSQL."""

from __future__ import annotations

import textwrap
from collections.abc import Callable

import pytest
from fastapi import FastAPI

from fastapi_dbpool import ConfigurationError, DBPool
from fastapi_dbpool.testing import AppHarness

from .conftest import Server, plugin_ini

pytest_plugins = ["pytester"]

APP = """
import pytest
from fastapi import FastAPI
from fastapi_dbpool import CancellationMiddleware, ConnectionDep, DBPool, TransactionDep

db = DBPool.from_env(name="{app_name}", min_size=1, max_size=2)  # DATABASE_URL is unset
app_ = FastAPI(lifespan=db.lifespan)
app_.add_middleware(CancellationMiddleware, timeout=5, timeout_header="X-Timeout")


@app_.post("/items")
async def create(name: str, tx: TransactionDep):
    await tx.execute("INSERT INTO items (name) VALUES (%s)", (name,))
    return {{"ok": True}}


@app_.post("/log")
async def log(line: str, conn: ConnectionDep):  # autocommit: no transaction of its own
    await conn.execute("INSERT INTO items (name) VALUES (%s)", (line,))


@app_.get("/items")
async def items(conn: ConnectionDep):
    cur = await conn.execute("SELECT name FROM items ORDER BY id")
    return [r[0] for r in await cur.fetchall()]


@app_.get("/sleep")
async def sleep(conn: ConnectionDep):
    await conn.execute("SELECT pg_sleep(30)")


@app_.get("/boom")
async def boom():
    raise RuntimeError("boom")


@app_.post("/commit")
async def commit(conn: ConnectionDep):
    await conn.execute("INSERT INTO items (name) VALUES ('escaped')")
    await conn.execute("COMMIT")


@pytest.fixture
def app():
    return app_


SCHEMA = "CREATE TABLE items (id serial PRIMARY KEY, name text UNIQUE NOT NULL)"


@pytest.fixture(scope="session")
def dbpool_schema():
    return SCHEMA


@pytest.fixture
def anyio_backend():
    return "asyncio"
"""

WRITE_THEN_EMPTY = """
import pytest

pytestmark = {mark}


async def test_1_writes(dbpool_client):
    assert (await dbpool_client.post("/items", params={{"name": "a"}})).status_code == 200
    assert (await dbpool_client.post("/log", params={{"line": "b"}})).status_code == 200
    assert (await dbpool_client.get("/items")).json() == ["a", "b"]


async def test_2_sees_an_empty_table(dbpool_client):
    assert (await dbpool_client.get("/items")).json() == []
"""


@pytest.fixture
def project(
    pytester: pytest.Pytester, database_url: str, app_name: str, monkeypatch: pytest.MonkeyPatch
) -> pytest.Pytester:
    """A sample project whose app creates its DBPool at import, from an empty environment."""
    monkeypatch.delenv("DATABASE_URL", raising=False)
    pytester.makeconftest(APP.format(app_name=app_name))
    # In process, the outer session has imported the plugin's package already (pytest 9.2
    # warns that it cannot rewrite it); subprocess runs, as users run, are in test_readme.
    plugin_ini(
        pytester,
        database_url,
        "ignore:Module already imported so cannot be rewritten:pytest.PytestAssertRewriteWarning",
    )
    return pytester


def run(project: pytest.Pytester, source: str) -> pytest.RunResult:
    project.makepyfile(test_sample=textwrap.dedent(source))
    return project.runpytest()


def dbpool_databases(server: Server) -> set[str]:
    rows = server.query("SELECT datname FROM pg_database WHERE datname LIKE 'dbpool_%%'")
    return {row[0] for row in rows}


@pytest.fixture
def leftovers(server: Server) -> Callable[[], list[str]]:
    """Test databases and backends the inner session left behind (both must be none); the
    outer session's own test databases (the example app's tests) do not count."""
    before = dbpool_databases(server)

    def left() -> list[str]:
        backends = server.query(
            "SELECT state FROM pg_stat_activity WHERE application_name = %s", server.app_name
        )
        return sorted(dbpool_databases(server) - before) + [f"backend {b}" for (b,) in backends]

    return left


@pytest.mark.parametrize(
    "mark",
    [
        'pytest.mark.asyncio(loop_scope="function")',
        'pytest.mark.asyncio(loop_scope="module")',
        'pytest.mark.asyncio(loop_scope="session")',
        "pytest.mark.anyio",
    ],
)
def test_a_test_write_is_rolled_back_before_the_next_test(
    project: pytest.Pytester, leftovers: Callable[[], list[str]], mark: str
) -> None:
    """Whatever runs the test's loop, test 2 finds the table test 1 wrote to empty."""
    result = run(project, WRITE_THEN_EMPTY.format(mark=mark))
    result.assert_outcomes(passed=2)
    assert leftovers() == []


def test_the_schema_is_built_once_and_fresh_databases_are_copies(
    project: pytest.Pytester, server: Server, leftovers: Callable[[], list[str]]
) -> None:
    project.makeconftest(
        APP.format(app_name=server.app_name).replace(
            "    return SCHEMA\n",
            """    def build(url):
        import pathlib, psycopg
        with pathlib.Path("schema_runs.txt").open("a") as f:  # a URL, as migrations take
            f.write(url.partition("://")[0] + "\\n")
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(SCHEMA)
    return build
""",
        )
    )
    result = run(
        project,
        """
        import psycopg, pytest

        @pytest.fixture
        def dbpool_isolation():
            return "database"  # a fresh copy of the template per test, real commits

        @pytest.mark.asyncio
        @pytest.mark.parametrize("n", range(3))
        async def test_commits_for_real(dbpool_client, dbpool_app, n):
            assert (await dbpool_client.get("/items")).json() == []
            assert (await dbpool_client.post("/items", params={"name": "a"})).status_code == 200
            url = dbpool_app._binding.conninfo
            async with await psycopg.AsyncConnection.connect(url) as other:
                cur = await other.execute("SELECT name FROM items")
                assert await cur.fetchall() == [("a",)]  # committed: seen by another session

        def test_session_database_has_the_schema(dbpool_url):
            assert dbpool_url.startswith("postgresql://")
            with psycopg.connect(dbpool_url) as conn:
                assert conn.execute("SELECT count(*) FROM items").fetchone() == (0,)
        """,
    )
    result.assert_outcomes(passed=4)
    # once, given a URL (it was a libpq key=value string, which Alembic cannot take)
    assert (project.path / "schema_runs.txt").read_text() == "postgresql\n"
    assert leftovers() == []


def test_a_failed_or_cancelled_request_does_not_poison_the_test(
    project: pytest.Pytester, leftovers: Callable[[], list[str]]
) -> None:
    result = run(
        project,
        """
        import psycopg, pytest

        pytestmark = pytest.mark.asyncio

        async def test_it(dbpool_client):
            assert (await dbpool_client.post("/items", params={"name": "a"})).status_code == 200
            with pytest.raises(psycopg.errors.UniqueViolation):
                await dbpool_client.post("/items", params={"name": "a"})
            cut = await dbpool_client.get("/sleep", headers={"X-Timeout": "0.3"})
            assert cut.status_code == 504
            assert (await dbpool_client.post("/log", params={"line": "b"})).status_code == 200
            assert (await dbpool_client.get("/items")).json() == ["a", "b"]
        """,
    )
    result.assert_outcomes(passed=1)
    assert leftovers() == []


def test_using_the_app_on_another_loop_fails_fast_with_a_hint(
    project: pytest.Pytester, leftovers: Callable[[], list[str]]
) -> None:
    result = run(
        project,
        """
        import pytest, pytest_asyncio

        @pytest_asyncio.fixture(loop_scope="module")
        async def seeded(dbpool_client):
            assert (await dbpool_client.post("/items", params={"name": "s"})).status_code == 200
            return dbpool_client

        @pytest.mark.asyncio(loop_scope="module")
        async def test_same_loop(seeded):
            assert (await seeded.get("/items")).json() == ["s"]

        @pytest.mark.asyncio(loop_scope="function")
        async def test_other_loop(seeded):
            await seeded.get("/items")
        """,
    )
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*WrongEventLoopError*test_other_loop (setup)*loop_scope=*"])
    assert "Timeout" not in result.stdout.str()
    assert result.duration < 30
    assert leftovers() == []


def test_after_a_wrong_loop_failure_the_apps_pool_still_closes_completely(
    project: pytest.Pytester, leftovers: Callable[[], list[str]]
) -> None:
    """A module-loop test using a fixture seeded on a function loop fails with the hint;
    then the app's shutdown was cancelled along with that loop's tasks, its idle backends
    stayed into later tests, and the session ended blaming the user with a LeakWarning."""
    project.makepyfile(
        test_sample=textwrap.dedent(
            """
            import pytest, pytest_asyncio

            @pytest_asyncio.fixture(loop_scope="function")
            async def seeded(dbpool_client):
                assert (await dbpool_client.post("/items", params={"name": "s"})).status_code == 200
                return dbpool_client

            @pytest.mark.asyncio(loop_scope="module")
            async def test_other_loop(seeded):
                await seeded.get("/items")

            @pytest.mark.asyncio(loop_scope="function")
            async def test_later(dbpool_client):
                assert (await dbpool_client.get("/items")).json() == []
            """
        )
    )
    result = project.runpytest_subprocess(timeout=120)
    result.assert_outcomes(passed=1, failed=1)
    out = result.stdout.str()
    result.stdout.fnmatch_lines(["*WrongEventLoopError*loop_scope=*"])
    assert "LeakWarning" not in out
    assert "shutdown failed" not in out
    assert leftovers() == []


def test_a_commit_by_the_code_under_test_fails_the_test(
    project: pytest.Pytester, leftovers: Callable[[], list[str]]
) -> None:
    result = run(
        project,
        """
        import pytest

        pytestmark = pytest.mark.asyncio

        async def test_commits(dbpool_client):
            assert (await dbpool_client.post("/commit")).status_code == 200

        async def test_still_isolated_afterwards(dbpool_client):
            assert (await dbpool_client.get("/items")).json() == ["escaped"]
        """,
    )
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*IsolationError: Rollback isolation was broken*"])
    assert leftovers() == []


def test_without_an_app_fixture_the_error_says_what_to_define(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.asyncio
        async def test_it(dbpool_client):
            pass
        """
    )
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*need an `app` fixture that returns your FastAPI app*"])


@pytest.mark.anyio
async def test_from_env_without_a_url_opens_only_where_a_test_binds_it(
    database_url: str, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    with pytest.raises(ConfigurationError, match="DATABASE_URL is not set"):
        DBPool.from_env({})  # an explicit environment is taken as it is
    db = DBPool.from_env(name=server.app_name, min_size=1)  # importable under the plugin
    with pytest.raises(ConfigurationError, match="dbpool_app or dbpool_client"):
        async with db.lifespan(FastAPI()):
            pass
    app = FastAPI(lifespan=db.lifespan)
    async with AppHarness(app, database_url) as harness:
        assert server.states() == ["idle in transaction"]  # the pinned connection
        async with harness.client() as client:
            assert (await client.get("/nothing")).status_code == 404
    assert server.wait_until(lambda states: not states) == []


def test_a_test_of_a_500_gets_the_response_from_a_client_that_does_not_raise(
    project: pytest.Pytester,
) -> None:
    """dbpool_client could not be told raise_app_exceptions=False: a test of a 500 got the
    app's exception instead of the response."""
    result = run(
        project,
        """
        import pytest

        @pytest.mark.asyncio
        async def test_the_500(dbpool_app, dbpool_client):
            async with dbpool_app.client(raise_app_exceptions=False) as client:
                assert (await client.get("/boom")).status_code == 500
                assert (await client.get("/items")).status_code == 200  # and it goes on
            with pytest.raises(RuntimeError, match="boom"):  # the default: raised
                await dbpool_client.get("/boom")
        """,
    )
    result.assert_outcomes(passed=1)


def test_a_modules_seed_is_shared_by_its_tests_and_seen_by_no_other_module(
    project: pytest.Pytester, leftovers: Callable[[], list[str]]
) -> None:
    """Seeding once per module under rollback isolation failed with ScopeMismatch (a
    module-scoped fixture cannot use the function-scoped dbpool_client)."""
    project.makepyfile(
        test_seeded=textwrap.dedent(
            """
            import pathlib, psycopg, pytest

            pytestmark = pytest.mark.asyncio

            @pytest.fixture(scope="module")
            def dbpool_seed():
                def seed(url):
                    with pathlib.Path("seed_runs.txt").open("a") as f:
                        f.write("seeded\\n")
                    with psycopg.connect(url) as conn:
                        conn.execute("INSERT INTO items (name) VALUES ('seeded')")
                return seed

            async def test_1_writes(dbpool_client):
                assert (await dbpool_client.get("/items")).json() == ["seeded"]
                assert (await dbpool_client.post("/items", params={"name": "a"})).status_code == 200
                assert (await dbpool_client.get("/items")).json() == ["seeded", "a"]

            async def test_2_sees_the_seed_only(dbpool_client):
                assert (await dbpool_client.get("/items")).json() == ["seeded"]

            class TestCommitting:
                @pytest.fixture
                def dbpool_isolation(self):
                    return "database"

                async def test_3_a_fresh_database_has_the_seed_too(self, dbpool_client):
                    assert (await dbpool_client.get("/items")).json() == ["seeded"]
            """
        ),
        test_unseeded=textwrap.dedent(
            """
            import pytest

            @pytest.mark.asyncio
            async def test_the_session_database_has_no_seed(dbpool_client):
                assert (await dbpool_client.get("/items")).json() == []
            """
        ),
    )
    result = project.runpytest()
    result.assert_outcomes(passed=4)
    # once for the module's database, once for the fresh one of test 3
    assert (project.path / "seed_runs.txt").read_text() == "seeded\n" * 2
    assert leftovers() == []
