"""Soak: the example app under load for a bounded time, while faults are injected.

    python -m benchmarks.soak [--seconds 60] [--concurrency 16] [--seed 1]

Starts an embedded PostgreSQL (the soak restarts it, so it never uses ``DATABASE_URL``)
and the example app under uvicorn on 127.0.0.1. Clients list, create, move and export
items, ask for slow reports cut by their deadline, and hang up mid-request. Meanwhile the
app's backends are killed with ``pg_terminate_backend`` every few seconds, and PostgreSQL
is stopped and started again halfway through. PostgreSQL is polled for queries of the app
that run on past their cut.

Prints one summary line: requests, answers and errors by kind, the recovery time after the
restart, leaked connections and orphaned queries. Errors are expected only around a fault
(a query on a killed backend fails); any other error, a leak, an orphaned query or an app
that does not recover within 10 s of the restart makes it exit 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pwd
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import psycopg
from psycopg.conninfo import conninfo_to_dict

from fastapi_dbpool.testing import embedded_postgres
from fastapi_dbpool.testing._postgres import postmaster_pid

from ._runner import served
from ._serve import http_request, settled_states

MAX_SIZE = 4
MAX_CUT = 1.0  # every slow report is cut (deadline or hang-up) at most this long after it starts
GRACE = 1.5  # a query still running this long after its latest possible cut is orphaned
FAULT_WINDOW = 1.5  # errors of requests that overlap a fault by this much are its doing
RECOVERY_LIMIT = 10.0
HEADER = "X-Request-Timeout"


@dataclass
class Summary:
    seconds: float
    requests: int = 0
    answers: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    terminated: int = 0
    recovery: float | None = None  # seconds from "PostgreSQL is back" to "the app serves"
    outage: float | None = None  # seconds from the stop to "the app serves"
    leaked: int = 0
    orphaned: list[str] = field(default_factory=list)
    app_log_errors: int = 0

    @property
    def ok(self) -> bool:
        recovered = self.recovery is not None and self.recovery <= RECOVERY_LIMIT
        return recovered and not (self.unexpected or self.leaked or self.orphaned)

    def line(self) -> str:
        def kinds(counter: Counter[str]) -> str:
            return ",".join(f"{k}:{v}" for k, v in sorted(counter.items())) or "-"

        recovery = "none" if self.recovery is None else f"{self.recovery:.2f}s"
        outage = "none" if self.outage is None else f"{self.outage:.2f}s"
        return (
            f"soak: seconds={self.seconds:.0f} requests={self.requests} "
            f"answers={kinds(self.answers)} errors={sum(self.errors.values())} "
            f"({kinds(self.errors)}) unexpected_errors={len(self.unexpected)} "
            f"terminated_backends={self.terminated} restart_recovery={recovery} "
            f"restart_outage={outage} leaked_connections={self.leaked} "
            f"orphaned_queries={len(self.orphaned)} {'OK' if self.ok else 'FAILED'}"
        )


class Faults:
    """When faults happened, so that an error can be told apart from a failure."""

    def __init__(self) -> None:
        self.windows: list[tuple[float, float]] = []

    def near(self, start: float, end: float) -> bool:
        return any(start <= b + FAULT_WINDOW and end >= a for a, b in self.windows)


class Postgres:
    """The soak's own PostgreSQL, which it may stop and start again (by PID, as its owner)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.pgdata = str(conninfo_to_dict(url)["host"])  # embedded: the socket dir is pgdata
        pid = postmaster_pid(self.pgdata)
        assert pid is not None, "no postmaster.pid"
        self.bin = Path(os.readlink(f"/proc/{pid}/exe")).parent
        owner = pwd.getpwuid(os.stat(self.pgdata).st_uid).pw_name
        self.user = owner if os.geteuid() == 0 and owner != "root" else None

    def stop(self) -> None:
        pid = postmaster_pid(self.pgdata)
        assert pid is not None
        os.kill(pid, signal.SIGINT)  # fast shutdown: sessions are terminated
        for _ in range(300):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        raise RuntimeError("PostgreSQL did not stop within 15 s")

    def start(self) -> None:
        subprocess.run(
            [str(self.bin / "pg_ctl"), "-D", self.pgdata, "-w", "-t", "30",
             "-o", '-h ""', "-o", f"-k {self.pgdata}", "-l", f"{self.pgdata}/log", "start"],
            check=True, user=self.user, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            timeout=60,
        )  # fmt: skip


