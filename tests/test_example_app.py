"""The example app, in process and as `python -m example_app` under uvicorn."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
from fastapi.testclient import TestClient

from benchmarks._runner import free_port
from example_app.app import create_app

from .conftest import Server, make_db

ROOT = Path(__file__).resolve().parent.parent


def test_items_and_an_all_or_nothing_move(database_url: str, app_name: str) -> None:
    app = create_app(make_db(database_url, app_name))
    with TestClient(app, raise_server_exceptions=False) as client:
        a = client.post("/items", json={"name": "a", "quantity": 5}).json()
        b = client.post("/items", json={"name": "b"}).json()
        assert client.get(f"/items/{a['id']}").json() == a
        assert client.get("/items/0").status_code == 404
        assert client.post("/items", json={"name": ""}).status_code == 500  # CHECK, rolled back
        moved = client.post(f"/items/{a['id']}/move/{b['id']}?quantity=3").json()
        assert [i["quantity"] for i in moved] == [2, 3]
        # not enough left: the first UPDATE is rolled back with the second
        assert client.post(f"/items/{a['id']}/move/{b['id']}?quantity=3").status_code == 409
        quantities = [client.get(f"/items/{i['id']}").json()["quantity"] for i in (a, b)]
        assert quantities == [2, 3]
        page = client.get(f"/items?after={a['id']}&limit=1").json()
        assert page == [{"id": b["id"], "name": "b", "quantity": 3}]


def test_export_report_health_and_metrics(database_url: str, app_name: str) -> None:
    app = create_app(make_db(database_url, app_name))
    with TestClient(app) as client:
        for n in range(3):
            client.post("/items", json={"name": f"export {n}", "quantity": n})
        lines = [json.loads(line) for line in client.get("/export").text.splitlines()]
        assert lines[-1] == {"end": len(lines) - 1}
        assert {"name": "export 2", "quantity": 2}.items() <= lines[-2].items()
        cut = client.get("/report?seconds=5", headers={"X-Request-Timeout": "0.3"})
        assert cut.status_code == 504
        report = client.get("/report?seconds=0").json()
        assert report["items"] == len(lines) - 1
        assert client.get("/livez").status_code == 200
        assert client.get("/readyz").json()["status"] == "ready"
        metrics = client.get("/metrics/").text
        assert "fastapi_dbpool_cancelled_requests_total" in metrics


def test_python_m_example_app_serves_and_stops_cleanly(
    database_url: str, server: Server, app_name: str
) -> None:
    port = free_port()
    env = {**os.environ, "DATABASE_URL": database_url, "PORT": str(port)}
    env["DBPOOL_NAME"] = app_name
    proc = subprocess.Popen(
        [sys.executable, "-m", "example_app"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/items", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                assert time.monotonic() < deadline, "example app did not start in 30s"
                time.sleep(0.2)
        assert r.status_code == 200
        assert server.states()  # its pool is connected
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert f"listening on http://127.0.0.1:{port}" in out
    assert server.wait_until(lambda s: s == []) == []  # shutdown closed every connection
