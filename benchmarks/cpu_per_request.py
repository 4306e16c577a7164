"""CPU per request of apps called in process, interleaved: steadier than req/s on a shared box.

    python -m benchmarks.cpu_per_request /select/42 benchmarks._peers:psycopg_pool_baseline \
        benchmarks._apps:fastapi_dbpool benchmarks._apps:fastapi_dbpool_middleware

Uses ``DATABASE_URL`` or an embedded PostgreSQL. Each app (a factory, as for uvicorn) runs
its lifespan in this process; batches of requests with 32 at a time go to each app in
turn, each request in a task of its own as a server runs it, straight through ASGI (no
server, no sockets), for several rounds. Prints the median
process CPU per request of each app and its speed relative to the first app (the median
of per-round ratios).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import os
import statistics
import time
from typing import Any

from fastapi_dbpool.testing import database_url

from ._runner import prepare

CONCURRENCY = 32


async def _batch(app: Any, state: dict[str, Any], path: str, requests: int) -> None:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        pass

    loop = asyncio.get_running_loop()

    async def client(count: int) -> None:
        for _ in range(count):
            scope = {
                "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                "method": "GET", "scheme": "http", "path": path, "raw_path": path.encode(),
                "query_string": b"", "root_path": "", "headers": [(b"host", b"x")],
                "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "state": dict(state),
            }  # fmt: skip
            await loop.create_task(app(scope, receive, send))  # a task per request, as servers do

    await asyncio.gather(*(client(requests // CONCURRENCY) for _ in range(CONCURRENCY)))


async def measure(path: str, factories: list[str], rounds: int, batch: int) -> list[str]:
    async with contextlib.AsyncExitStack() as stack:
        apps = []
        for factory in factories:
            module, name = factory.split(":")
            app = getattr(importlib.import_module(module), name)()
            state = await stack.enter_async_context(app.router.lifespan_context(app))
            apps.append((name, app, dict(state or {})))
        for _, app, state in apps:  # warm up
            await _batch(app, state, path, batch // 2)
        cpu: dict[str, list[float]] = {name: [] for name, _, _ in apps}
        for _ in range(rounds):
            for name, app, state in apps:
                started = time.process_time()
                await _batch(app, state, path, batch)
                cpu[name].append((time.process_time() - started) / batch * 1e6)
    first = cpu[apps[0][0]]
    lines = [f"{path}: {rounds} rounds x {batch} requests, {CONCURRENCY} at a time, medians"]
    for name, values in cpu.items():
        speed = statistics.median(f / v for f, v in zip(first, values, strict=True))
        lines.append(f"  {name:32s} {statistics.median(values):6.0f} us CPU/request  {speed:.2f}x")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path")
    parser.add_argument("factories", nargs="+")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--batch", type=int, default=800)
    args = parser.parse_args()
    with database_url() as url:
        prepare(url)
        os.environ["DATABASE_URL"] = url
        print("\n".join(asyncio.run(measure(args.path, args.factories, args.rounds, args.batch))))


if __name__ == "__main__":
    main()
