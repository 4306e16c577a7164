"""SQLModel's FastAPI tutorial app, switched to the package as the docs say
(tests/sqlmodel_tutorial/): served by uvicorn in a subprocess, and its own tests run under
the plugin in a subprocess, as its users would run them."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

pytest.importorskip("sqlalchemy", reason="fastapi_dbpool[sqlalchemy] is not installed")
pytest.importorskip("sqlmodel", reason="sqlmodel is not installed")

from benchmarks._runner import served

from .conftest import Server, plugin_ini

pytest_plugins = ["pytester"]

TUTORIAL = Path(__file__).resolve().parent / "sqlmodel_tutorial"


def test_the_tutorial_app_serves_its_heroes_under_uvicorn(
    database_url: str, server: Server, app_name: str, tmp_path: Path
) -> None:
    server.query("DROP TABLE IF EXISTS hero")
    log = tmp_path / "uvicorn.log"
    try:
        with (
            log.open("wb") as out,
            served(
                "heroes:app",
                database_url,
                env={"DBPOOL_NAME": app_name},
                probe="/heroes/",
                log=out,
                cwd=TUTORIAL,
                is_factory=False,
            ) as (port, _),
        ):
            base = f"http://127.0.0.1:{port}"
            first = httpx.get(f"{base}/heroes/", timeout=5)
            assert (first.status_code, first.json()) == (200, [])  # its table made at startup
            hero = {"name": "Deadpond", "secret_name": "Dive Wilson"}
            created = httpx.post(f"{base}/heroes/", json=hero, timeout=5).json()
            rows = server.query("SELECT name, secret_name FROM hero")
            assert rows == [("Deadpond", "Dive Wilson")]
            patched = httpx.patch(f"{base}/heroes/{created['id']}", json={"age": 30}, timeout=5)
            assert patched.json() == {"name": "Deadpond", "age": 30, "id": created["id"]}
            assert httpx.get(f"{base}/heroes/{created['id'] + 1}", timeout=5).status_code == 404
            assert httpx.delete(f"{base}/heroes/{created['id']}", timeout=5).json() == {"ok": True}
            assert server.query("SELECT count(*) FROM hero") == [(0,)]
            assert set(server.states()) <= {"idle"}  # nothing left in a transaction
    finally:
        server.query("DROP TABLE IF EXISTS hero")
    out_text = log.read_text()
    assert "Traceback" not in out_text, out_text
    assert server.wait_until(lambda s: s == []) == []  # shutdown closed every connection


def test_the_tutorial_tests_pass_under_the_plugin(
    pytester: pytest.Pytester, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    shutil.copy(TUTORIAL / "heroes.py", pytester.path / "heroes.py")
    shutil.copy(TUTORIAL / "conftest_of_the_app.py", pytester.path / "conftest.py")
    shutil.copy(TUTORIAL / "tests_of_the_app.py", pytester.path / "test_main.py")
    plugin_ini(pytester, database_url)
    result = pytester.runpytest_subprocess(timeout=180)
    result.assert_outcomes(passed=5)