async def _client(
    port: int, rng: random.Random, until: float, summary: Summary, faults: Faults, ids: list[int]
) -> None:
    while time.monotonic() < until:
        roll = rng.random()
        start = time.monotonic()
        summary.requests += 1
        try:
            if roll < 0.2:
                await _hang_up(port, rng)
                summary.answers["hung_up"] += 1
                continue
            kind, (status, body, complete) = await _ask(port, rng, roll, ids)
        except Exception as ex:
            kind, status, body, complete = "transport", 0, type(ex).__name__.encode(), False
        expected = _expected(kind, status, body, complete)
        if expected:
            summary.answers[expected] += 1
            continue
        error = f"{kind}:{status or body.decode(errors='replace')}"
        summary.errors[error] += 1
        if not faults.near(start, time.monotonic()):
            summary.unexpected.append(f"{error} at {start:.1f} {body[:120]!r}")


async def _ask(
    port: int, rng: random.Random, roll: float, ids: list[int]
) -> tuple[str, tuple[int, bytes, bool]]:
    if roll < 0.45:
        status, _, body, complete = await http_request(port, "GET", "/items?limit=20", timeout=15)
        return "list", (status, body, complete)
    if roll < 0.6:
        item = json.dumps({"name": f"soak {uuid.uuid4().hex[:8]}", "quantity": 10}).encode()
        headers = {"Content-Type": "application/json"}
        status, _, body, complete = await http_request(
            port, "POST", "/items", headers, item, timeout=15
        )
        if status == 201:
            ids.append(json.loads(body)["id"])
        return "create", (status, body, complete)
    if roll < 0.7 and len(ids) >= 2:
        a, b = rng.sample(ids[-50:], 2)
        path = f"/items/{a}/move/{b}?quantity={rng.randint(1, 5)}"
        status, _, body, complete = await http_request(port, "POST", path, timeout=15)
        return "move", (status, body, complete)
    if roll < 0.8:
        status, _, body, complete = await http_request(port, "GET", "/export", timeout=15)
        return "export", (status, body, complete)
    cut = {HEADER: f"{rng.uniform(0.05, MAX_CUT):.3f}"}
    status, _, body, complete = await http_request(
        port, "GET", "/report?seconds=5", cut, timeout=15
    )
    return "report", (status, body, complete)


def _expected(kind: str, status: int, body: bytes, complete: bool) -> str | None:
    """The name of an expected answer, or None for an error."""
    if kind == "report" and status == 504:
        return "deadline_504"
    if kind == "move" and status == 409:
        return "move_refused_409"
    if kind == "export" and status == 200:
        last = body.rstrip(b"\n").rsplit(b"\n", 1)[-1]
        return "export_200" if complete and last.startswith(b'{"end"') else None
    if status in (200, 201) and complete:
        return f"{kind}_{status}"
    return None


async def _hang_up(port: int, rng: random.Random) -> None:
    """A client that goes away mid-request: mid report query, or mid export stream."""
    path = rng.choice(["/report?seconds=5", "/export"])
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await asyncio.sleep(rng.uniform(0.01, MAX_CUT / 2))
    writer.transport.abort()


async def _monitor(url: str, app_name: str, summary: Summary, until: float) -> None:
    """Poll for the app's queries running past any cut; reconnect across the restart."""
    seen: set[tuple[int, object]] = set()
    while time.monotonic() < until:
        try:
            async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                while time.monotonic() < until:
                    cur = await conn.execute(
                        "SELECT pid, query_start, query, now() - query_start "
                        "FROM pg_stat_activity WHERE application_name = %s AND "
                        "state = 'active' AND now() - query_start > make_interval(secs => %s)",
                        (app_name, MAX_CUT + GRACE),
                    )
                    for pid, started, query, age in await cur.fetchall():
                        if (pid, started) not in seen:
                            seen.add((pid, started))
                            summary.orphaned.append(f"pid {pid} ({age}): {query}")
                    await asyncio.sleep(0.1)
        except psycopg.OperationalError:
            await asyncio.sleep(0.2)  # the server is restarting


