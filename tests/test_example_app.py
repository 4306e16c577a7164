"""The example app, in process and as `python -m example_app` under uvicorn."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
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
    metrics = (await client.get("/metrics")).text
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


def _postmasters() -> set[tuple[int, str]]:
    """Embedded PostgreSQL servers running now: (pid, data directory)."""
    found = set()
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmd = proc.info["cmdline"] or []
        if proc.info["name"] == "postgres" and "-D" in cmd:
            found.add((proc.pid, cmd[cmd.index("-D") + 1]))
    return found


def _alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_its_embedded_postgresql_stops_with_it_whatever_the_signal(signum: int) -> None:
    """Closing the terminal (SIGHUP) left the embedded PostgreSQL running, orphaned."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["PORT"] = str(port)
    before = _postmasters()
    started: set[tuple[int, str]] = set()
    proc = subprocess.Popen(
        [sys.executable, "-m", "example_app"], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "example app did not start in 60s"
            time.sleep(0.2)
        started = _postmasters() - before
        assert len(started) == 1  # its own embedded server
        proc.send_signal(signum)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        left = [pid for pid, _ in started if _alive(pid)]
        for pid in left:  # the failure this guards against: stop it by its PID
            os.kill(pid, signal.SIGINT)
    assert not left, "the embedded PostgreSQL outlived the app"
    ((_, pgdata),) = started
    assert not Path(pgdata).exists()  # and its data deleted
    assert proc.returncode == 0, out[-2000:]
    assert len(out.splitlines()) < 40, out  # no initdb chatter


def test_a_taken_port_is_said_at_once_with_the_fix() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
        env["PORT"] = str(port)
        done = subprocess.run(
            [sys.executable, "-m", "example_app"], cwd=ROOT, env=env,
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    assert done.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "set PORT to a free port" in done.stderr
    assert "listening on" not in done.stdout
    assert "embedded PostgreSQL" not in done.stdout  # nothing started before the bind
