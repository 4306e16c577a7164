"""The docs' "Testing your app" page (docs/testing.md), run the way a user runs it.

Its code blocks, read from the page itself, become a project's conftest.py and test
module beside a small app whose module-level ``DBPool.from_env()`` runs at import, with
``DATABASE_URL`` unset; pytest runs in a subprocess, so the plugin loads as it does for a
user (an in-process run inside this configured session hid that the conftest failed at
import with ConfigurationError).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

PAGE = Path(__file__).parent.parent / "docs" / "testing.md"

MAIN = """
from fastapi import FastAPI
from pydantic import BaseModel

from fastapi_dbpool import ConnectionDep, DBPool, TransactionDep

db = DBPool.from_env(min_size=1, max_size=4)
app = FastAPI(lifespan=db.lifespan)


class Item(BaseModel):
    name: str


@app.post("/items", status_code=201)
async def create(item: Item, tx: TransactionDep):
    await tx.execute("INSERT INTO items (name) VALUES (%s)", (item.name,))


@app.get("/items")
async def items(conn: ConnectionDep):
    cur = await conn.execute("SELECT name FROM items ORDER BY id")
    return [r[0] for r in await cur.fetchall()]
"""


def page_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.DOTALL)


def test_the_readme_testing_setup_passes_as_written(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    conftest, tests = page_blocks()
    assert "from myproject.main import app as my_app" in conftest
    monkeypatch.delenv("DATABASE_URL", raising=False)
    pytester.mkpydir("myproject")
    pytester.path.joinpath("myproject", "main.py").write_text(MAIN)
    pytester.path.joinpath("schema.sql").write_text(
        "CREATE TABLE items (id serial PRIMARY KEY, name text NOT NULL);\n"
    )
    pytester.makeconftest(conftest)
    pytester.makepyfile(test_items=tests)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=300)
    result.assert_outcomes(passed=2)


def test_the_plugin_changes_from_env_only_where_it_is_loaded(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the docs say: installed, it loads in every run; `-p no:fastapi_dbpool` turns it off."""
    monkeypatch.delenv("DATABASE_URL", raising=False)
    pytester.makepyfile(
        test_env="""
import pytest
from fastapi_dbpool import ConfigurationError, DBPool

def test_from_env(pytestconfig):
    loaded = pytestconfig.pluginmanager.has_plugin("fastapi_dbpool")
    print("plugin loaded:", loaded)
    if loaded:
        assert "stopped" in repr(DBPool.from_env())
    else:
        with pytest.raises(ConfigurationError, match="DATABASE_URL is not set"):
            DBPool.from_env()
"""
    )
    loaded = pytester.runpytest_subprocess("-s", "-p", "no:cacheprovider", timeout=120)
    loaded.assert_outcomes(passed=1)
    loaded.stdout.fnmatch_lines(["*plugin loaded: True*"])
    off = pytester.runpytest_subprocess(
        "-s", "-p", "no:cacheprovider", "-p", "no:fastapi_dbpool", timeout=120
    )
    off.assert_outcomes(passed=1)
    off.stdout.fnmatch_lines(["*plugin loaded: False*"])
