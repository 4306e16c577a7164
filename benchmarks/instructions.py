"""Instructions per request under real uvicorn, counted by callgrind: a cost that load barely moves.

    python -m benchmarks.instructions [--set middleware|contenders|observability]
        [--requests 1500]
        [--connections 4] [--rounds 3]

req/s on two shared cores moves by 10% from one run to the next, more than the differences
worth knowing. Here each contender runs under uvicorn inside valgrind's callgrind (Debian's
``valgrind``), which counts the CPU instructions the server executes: after a warm-up, the
count is switched on, exactly `--requests` requests are sent (from a separate process,
`--connections` at a time), and the count is read. The same code on the same inputs gives
nearly the same count, whatever else the machine is doing: nearly, because how many
requests one turn of the loop serves, and how often a read must wait for the server,
depend on timing. Measured here, the same code's count drifted by up to 2% over tens of
minutes while two versions run back to back kept their difference. So contenders run in
`--rounds` interleaved rounds and the table gives each one's median, its spread, and ratios
of medians. Instructions are not time (a cache miss costs more than an add), so this
complements the req/s tables, it does not replace them.

With the server 50x slower under valgrind, 4 at a time seldom wait for the pool (the
uncontended path); 32 at a time nearly all do, but then requests last long enough for
CancellationMiddleware to start watching for disconnects, which at real speed it seldom
does.

Uses ``DATABASE_URL`` or an embedded PostgreSQL; prints a table with each contender's ratio
(the first contender's instructions per request / its own: above 1.00x is cheaper).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from . import contenders, middleware_overhead
from ._runner import add_write_option, prepare, served, write

#: What fastapi_dbpool.otel's metrics cost a request (the SDK records each wait and hold).
OBSERVABILITY = [
    ("fastapi_dbpool", "benchmarks._apps:fastapi_dbpool"),
    ("+ otel.instrument(), OpenTelemetry SDK", "benchmarks._apps:fastapi_dbpool_otel"),
    ("+ otel.instrument(histograms=False)", "benchmarks._apps:fastapi_dbpool_otel_no_histograms"),
]
SETS = {
    "middleware": middleware_overhead.CONTENDERS,
    "contenders": contenders.CONTENDERS,
    "observability": OBSERVABILITY,
}
PATHS = {
    "middleware": ["/select/42", "/nodb"],
    "contenders": ["/select/42", "/tx/42", "/nodb"],
    "observability": ["/select/42"],
}
CONNECTIONS = 4  # latency stays well under CancellationMiddleware's 0.25 s before it watches


def _send(port: int, path: str, requests: int, connections: int = CONNECTIONS) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks._load", str(port), path,
         "--connections", str(connections), "--requests", str(requests)],
        check=True, capture_output=True, text=True, timeout=900,
    ).stdout  # fmt: skip
    result = json.loads(out)
    if result["requests"] != requests or result["errors"]:
        raise RuntimeError(f"{path}: {result} (expected {requests} requests, no errors)")


def _callgrind(pid: int, *command: str) -> None:
    subprocess.run(["callgrind_control", *command, str(pid)], check=True, capture_output=True)


def _totals(dump: Path) -> int:
    for line in dump.read_text().splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {dump}")


def count(
    factory: str, url: str, paths: Sequence[str], requests: int, connections: int = CONNECTIONS
) -> dict[str, float]:
    """Instructions per request of `factory` on each of `paths`."""
    with tempfile.TemporaryDirectory() as out:
        prefix = [
            "valgrind", "--tool=callgrind", "--instr-atstart=no",
            f"--callgrind-out-file={out}/callgrind.%p",
        ]  # fmt: skip
        per_request: dict[str, float] = {}
        with (
            open(os.devnull, "wb") as log,
            served(
                factory, url, env={"BENCH_WATCHDOG": "off"}, prefix=prefix, startup=300.0, log=log
            ) as (port, pid),
        ):
            for path in paths:
                _send(port, path, max(requests // 5, 50))  # warm up, uncounted
            _callgrind(pid, "--instr=on")
            for path in paths:
                _send(port, path, 20)  # let instrumented code settle before counting
                _callgrind(pid, "--zero")
                _send(port, path, requests, connections)
                before = set(Path(out).iterdir())
                _callgrind(pid, "--dump")
                (dump,) = set(Path(out).iterdir()) - before
                per_request[path] = _totals(dump) / requests
        return per_request


def main() -> None:
    from fastapi_dbpool.testing import database_url

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", choices=sorted(SETS), default="middleware")
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--connections", type=int, default=CONNECTIONS)
    parser.add_argument("--rounds", type=int, default=3)
    add_write_option(parser)
    args = parser.parse_args()
    if not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        sys.exit("needs valgrind (Debian: apt-get install valgrind)")
    chosen, paths = SETS[args.set], PATHS[args.set]
    runs: dict[str, dict[str, list[float]]] = {name: {p: [] for p in paths} for name, _ in chosen}
    with database_url() as url:
        prepare(url)
        for _ in range(args.rounds):
            for name, factory in chosen:
                for path, n in count(factory, url, paths, args.requests, args.connections).items():
                    runs[name][path].append(n)
    median = {name: {p: statistics.median(ns) for p, ns in by.items()} for name, by in runs.items()}
    first = chosen[0][0]
    lines = [
        f"callgrind under uvicorn (1 worker, httptools), {args.requests} requests per endpoint, "
        f"{args.connections} at a time, {args.rounds} interleaved rounds; instructions per "
        f"request: the median, and the lowest to the highest round; ratio = {first}'s median "
        "/ the contender's",
        "",
        "| endpoint | contender | instructions/request | rounds | ratio |",
        "|---|---|---:|---:|---:|",
    ]
    for path in paths:
        for name, _ in chosen:
            ns = runs[name][path]
            ratio = median[first][path] / median[name][path]
            lines.append(
                f"| {path} | {name} | {median[name][path]:,.0f} | {min(ns):,.0f} to "
                f"{max(ns):,.0f} | {ratio:.2f}x |"
            )
    table = "\n".join(lines)
    print(table)
    write(args.write, table)


if __name__ == "__main__":
    main()
