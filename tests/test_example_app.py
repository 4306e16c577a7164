"""The example app, in process and as `python -m example_app` under uvicorn."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psycopg
import pytest
from fastapi import FastAPI

from benchmarks._runner import free_port
from example_app.app import SCHEMA, from_env

from .conftest import Server

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def app() -> FastAPI:
    """The example app as a user's tests would get it: its DBPool from the environment,
    which the plugin binds to a test database (DATABASE_URL may be unset)."""
    return from_env()


@pytest.fixture(scope="session")
def dbpool_schema() -> str:
    return SCHEMA


@pytest.mark.anyio
async def test_items_and_an_all_or_nothing_move(dbpool_client: httpx.AsyncClient) -> None:
    client = dbpool_client
    a = (await client.post("/items", json={"name": "a", "quantity": 5})).json()
    b = (await client.post("/items", json={"name": "b"})).json()
    assert (await client.get(f"/items/{a['id']}")).json() == a
    assert (await client.get("/items/0")).status_code == 404
    with pytest.raises(psycopg.errors.CheckViolation):  # rolled back; the test goes on
        await client.post("/items", json={"name": ""})
    moved = (await client.post(f"/items/{a['id']}/move/{b['id']}?quantity=3")).json()
    assert [i["quantity"] for i in moved] == [2, 3]
    # not enough left: the first UPDATE is rolled back with the second
    refused = await client.post(f"/items/{a['id']}/move/{b['id']}?quantity=3")
    assert refused.status_code == 409
    quantities = [(await client.get(f"/items/{i['id']}")).json()["quantity"] for i in (a, b)]
    assert quantities == [2, 3]
    page = (await client.get(f"/items?after={a['id']}&limit=1")).json()
    assert page == [{"id": b["id"], "name": "b", "quantity": 3}]


@pytest.mark.anyio
async def test_export_report_health_and_metrics(dbpool_client: httpx.AsyncClient) -> None:
    client = dbpool_client
    for n in range(3):
        await client.post("/items", json={"name": f"export {n}", "quantity": n})
    lines = [json.loads(line) for line in (await client.get("/export")).text.splitlines()]
    assert lines[-1] == {"end": 3}  # only this test's items: the previous test's are gone
    assert {"name": "export 2", "quantity": 2}.items() <= lines[-2].items()
    cut = await client.get("/report?seconds=5", headers={"X-Request-Timeout": "0.3"})
    assert cut.status_code == 504
    assert (await client.get("/report?seconds=0")).json() == {"items": 3, "quantity": 3}
    assert (await client.get("/livez")).status_code == 200
    assert (await client.get("/readyz")).json()["status"] == "ready"
    metrics = (await client.get("/metrics/")).text
    assert 'fastapi_dbpool_cancelled_requests_total{pool="fastapi_dbpool"} 1.0' in metrics


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
