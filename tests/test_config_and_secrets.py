"""Settings errors name the problem and the fix; no password ever shows."""

import logging
from typing import Any

import pytest
from fastapi import FastAPI
from psycopg.conninfo import make_conninfo

import fastapi_dbpool
from fastapi_dbpool import (
    ConfigurationError,
    DBPool,
    DBPoolError,
    PoolExhaustedError,
    PoolOpenError,
    errors,
)

SECRET = "hunter2-Sup3rSecret"


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({}, "DATABASE_URL is not set"),
        ({"DATABASE_URL": "  "}, "DATABASE_URL is not set"),
        ({"DATABASE_URL": f"postgresql://u:{SECRET}@h/db?bogus=1"}, "DATABASE_URL is malformed"),
        ({"DATABASE_URL": "postgresql://h/db", "DBPOOL_MAX_SIZE": "ten"}, "DBPOOL_MAX_SIZE"),
        ({"DATABASE_URL": "postgresql://h/db", "DBPOOL_MAXSIZE": "10"}, "DBPOOL_MAX_SIZE?"),
    ],
)
def test_from_env_names_the_variable(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        DBPool.from_env(environ)
    assert message in str(info.value)
    assert SECRET not in str(info.value)


def test_from_env_reads_settings() -> None:
    db = DBPool.from_env(
        {
            "DATABASE_URL": f"postgresql://u:{SECRET}@db.internal:5433/app",
            "DBPOOL_MIN_SIZE": "2",
            "DBPOOL_MAX_SIZE": "7",
            "DBPOOL_ACQUIRE_TIMEOUT": "1.5",
            "DBPOOL_NAME": "orders",
        }
    )
    assert db.name == "orders"
    assert db._pool_kwargs["max_size"] == 7
    assert db._settings.acquire_timeout == 1.5
    assert "db.internal" in repr(db)
    assert "5433" in repr(db)
    assert SECRET not in repr(db)
    assert SECRET not in str(db)


def test_every_setting_has_a_variable_and_the_settings_page_gives_its_default() -> None:
    """retry_after, release_timeout and watchdog had no variable, and min_size's default
    (psycopg_pool's 4) was found only in an error message."""
    import inspect
    import re
    from pathlib import Path

    from psycopg_pool import AsyncConnectionPool

    from fastapi_dbpool._config import MAX_IDLE
    from fastapi_dbpool._env import VARIABLES

    page = (Path(__file__).parent.parent / "docs" / "settings.md").read_text()
    found = re.findall(r"^\| `(\w+)` \| ([^|]+) \| `(DBPOOL_\w+)`", page, re.M)
    rows = {name: default for name, default, _ in found}
    documented = {var: name for name, _, var in found}
    assert documented == {var: keyword for var, (keyword, _) in VARIABLES.items()}
    ours = {n: p.default for n, p in inspect.signature(DBPool.__init__).parameters.items()}
    theirs = {
        n: p.default for n, p in inspect.signature(AsyncConnectionPool.__init__).parameters.items()
    }
    shown = {
        "min_size": f"{theirs['min_size']} ",
        "max_lifetime": f"{theirs['max_lifetime']:.0f} s",
    }
    shown["max_idle"] = f"{MAX_IDLE:.0f} s"
    for name in ("acquire_timeout", "open_timeout", "close_timeout", "release_timeout", "watchdog"):
        shown[name] = f"{ours[name]:g} s"
    shown["retry_after"] = f"{ours['retry_after']} s"
    for name in ("allow_concurrent_tasks", "transaction_pooler", "writable"):
        shown[name] = f"`{ours[name]}`"
    for name, default in shown.items():
        assert rows[name].startswith(default), (name, rows[name], default)


def test_the_new_variables_are_read() -> None:
    db = DBPool.from_env(
        {
            "DATABASE_URL": "postgresql://db.internal/app",
            "DBPOOL_RETRY_AFTER": "4",
            "DBPOOL_RELEASE_TIMEOUT": "2.5",
            "DBPOOL_WATCHDOG": "off",
            "DBPOOL_ALLOW_CONCURRENT_TASKS": "yes",
        }
    )
    assert db._settings.retry_after == 4
    assert db._settings.release_timeout == 2.5
    assert db._settings.watchdog is None
    assert db._settings.allow_concurrent_tasks is True
    env = {"DATABASE_URL": "postgresql://db.internal/app", "DBPOOL_WATCHDOG": "0.25"}
    assert DBPool.from_env(env)._settings.watchdog == 0.25
    with pytest.raises(ConfigurationError, match=r"DBPOOL_WATCHDOG='soon' .*\(seconds, or off\)"):
        DBPool.from_env({"DATABASE_URL": "postgresql://db.internal/app", "DBPOOL_WATCHDOG": "soon"})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"open": True}, "lifespan opens the pool"),
        ({"timeout": 3}, "acquire_timeout"),
        ({"min_size": 5, "max_size": 2}, "Invalid pool setting"),
        ({"max_sise": 2}, "Invalid pool setting"),
        ({"acquire_timeout": 0}, "acquire_timeout must be a positive number"),
        ({"kwargs": {"autocommit": False}}, "autocommit"),
    ],
)
def test_bad_settings_are_refused_before_connecting(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        DBPool("postgresql://localhost/app", **kwargs)


def test_a_malformed_conninfo_does_not_echo_the_password() -> None:
    with pytest.raises(ConfigurationError) as info:
        DBPool(f"host=h password={SECRET} nonsense")
    assert SECRET not in str(info.value)


@pytest.mark.anyio
async def test_no_password_in_errors_reprs_or_logs(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    shown: list[str] = []

    failing = DBPool(f"postgresql://app:{SECRET}@127.0.0.1:1/appdb", open_timeout=2)
    with pytest.raises(PoolOpenError) as info:
        async with failing.lifespan(FastAPI()):
            pytest.fail("must not start")
    shown += [repr(failing), str(info.value), repr(info.value)]

    # a working pool whose conninfo carries a password (the test server trusts, ignores it)
    conninfo = make_conninfo(database_url, password=SECRET)
    db = DBPool(conninfo, min_size=1, max_size=1, acquire_timeout=0.2)
    async with db.lifespan(FastAPI()):
        shown.append(repr(db))
        async with db.connection() as conn:
            shown.append(repr(conn))
            with pytest.raises(PoolExhaustedError) as exhausted:
                async with db.connection():
                    pass
            shown += [str(exhausted.value), repr(exhausted.value)]
            await conn.close()  # handed back broken: the pool logs and replaces it

    shown += [r.getMessage() for r in caplog.records]
    assert any("exhausted" in r.getMessage() for r in caplog.records)
    assert any("closed" in r.getMessage() for r in caplog.records)
    assert not [line for line in shown if SECRET in line]


def test_scrub_masks_passwords_in_free_text() -> None:
    from fastapi_dbpool._dsn import scrub

    text = (
        f"postgresql://u:{SECRET}@h/db password={SECRET} "
        f"password='{SECRET} x' postgresql://h/db?password={SECRET}&a=1"
    )
    assert SECRET not in scrub(text)


def test_public_api() -> None:
    assert fastapi_dbpool.__all__ == sorted(fastapi_dbpool.__all__)
    for name in fastapi_dbpool.__all__:
        obj = getattr(fastapi_dbpool, name)
        if isinstance(obj, type):
            assert obj.__module__ == "fastapi_dbpool", name
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), DBPoolError)
        assert getattr(errors, name).__doc__


def test_every_warning_carries_a_hint() -> None:
    """Warnings are for what an operator can act on: each says how (house rule 12)."""
    import ast
    from pathlib import Path

    package = Path(fastapi_dbpool.__file__).parent
    calls = 0
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "warning"
            ):
                calls += 1
                text = ast.unparse(node)
                assert "hint:" in text or "HINT_" in text, f"{path.name}: {text}"
    assert calls >= 10


def test_the_installed_version_is_the_changelogs_newest() -> None:
    """`pip show` said 0.1.0 while the changelog's 0.1.0 listed half of what the install
    held, the rest under "Unreleased"."""
    import importlib.metadata
    import re
    from pathlib import Path

    installed = importlib.metadata.version("fastapi_dbpool")
    page = (Path(__file__).parent.parent / "docs" / "changelog.md").read_text()
    newest = re.findall(r"^## (\d+\.\d+\.\d+)", page, re.M)[0]
    assert re.match(r"\d+\.\d+\.\d+", installed)[0] == newest, (installed, newest)  # type: ignore[index]