async def _terminate(url: str, app_name: str) -> int:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            (app_name,),
        )
        return len(await cur.fetchall())


async def _inject(
    pg: Postgres, port: int, app_name: str, summary: Summary, faults: Faults, until: float
) -> None:
    """Kill the app's backends every few seconds; stop and start PostgreSQL halfway."""
    begin = time.monotonic()
    restart_at = begin + (until - begin) / 2
    every = max(1.0, (until - begin) / 8)
    restarted = False
    while time.monotonic() < until - every / 2:
        await asyncio.sleep(every / 2)
        now = time.monotonic()
        if not restarted and now >= restart_at:
            restarted = True
            await _restart(pg, port, summary, faults)
            continue
        summary.terminated += await _terminate(pg.url, app_name)
        faults.windows.append((now, time.monotonic()))
        await asyncio.sleep(every / 2)


async def _restart(pg: Postgres, port: int, summary: Summary, faults: Faults) -> None:
    stopped = time.monotonic()
    faults.windows.append((stopped, float("inf")))  # until the app serves again
    await asyncio.to_thread(pg.stop)
    await asyncio.sleep(1.0)  # an outage, not a blip
    await asyncio.to_thread(pg.start)
    back = time.monotonic()
    while time.monotonic() - back < RECOVERY_LIMIT * 2:
        with contextlib.suppress(Exception):
            status, *_ = await http_request(port, "GET", "/items?limit=1", timeout=5)
            if status == 200:
                now = time.monotonic()
                summary.recovery, summary.outage = now - back, now - stopped
                break
        await asyncio.sleep(0.05)
    faults.windows[-1] = (stopped, time.monotonic())


async def _leaks(url: str, app_name: str, port: int, summary: Summary) -> int:
    """Backends not idle once load stops, beyond max_size, or pool slots not to be had."""
    states = await settled_states(url, app_name)  # cut queries end at once; stragglers: 5 s
    leaked = sum(s != "idle" for s in states) + max(0, len(states) - MAX_SIZE)
    # max_size slow requests at once: each needs a connection of its own, all must be had
    headers = {HEADER: "5"}
    results = await asyncio.gather(
        *(http_request(port, "GET", "/report?seconds=0.5", headers) for _ in range(MAX_SIZE))
    )
    served_ok = sum(status == 200 for status, *_ in results)
    if served_ok < MAX_SIZE:
        summary.unexpected.append(f"only {served_ok} of {MAX_SIZE} requests served at once")
    return leaked + (MAX_SIZE - served_ok)


async def soak_app(
    url: str, port: int, app_name: str, seconds: float, concurrency: int, seed: int
) -> Summary:
    summary = Summary(seconds=seconds)
    faults = Faults()
    pg = Postgres(url)
    rng = random.Random(seed)
    ids: list[int] = []
    until = time.monotonic() + seconds
    await asyncio.gather(
        _monitor(url, app_name, summary, until + 2),
        _inject(pg, port, app_name, summary, faults, until),
        *(
            _client(port, random.Random(rng.random()), until, summary, faults, ids)
            for _ in range(concurrency)
        ),
    )
    summary.leaked = await _leaks(url, app_name, port, summary)
    return summary


@contextlib.contextmanager
def example_app(url: str, app_name: str, log: IO[bytes]) -> Iterator[int]:
    env = {"DBPOOL_NAME": app_name, "DBPOOL_MAX_SIZE": str(MAX_SIZE), "DBPOOL_ACQUIRE_TIMEOUT": "5"}
    with served("example_app.app:from_env", url, env=env, probe="/livez", log=log) as (port, _):
        yield port


def soak(seconds: float, concurrency: int = 16, seed: int = 1) -> Summary:
    """Run the whole soak: its own PostgreSQL, the example app, load and faults."""
    app_name = f"soak_{uuid.uuid4().hex[:8]}"
    with embedded_postgres() as url, tempfile.TemporaryFile() as log:
        with example_app(url, app_name, log) as port:
            summary = asyncio.run(soak_app(url, port, app_name, seconds, concurrency, seed))
        log.seek(0)
        summary.app_log_errors = log.read().count(b"Traceback")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    summary = soak(args.seconds, args.concurrency, args.seed)
    print(summary.line())
    for problem in (summary.unexpected + summary.orphaned)[:20]:
        print("  problem:", problem)
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
