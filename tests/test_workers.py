"""Many workers: `uvicorn` run with WEB_CONCURRENCY=3, as the README's sizing rule says,
against a role whose CONNECTION LIMIT the server enforces.

Within the rule (workers x max_size <= the limit) every request is served and the backends
stay within it, and fall back to workers x min_size after the load. Over it, startup names
the sum and what fits, and the connections the server refuses become 503s, never 500s.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import httpx
import pytest
from psycopg.conninfo import make_conninfo

from benchmarks._runner import free_port

from .conftest import Server

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
WORKERS = 3
MAX_SIZE = 4


@contextmanager
def uvicorn_workers(url: str, app_name: str, **env: str) -> Iterator[tuple[int, list[str]]]:
    """`python -m uvicorn tests.workers_app:app` with WEB_CONCURRENCY workers; its output."""
    port = free_port()
    environ = {
        **os.environ,
        "DATABASE_URL": url,
        "DBPOOL_NAME": app_name,
        "DBPOOL_MIN_SIZE": "1",
        "DBPOOL_MAX_SIZE": str(MAX_SIZE),
        "WEB_CONCURRENCY": str(WORKERS),
        **env,
    }
    command = [sys.executable, "-m", "uvicorn", "tests.workers_app:app"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--no-access-log"]
    proc = subprocess.Popen(
        command, cwd=ROOT, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output: list[str] = []
    assert proc.stdout is not None
    reader = threading.Thread(target=lambda: output.extend(proc.stdout or ()), daemon=True)
    reader.start()  # the whole output, as it comes
    try:
        deadline = time.monotonic() + 60
        while sum("Application startup complete" in line for line in output) < WORKERS:
            assert proc.poll() is None, "".join(output)
            assert time.monotonic() < deadline, "".join(output)
            time.sleep(0.05)
        yield port, output
    finally:
        proc.terminate()  # by PID: uvicorn's supervisor stops its workers
        proc.wait(timeout=30)
        reader.join(timeout=10)
        proc.stdout.close()


async def load(
    port: int, server: Server, requests: int, concurrency: int
) -> tuple[Counter[int], int]:
    """`requests` GET /work, `concurrency` at a time: statuses, most backends seen at once."""
    seen = [0]
    done = asyncio.Event()

    def watch() -> None:
        while not done.is_set():
            seen[0] = max(seen[0], len(server.states()))
            time.sleep(0.02)

    statuses: Counter[int] = Counter()
    limits = httpx.Limits(max_connections=concurrency)
    async with anyio.create_task_group() as tg:
        tg.start_soon(anyio.to_thread.run_sync, watch)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=30
        ) as client:
            gate = asyncio.Semaphore(concurrency)

            async def one() -> None:
                async with gate:
                    r = await client.get("/work")
                statuses[r.status_code] += 1
                if r.status_code == 503:
                    assert r.headers["retry-after"] == "1"
                    assert "too many" not in r.text  # the body stays generic

            await asyncio.gather(*(one() for _ in range(requests)))
        done.set()
    return statuses, seen[0]


@pytest.fixture
def role(server: Server, app_name: str) -> Iterator[str]:
    server.query(f"CREATE ROLE {app_name} LOGIN")
    yield app_name
    server.query(f"DROP ROLE {app_name}")


async def test_within_the_rule_every_request_is_served_within_it(
    database_url: str, app_name: str, server: Server, role: str
) -> None:
    limit = WORKERS * MAX_SIZE  # the rule: WEB_CONCURRENCY x max_size <= what the server gives
    server.query(f"ALTER ROLE {role} CONNECTION LIMIT {limit}")
    url = make_conninfo(database_url, user=role)
    with uvicorn_workers(url, app_name, DBPOOL_MAX_IDLE="1") as (port, output):
        statuses, most = await load(port, server, requests=300, concurrency=30)
        assert statuses == {200: 300}, "".join(output)
        assert 0 < most <= limit
        assert most > WORKERS  # the load made the workers grow their pools
        # the burst's connections go back: WORKERS x min_size, asked of PostgreSQL
        states = await anyio.to_thread.run_sync(
            lambda: server.wait_until(lambda s: len(s) == WORKERS, timeout=10)
        )
        assert len(states) == WORKERS
    log = "".join(output)
    assert "than the server gives" not in log
    assert server.wait_until(lambda s: s == []) == []  # every worker closed its pool


async def test_over_the_rule_startup_says_so_and_refusals_are_503s(
    database_url: str, app_name: str, server: Server, role: str
) -> None:
    server.query(f"ALTER ROLE {role} CONNECTION LIMIT 6")  # 3 workers x 4 = 12 wanted
    url = make_conninfo(database_url, user=role)
    with uvicorn_workers(url, app_name, DBPOOL_ACQUIRE_TIMEOUT="0.3") as (port, output):
        statuses, most = await load(port, server, requests=300, concurrency=60)
        assert most <= 6
    log = "".join(output)
    assert f"{WORKERS} worker(s) x max_size {MAX_SIZE} = 12 connections" in log
    assert f"role '{role}' has CONNECTION LIMIT 6" in log
    assert "keep max_size <= 2 per worker" in log
    assert set(statuses) <= {200, 503}, statuses  # never a 500
    assert statuses[503] > 0, statuses
    assert statuses[200] > 0, statuses
    assert "too many connections for role" in log  # the cause, in the workers' log
