"""Requests served over a slow link: the package with a 2 s deadline against raw asyncpg.

    python -m benchmarks.network [--rounds 2] [--seconds 20] [--write FILE]

As root, with iproute2 and iptables. Each run is `tests._netlab` in a network namespace of
its own: PostgreSQL behind the lab's delaying proxy (+200 ms each way, 5% of chunks held
0.3 s longer, as a retransmit would), the app under uvicorn with a pool of 10, and 20
clients looping ``GET /one`` and 2 ``POST /tx``. Contenders run in turn, round after round,
and the table gives the median of the rounds: successful requests a second, and how many
of them answered within 2 s.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence

from tests import _netlab

from ._runner import add_write_option, write

CONTENDERS: Sequence[tuple[str, list[str]]] = (
    ("fastapi_dbpool, 2 s deadline", ["--deadline", "2"]),
    ("fastapi_dbpool, no deadline", ["--deadline", "0"]),
    ("raw asyncpg, no deadline", ["--app", "asyncpg", "--deadline", "0"]),
)


def run(args: list[str], seconds: float) -> tuple[float, float, int]:
    """(successes a second, share answered within 2 s, 504s) of one lab run."""
    report = _netlab.run_lab(
        ["slow", "--before", "1", "--duration", "0", "--after", str(seconds - 1), *args]
    )
    reqs = [r for r in report["requests"] if r[0] >= 1.0]  # past the warm-up second
    ok = [r for r in reqs if r[2] == 200]
    quick = sum(1 for r in ok if r[1] - r[0] <= 2.0)
    return len(ok) / (seconds - 1), quick / max(len(ok), 1), sum(1 for r in reqs if r[2] == 504)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=20.0)
    add_write_option(parser)
    ns = parser.parse_args()
    why_not = _netlab.can_make_namespaces()
    if why_not is not None:
        raise SystemExit(f"no network lab here: {why_not}")
    results: dict[str, list[tuple[float, float, int]]] = {name: [] for name, _ in CONTENDERS}
    for _ in range(ns.rounds):
        for name, args in CONTENDERS:
            results[name].append(run(args, ns.seconds))
    base = statistics.median(r[0] for r in results[CONTENDERS[-1][0]])
    lines = [
        "| over +400 ms round trip, 5% loss | successes/s | within 2 s | 504s a run | vs asyncpg |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, rows in results.items():
        rate = statistics.median(r[0] for r in rows)
        quick = statistics.median(r[1] for r in rows)
        cut = statistics.median(r[2] for r in rows)
        lines.append(f"| {name} | {rate:.1f} | {quick:.0%} | {cut:.0f} | {rate / base:.2f}x |")
    table = "\n".join(lines)
    print(table)
    write(ns.write, table)


if __name__ == "__main__":
    main()
