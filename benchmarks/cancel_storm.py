"""Cancellation storm: real uvicorn and PostgreSQL, every request cut by its deadline or client.

    python -m benchmarks.cancel_storm [--requests 5000] [--concurrency 16] [--seed 1] [--orm]

Uses ``DATABASE_URL``, or starts an embedded PostgreSQL. Every request asks for work that
takes seconds and is cut within 0.5 s: by a deadline (``X-Request-Timeout``) or by its
client hanging up, at a random moment: waiting for the pool, mid ``pg_sleep``, mid
transaction, mid stream. Meanwhile PostgreSQL is polled for queries of the app that run on
past their cut. Prints one summary line; exits 1 if anything leaked, ran on, committed, or
answered unexpectedly. ``--orm`` runs the same through SQLAlchemy sessions
(``fastapi_dbpool.sqlalchemy``): an ORM insert and flush, then the sleep (no stream).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio
import psycopg
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from fastapi_dbpool import (
    CancellationMiddleware,
    ConnectionDep,
    DBPool,
    StreamTransactionDep,
    TransactionDep,
)
from fastapi_dbpool.testing import database_url

from ._serve import http_get, settled_states, uvicorn_server

MAX_CUT = 0.5  # every request is cut at most this long after it was sent
GRACE = 1.0  # a query running on longer than this after its cut is orphaned
HEADER = "X-Request-Timeout"


@dataclass
class Summary:
    requests: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    leaked: int = 0
    orphaned: int = 0
    committed: int = 0
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        return not (self.errors or self.leaked or self.orphaned or self.committed)

    def line(self) -> str:
        kinds = " ".join(f"{k}={v}" for k, v in sorted(self.outcomes.items()))
        return (
            f"storm: requests={self.requests} cancelled={sum(self.outcomes.values())} ({kinds}) "
            f"errors={len(self.errors)} leaked_connections={self.leaked} "
            f"orphaned_queries={self.orphaned} committed_rows={self.committed} "
            f"elapsed={self.elapsed:.1f}s {'OK' if self.ok else 'FAILED'}"
        )


def build_app(db: DBPool, table: str) -> FastAPI:
    app = FastAPI(lifespan=db.lifespan)
    app.add_middleware(CancellationMiddleware, timeout=10, timeout_header=HEADER)

    @app.get("/sleep")
    async def sleep(conn: ConnectionDep) -> None:
        await conn.execute("SELECT pg_sleep(3)")

    @app.get("/tx")
    async def tx(tx: TransactionDep) -> None:
        await tx.execute(f"INSERT INTO {table} VALUES ('tx')")
        await asyncio.sleep(random.uniform(0, 0.2))
        await tx.execute("SELECT pg_sleep(3)")

    @app.get("/stream")
    async def stream(tx: StreamTransactionDep) -> StreamingResponse:
        async def rows() -> AsyncIterator[bytes]:
            for n in range(300):
                await tx.execute(f"INSERT INTO {table} VALUES ('stream')")
                await tx.execute("SELECT pg_sleep(0.01)")
                yield b"%d\n" % n

        return StreamingResponse(rows())

    @app.get("/pid/{wait}")
    async def pid(wait: float, conn: ConnectionDep) -> int:
        cur = await conn.execute("SELECT pg_backend_pid(), pg_sleep(%s)", (wait,))
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])

    return app


async def _one(port: int, rng: random.Random, summary: Summary, paths: list[str]) -> None:
    path = rng.choice(paths)
    cut = rng.uniform(0.02, MAX_CUT)
    if rng.random() < 0.5:
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await asyncio.sleep(cut)
        writer.transport.abort()
        summary.outcomes[f"hung_up{path.replace('/', '_')}"] += 1
        return
    try:
        status, _, body, complete = await http_get(port, path, {HEADER: f"{cut:.3f}"}, timeout=10)
    except Exception as ex:
        summary.errors.append(f"{path}: {type(ex).__name__}: {ex}")
        return
    if status == 504:
        summary.outcomes["deadline_504"] += 1
    elif status == 200 and path == "/stream" and complete and body.count(b"\n") < 300:
        summary.outcomes["deadline_stream_cut"] += 1
    else:
        summary.errors.append(f"{path}: unexpected {status} complete={complete} {body[:80]!r}")


class _Monitor:
    """Polls pg_stat_activity for the app's queries that outlive any possible cut."""

    def __init__(self, url: str, app_name: str) -> None:
        self.url, self.app_name = url, app_name
        self.orphans: dict[tuple[int, object], str] = {}

    async def run(self) -> None:
        # Not `async with`: its exit awaits a rollback first, where the cancellation that
        # stops the monitor lands again (anyio), and the connection is never closed.
        conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True)
        try:
            while True:
                cur = await conn.execute(
                    "SELECT pid, query_start, query, now() - query_start FROM pg_stat_activity "
                    "WHERE application_name = %s AND state = 'active' AND "
                    "now() - query_start > make_interval(secs => %s)",
                    (self.app_name, MAX_CUT + GRACE),
                )
                for pid, start, query, age in await cur.fetchall():
                    self.orphans[pid, start] = f"orphaned query on pid {pid} ({age}): {query}"
                await asyncio.sleep(0.05)
        finally:
            await conn.close()  # no await inside: it only closes the socket


