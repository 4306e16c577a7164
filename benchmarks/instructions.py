"""Instructions per request under real uvicorn, counted by callgrind: a cost that load barely moves.

    python -m benchmarks.instructions [--set middleware|contenders|observability|fast-paths]
        [--requests 1500]
        [--connections 4] [--rounds 3]
    python -m benchmarks.instructions --revisions REV [REV ...] [...]

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

``--revisions`` compares the package with itself: the same app (the plain fastapi_dbpool
contender) on fastapi_dbpool as of each git revision given, then on the working tree's, in
interleaved rounds. Each revision's package is taken out with ``git archive`` (the working
tree's is copied: served from the checkout itself, the same code counted 0.4% more) and put
first on its server's path, and the app refuses to start on any other copy of the package: what
"this change costs 0.5% a request" rests on. A revision whose package the app cannot use
(older than its ``DBPool`` arguments) fails to start.

Uses ``DATABASE_URL`` or an embedded PostgreSQL; prints a table with each contender's ratio
(the first contender's instructions per request / its own: above 1.00x is cheaper).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import contenders, middleware_overhead
from ._apps import PACKAGE
from ._runner import add_write_option, prepare, served, write

#: What fastapi_dbpool.otel's metrics cost a request (the SDK records each wait and hold).
OBSERVABILITY = [
    ("fastapi_dbpool", "benchmarks._apps:fastapi_dbpool"),
    ("+ otel.instrument(), OpenTelemetry SDK", "benchmarks._apps:fastapi_dbpool_otel"),
    ("+ otel.instrument(histograms=False)", "benchmarks._apps:fastapi_dbpool_otel_no_histograms"),
]
#: What the fast paths save: the same app with all of them (the default) and with none.
FAST_PATHS = [
    ("fastapi_dbpool", "benchmarks._apps:fastapi_dbpool"),
    ("fastapi_dbpool, FASTAPI_DBPOOL_FAST_PATHS=0", "benchmarks._public_path:fastapi_dbpool"),
    ("raw asyncpg pool", "benchmarks._peers:raw_asyncpg"),
]
SETS = {
    "middleware": middleware_overhead.CONTENDERS,
    "fast-paths": FAST_PATHS,
    "contenders": contenders.CONTENDERS,
    "sessions": contenders.SESSIONS,
    "observability": OBSERVABILITY,
}
PATHS = {
    "middleware": ["/select/42", "/nodb"],
    "fast-paths": ["/select/42", "/tx/42"],
    "contenders": ["/select/42", "/tx/42", "/nodb"],
    "sessions": ["/select/42", "/tx/42"],
    "observability": ["/select/42"],
}
CONNECTIONS = 4  # latency stays well under CancellationMiddleware's 0.25 s before it watches
REVISIONS_APP = "benchmarks._apps:fastapi_dbpool"
REVISIONS_PATHS = ["/select/42", "/tx/42"]
_REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Package:
    """Where a server imports fastapi_dbpool from: `root` holds the package. It runs in
    `bench`, which holds only the benchmarks, so no other copy comes first on its path."""

    root: Path
    bench: Path

    def env(self) -> dict[str, str]:
        return {
            "PYTHONPATH": os.pathsep.join([str(self.root), str(self.bench)]),
            PACKAGE: str(self.root / "fastapi_dbpool"),
        }


@contextlib.contextmanager
def revisions(revs: Sequence[str]) -> Iterator[list[tuple[str, Package]]]:
    """fastapi_dbpool as of each of `revs` (``git archive``), then the working tree's, each
    copied into a directory of its own so that every row is served the same way."""
    with tempfile.TemporaryDirectory() as tmp:
        bench = Path(tmp, "bench")
        bench.mkdir()
        (bench / "benchmarks").symlink_to(_REPO / "benchmarks")
        packages = []
        for rev in revs:
            commit = _git("rev-parse", "--short", f"{rev}^{{commit}}").decode().strip()
            root = Path(tmp, commit)
            root.mkdir(exist_ok=True)
            archive = _git("archive", commit, "fastapi_dbpool")
            subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
            packages.append(
                (rev if rev.startswith(commit) else f"{rev} ({commit})", Package(root, bench))
            )
        # A copy too: served from the checkout itself, the same code counted 0.4% more
        tree = Path(tmp, "working-tree")
        shutil.copytree(
            _REPO / "fastapi_dbpool",
            tree / "fastapi_dbpool",
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        packages.append(("working tree", Package(tree, bench)))
        yield packages


def _git(*args: str) -> bytes:
    return subprocess.run(["git", "-C", str(_REPO), *args], check=True, capture_output=True).stdout


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
    factory: str,
    url: str,
    paths: Sequence[str],
    requests: int,
    connections: int = CONNECTIONS,
    package: Package | None = None,
) -> dict[str, float]:
    """Instructions per request of `factory` on each of `paths` (with `package`'s
    fastapi_dbpool, if given)."""
    with tempfile.TemporaryDirectory() as out:
        prefix = [
            "valgrind", "--tool=callgrind", "--instr-atstart=no",
            f"--callgrind-out-file={out}/callgrind.%p",
        ]  # fmt: skip
        per_request: dict[str, float] = {}
        with (
            open(os.devnull, "wb") as log,
            served(
                factory,
                url,
                env={"BENCH_WATCHDOG": "off", **(package.env() if package else {})},
                prefix=prefix,
                startup=300.0,
                log=log,
                cwd=package.bench if package else None,
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
    parser.add_argument(
        "--revisions",
        nargs="+",
        metavar="REV",
        help="instead of a --set: the plain fastapi_dbpool app on the package as of each git "
        "REV, then on the working tree's",
    )
    add_write_option(parser)
    args = parser.parse_args()
    if not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        sys.exit("needs valgrind (Debian: apt-get install valgrind)")
    # no revisions: nothing to take out of git or copy
    found: contextlib.AbstractContextManager[list[tuple[str, Package]]] = (
        revisions(args.revisions) if args.revisions else contextlib.nullcontext([])
    )
    with database_url() as url, found as packages:
        chosen: list[tuple[str, str, Package | None]]
        if args.revisions:
            chosen = [(name, REVISIONS_APP, package) for name, package in packages]
            paths = REVISIONS_PATHS
        else:
            chosen = [(name, factory, None) for name, factory in SETS[args.set]]
            paths = PATHS[args.set]
        runs: dict[str, dict[str, list[float]]] = {
            name: {p: [] for p in paths} for name, _, _ in chosen
        }
        prepare(url)
        for _ in range(args.rounds):
            for name, factory, package in chosen:
                per_request = count(factory, url, paths, args.requests, args.connections, package)
                for path, n in per_request.items():
                    runs[name][path].append(n)
    median = {name: {p: statistics.median(ns) for p, ns in by.items()} for name, by in runs.items()}
    first = chosen[0][0]
    # a change of the package is judged in per cent (a bound such as "under 1%")
    last = "change" if args.revisions else "ratio"
    lines = [
        f"callgrind under uvicorn (1 worker, httptools), {args.requests} requests per endpoint, "
        f"{args.connections} at a time, {args.rounds} interleaved rounds; instructions per "
        "request: the median, and the lowest to the highest round; "
        + (
            f"change = the median against {first}'s"
            if args.revisions
            else f"ratio = {first}'s median / the contender's"
        ),
        "",
        f"| endpoint | contender | instructions/request | rounds | {last} |",
        "|---|---|---:|---:|---:|",
    ]
    for path in paths:
        for name, _, _ in chosen:
            ns = runs[name][path]
            ratio = median[first][path] / median[name][path]
            shown = f"{1 / ratio - 1:+.1%}" if args.revisions else f"{ratio:.2f}x"
            lines.append(
                f"| {path} | {name} | {median[name][path]:,.0f} | {min(ns):,.0f} to "
                f"{max(ns):,.0f} | {shown} |"
            )
    table = "\n".join(lines)
    print(table)
    write(args.write, table)


if __name__ == "__main__":
    main()
