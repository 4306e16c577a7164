"""The quickstart and the replicas example, served the way a user runs them: the block
from the page written to main.py as it is (only the connection URLs pointed at servers
the tests made), `uvicorn main:app` in a process of its own, real HTTP requests."""

import contextlib
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
from psycopg.conninfo import make_conninfo

from benchmarks._runner import free_port

from ._replication import cluster

ROOT = Path(__file__).resolve().parent.parent


def first_block(page: str) -> str:
    blocks: list[str] = re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(), re.S)
    return blocks[0]


def pointed(block: str, urls: dict[str, str]) -> str:
    for documented, real in urls.items():
        assert f'"{documented}"' in block, documented  # the page still shows this URL
        block = block.replace(f'"{documented}"', repr(real))
    return block


@contextlib.contextmanager
def uvicorn(app_dir: Path, code: str) -> Iterator[str]:
    """`uvicorn main:app` on 127.0.0.1, its base URL once it answers; stopped by its PID."""
    (app_dir / "main.py").write_text(code)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "main:app", "--host", "127.0.0.1", "--port", str(port)],
        cwd=app_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(base + "/docs", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                assert time.monotonic() < deadline, "uvicorn did not answer in 30s"
                time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert "Traceback" not in out, out


def test_the_quickstart_serves_and_commits(
    database_url: str, tmp_path: Path, app_name: str
) -> None:
    with psycopg.connect(database_url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {app_name}")
    try:
        url = make_conninfo(database_url, dbname=app_name)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE items (id serial PRIMARY KEY, name text)")
        code = pointed(first_block("README.md"), {"postgresql://app@localhost/app": url})
        with uvicorn(tmp_path, code) as base:
            assert httpx.post(base + "/items", params={"name": "first"}).status_code == 200
            assert httpx.get(base + "/items/1").json() == [1, "first"]
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT name FROM items").fetchall() == [("first",)]
    finally:
        with psycopg.connect(database_url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {app_name} WITH (FORCE)")


def test_the_replicas_example_serves_its_write_and_its_read(
    tmp_path: Path,
) -> None:
    with cluster(replicas=2) as servers:
        servers.primary.execute("CREATE TABLE notes (id serial PRIMARY KEY, body text)")
        code = pointed(
            first_block("docs/replicas.md"),
            {
                "postgresql://app@db-primary/app": servers.primary.url,
                "postgresql://app@db-replica-1/app": servers.replicas[0].url,
                "postgresql://app@db-replica-2/app": servers.replicas[1].url,
            },
        )
        with uvicorn(tmp_path, code) as base:
            assert httpx.post(base + "/notes", params={"body": "hello"}).status_code == 200
            for node in servers.replicas:
                servers.wait_replayed(node)
            assert httpx.get(base + "/notes").json() == ["hello"]
            assert httpx.get(base + "/readyz").json()["status"] == "ready"
        # the write reached the primary, and both standbys replayed it
        for node in [servers.primary, *servers.replicas]:
            assert node.execute("SELECT body FROM notes") == [("hello",)]