async def storm(
    url: str, requests: int, concurrency: int = 16, seed: int = 1, orm: bool = False
) -> Summary:
    """Run the storm against `url` (through SQLAlchemy sessions if `orm`); the summary says
    what, if anything, went wrong."""
    summary = Summary(requests=requests)
    app_name = f"storm_{uuid.uuid4().hex[:8]}"
    table = f"{app_name}_rows"
    max_size = 4
    errors = _ErrorLog()
    watched = ["uvicorn.error", "fastapi_dbpool"] + (["sqlalchemy"] if orm else [])
    for name in watched:
        logging.getLogger(name).addHandler(errors)
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as admin:
        await admin.execute(f"CREATE TABLE {table} (src text, id serial PRIMARY KEY)")
        try:
            # watchdog=None: the storm's own clients share the loop and may hold it in bursts
            db = DBPool(url, name=app_name, min_size=max_size, max_size=max_size, watchdog=None)
            if orm:
                from ._sessions import storm_app  # SQLAlchemy: only when asked for

                app = storm_app(db, table)
            else:
                app = build_app(db, table)
            paths = ["/sleep", "/tx"] if orm else ["/sleep", "/tx", "/stream"]
            monitor = _Monitor(url, app_name)
            start = time.monotonic()
            async with uvicorn_server(app) as port, anyio.create_task_group() as tg:
                tg.start_soon(monitor.run)
                rng = random.Random(seed)
                todo = iter(range(requests))

                async def client() -> None:
                    for _ in todo:  # shared: `concurrency` clients take requests until none left
                        await _one(port, rng, summary, paths)

                async with anyio.create_task_group() as clients:
                    for _ in range(concurrency):
                        clients.start_soon(client)
                summary.elapsed = time.monotonic() - start
                summary.leaked = await _leaks(url, app_name, port, max_size, summary)
                tg.cancel_scope.cancel()
            summary.orphaned = len(monitor.orphans)
            summary.errors += monitor.orphans.values()
            cur = await admin.execute(f"SELECT count(*) FROM {table}")
            row = await cur.fetchone()
            summary.committed = int(row[0]) if row else -1
        finally:
            await admin.execute(f"DROP TABLE {table}")
            for name in watched:
                logging.getLogger(name).removeHandler(errors)
    summary.errors += errors.messages
    return summary


async def _leaks(url: str, app_name: str, port: int, max_size: int, summary: Summary) -> int:
    """Backends not idle once things settle, plus pool slots that cannot be had at once."""
    states = await settled_states(url, app_name)  # cut queries end at once; stragglers: 5 s
    busy = sum(s != "idle" for s in states) + max(0, len(states) - max_size)
    # max_size requests at once, each holding its connection for a while: all on distinct backends
    results = await asyncio.gather(*(http_get(port, "/pid/0.3") for _ in range(max_size)))
    pids = {body for status, _, body, _ in results if status == 200}
    if len(pids) < max_size:
        summary.errors.append(f"only {len(pids)} of {max_size} requests served at once")
    return busy + (max_size - len(pids))


class _ErrorLog(logging.Handler):
    """uvicorn's 'Exception in ASGI application', our warnings: each is an error of the storm."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name}: {record.getMessage()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--orm", action="store_true", help="through SQLAlchemy sessions")
    args = parser.parse_args(argv)
    with database_url() as url:
        summary = asyncio.run(storm(url, args.requests, args.concurrency, args.seed, args.orm))
    print(summary.line())
    for error in summary.errors[:20]:
        print("  error:", error)
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
