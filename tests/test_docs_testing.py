"""The docs' "Testing your app" page (docs/testing.md), run the way a user runs it.

Its code blocks, read from the page itself, become a project's conftest.py, test module
and pytest settings beside the quickstart's app (docs/index.md, as the page says, with the
``DBPool.from_env()`` its comment offers, run at import with ``DATABASE_URL`` unset).
pytest runs in a subprocess, so the plugin loads as it does for a user (an in-process run
inside this configured session hid that the conftest failed at import with
ConfigurationError).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

PAGE = Path(__file__).parent.parent / "docs" / "testing.md"

QUICKSTART = Path(__file__).parent.parent / "docs" / "index.md"
#: the quickstart's DBPool line, and the from_env() its comment offers
LITERAL = (
    'DBPool("postgresql://app@localhost/app", min_size=2, max_size=10)  # or DBPool.from_env()'
)


def quickstart_main() -> str:
    """The quickstart's main.py, as the testing page continues it: with from_env()."""
    (first, *_) = re.findall(r"```python\n(.*?)```", QUICKSTART.read_text(), flags=re.DOTALL)
    assert LITERAL in first
    return str(first).replace(LITERAL, "DBPool.from_env(min_size=2, max_size=10)")


def page_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.DOTALL)


def test_the_readme_testing_setup_passes_as_written(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    conftest, tests, seeded = page_blocks()
    assert "from myproject.main import app as my_app" in conftest
    monkeypatch.delenv("DATABASE_URL", raising=False)
    pytester.mkpydir("myproject")
    pytester.path.joinpath("myproject", "main.py").write_text(quickstart_main())
    (toml,) = re.findall(r"```toml\n(.*?)```", PAGE.read_text(), flags=re.DOTALL)
    pytester.path.joinpath("pyproject.toml").write_text(toml)
    pytester.path.joinpath("schema.sql").write_text(
        "CREATE TABLE items (id serial PRIMARY KEY, name text NOT NULL);\n"
    )
    pytester.makeconftest(conftest)
    pytester.makepyfile(test_items=tests, test_seeded=seeded)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "error", timeout=300)
    result.assert_outcomes(passed=4)  # with no warning: the page's ini silences pytest-asyncio's


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


def test_the_testing_extra_brings_the_async_plugin_its_examples_use() -> None:
    """`pip install fastapi_dbpool[testing]` installed no async test plugin while the page's
    examples use pytest.mark.asyncio: 11 of 11 tests failed ("async def functions are not
    natively supported")."""
    pyproject = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    (testing,) = re.findall(r"^testing = \[(.*)\]$", pyproject, re.M)  # tomllib: 3.11+
    assert "pytest.mark.asyncio" in PAGE.read_text()
    assert '"pytest-asyncio>=' in testing
