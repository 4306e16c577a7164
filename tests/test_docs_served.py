"""The quickstart, the replicas, migration and observability examples, and the deadline
and operations fragments added to the quickstart, served the way a user runs them: the
block from the page written to main.py as it is (only the connection URLs pointed at
servers the tests made), `uvicorn main:app` in a process of its own, real HTTP requests."""

import contextlib
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg.conninfo import make_conninfo

from benchmarks._runner import free_port

from ._replication import cluster

ROOT = Path(__file__).resolve().parent.parent


def block(page: str, n: int = 0) -> str:
    blocks: list[str] = re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(), re.S)
    return blocks[n]


def pointed(block: str, urls: dict[str, str]) -> str:
    for documented, real in urls.items():
        assert f'"{documented}"' in block, documented  # the page still shows this URL
        block = block.replace(f'"{documented}"', repr(real))
    return block


class Served:
    """A `uvicorn main:app` process: its base URL, and what it printed once stopped."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.output = ""
        self.url = ""  # the database it serves, when `serving` made one


@contextlib.contextmanager
def uvicorn(app_dir: Path, code: str) -> Iterator[Served]:
    """`uvicorn main:app` on 127.0.0.1, once it answers; stopped by its PID (SIGTERM, so
    that the app shuts down as in production)."""
    (app_dir / "main.py").write_text(code)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "main:app", "--host", "127.0.0.1", "--port", str(port)],
        cwd=app_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    served = Served(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(served.base + "/docs", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                assert time.monotonic() < deadline, "uvicorn did not answer in 30s"
                time.sleep(0.2)
        yield served
    finally:
        proc.terminate()
        served.output, _ = proc.communicate(timeout=20)
    assert "Traceback" not in served.output, served.output


def json_objects(output: str) -> list[dict[str, Any]]:
    """Every JSON object printed from the start of a line (log records, exporters' dumps)."""
    decoder, found = json.JSONDecoder(), []
    for match in re.finditer(r"^\{", output, re.M):
        with contextlib.suppress(ValueError):
            found.append(decoder.raw_decode(output, match.start())[0])
    return found


@contextlib.contextmanager
def database(database_url: str, name: str) -> Iterator[str]:
    """A database of its own on the test server, dropped afterwards."""
    with psycopg.connect(database_url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        yield make_conninfo(database_url, dbname=name)
    finally:
        with psycopg.connect(database_url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@contextlib.contextmanager
def serving(
    database_url: str,
    name: str,
    tmp_path: Path,
    page: str,
    n: int = 0,
    sql: tuple[str, ...] = (),
    added: str = "",
) -> Iterator[Served]:
    """Block `n` of `page` (with the code `added` after it, as a reader adds a fragment),
    on a database of its own made ready by `sql`, under uvicorn."""
    with database(database_url, name) as url:
        with psycopg.connect(url, autocommit=True) as conn:
            for statement in sql:
                conn.execute(statement)
        code = pointed(block(page, n), {"postgresql://app@localhost/app": url}) + added
        with uvicorn(tmp_path, code) as served:
            served.url = url
            yield served


ITEMS = "CREATE TABLE items (id serial PRIMARY KEY, name text)"


def test_the_quickstart_serves_and_commits(
    database_url: str, tmp_path: Path, app_name: str
) -> None:
    with serving(database_url, app_name, tmp_path, "README.md", sql=(ITEMS,)) as served:
        assert httpx.post(served.base + "/items", params={"name": "first"}).status_code == 201
        assert httpx.get(served.base + "/items/1").json() == [1, "first"]
        assert httpx.get(served.base + "/items").json() == [[1, "first"]]
        with psycopg.connect(served.url) as conn:
            assert conn.execute("SELECT name FROM items").fetchall() == [("first",)]


def test_the_replicas_example_serves_its_write_and_its_read(
    tmp_path: Path,
) -> None:
    with cluster(replicas=2) as servers:
        servers.primary.execute("CREATE TABLE notes (id serial PRIMARY KEY, body text)")
        code = pointed(
            block("docs/replicas.md"),
            {
                "postgresql://app@db-primary/app": servers.primary.url,
                "postgresql://app@db-replica-1/app": servers.replicas[0].url,
                "postgresql://app@db-replica-2/app": servers.replicas[1].url,
            },
        )
        with uvicorn(tmp_path, code) as served:
            base = served.base
            assert httpx.post(base + "/notes", params={"body": "hello"}).status_code == 200
            for node in servers.replicas:
                servers.wait_replayed(node)
            assert httpx.get(base + "/notes").json() == ["hello"]
            assert httpx.get(base + "/readyz").json()["status"] == "ready"
        # the write reached the primary, and both standbys replayed it
        for node in [servers.primary, *servers.replicas]:
            assert node.execute("SELECT body FROM notes") == [("hello",)]


def test_the_prometheus_setup_serves_metrics_by_route_and_json_logs(
    database_url: str, tmp_path: Path, app_name: str
) -> None:
    with serving(database_url, app_name, tmp_path, "docs/observability.md", 0) as served:
        for n in (3, 4):
            assert httpx.get(f"{served.base}/items/{n}").json() == n
        assert httpx.get(served.base + "/readyz").status_code == 200
        text = httpx.get(served.base + "/metrics").text
    labels = 'pool="fastapi_dbpool",route="/items/{item_id}"'
    assert f"fastapi_dbpool_connection_use_seconds_count{{{labels}}} 2.0" in text
    assert f"fastapi_dbpool_acquire_wait_seconds_count{{{labels}}} 2.0" in text
    assert 'fastapi_dbpool_connection_create_seconds_count{pool="fastapi_dbpool"}' in text
    events = {r["dbpool_event"]: r for r in json_objects(served.output) if "dbpool_event" in r}
    assert {"pool_open", "pool_closed"} <= set(events), served.output
    assert events["pool_open"]["dbpool_pool"] == "fastapi_dbpool"
    assert events["pool_open"]["dbpool_stats"]["pool_max"] == 10


def test_the_opentelemetry_setup_exports_pool_metrics_and_request_parented_spans(
    database_url: str, tmp_path: Path, app_name: str
) -> None:
    with serving(database_url, app_name, tmp_path, "docs/observability.md", 1) as served:
        for n in (5, 6):
            assert httpx.get(f"{served.base}/items/{n}").json() == n
    printed = json_objects(served.output)  # the console exporters', flushed at shutdown
    spans = [o for o in printed if "context" in o and "kind" in o]
    by_id = {s["context"]["span_id"]: s for s in spans}
    statements = [
        s
        for s in spans
        if s["attributes"].get("db.system.name", s["attributes"].get("db.system")) == "postgresql"
    ]
    assert len(statements) == 2, served.output
    for statement in statements:
        assert "statement_timeout" not in json.dumps(statement)
        ancestors, span = [], statement
        while span.get("parent_id") in by_id:
            span = by_id[span["parent_id"]]
            ancestors.append(span)
        assert any(a["kind"] == "SpanKind.SERVER" for a in ancestors), statement
        assert {a["context"]["trace_id"] for a in ancestors} == {statement["context"]["trace_id"]}
    points = {
        m["name"]: m["data"]["data_points"]
        for o in printed
        for rm in o.get("resource_metrics", [])
        for sm in rm["scope_metrics"]
        for m in sm["metrics"]
    }
    (use,) = [
        p
        for p in points["db.client.connection.use_time"]
        if p["attributes"].get("http.route") == "/items/{item_id}"
    ]
    assert use["count"] == 2
    assert points["db.client.connection.max"][0]["value"] == 10
    assert points["db.client.connection.timeouts"][0]["value"] == 0


def test_the_migration_example_serves_rows(
    database_url: str, tmp_path: Path, app_name: str
) -> None:
    tables = (ITEMS, "INSERT INTO items (name) VALUES ('a'), ('b')")
    with serving(database_url, app_name, tmp_path, "docs/migration.md", sql=tables) as served:
        assert httpx.get(served.base + "/items").json() == [[1, "a"], [2, "b"]]


def test_the_deadline_and_operations_fragments_serve_added_to_the_quickstart(
    database_url: str, tmp_path: Path, app_name: str
) -> None:
    """The pages show what to add to the quickstart's main.py: added, as a reader would."""
    tables = (ITEMS, "INSERT INTO items (name) VALUES ('a')")
    fragments = block("docs/deadlines.md") + block("docs/operations.md")
    with serving(
        database_url, app_name, tmp_path, "README.md", sql=tables, added=fragments
    ) as served:
        base = served.base
        assert httpx.get(base + "/items/1").json() == [1, "a"]
        # deadlines.md: the middleware reads the header; a budget spent before the
        # checkout answers 504; /report runs under its own deadline
        spent = httpx.get(base + "/items/1", headers={"X-Request-Timeout": "0.000001"})
        assert spent.status_code == 504
        assert httpx.get(base + "/report").status_code == 200
        # operations.md: health and metrics
        assert httpx.get(base + "/livez").status_code == 200
        assert httpx.get(base + "/readyz").json()["status"] == "ready"
        metrics = httpx.get(base + "/metrics").text
    assert 'fastapi_dbpool_pool_max_connections{pool="fastapi_dbpool"} 10.0' in metrics
