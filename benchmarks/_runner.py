"""Start contenders under uvicorn, load them in turn, print a table of medians and ratios."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO

import psycopg


def prepare(url: str) -> None:
    """The tables of every contender: 10,000 items indexed by id, and a log to insert into."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS bench_items")
        conn.execute("CREATE TABLE bench_items (id int PRIMARY KEY, name text NOT NULL)")
        conn.execute(
            "INSERT INTO bench_items SELECT n, 'item ' || n FROM generate_series(1, 10000) n"
        )
        conn.execute("DROP TABLE IF EXISTS bench_log")
        conn.execute("CREATE TABLE bench_log (id bigserial PRIMARY KEY, item_id int NOT NULL)")


def free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def served(
    factory: str,
    url: str,
    *,
    env: dict[str, str] | None = None,
    probe: str = "/nodb",
    log: IO[bytes] | None = None,
    prefix: Sequence[str] = (),
    startup: float = 30.0,
    cwd: Path | None = None,
    is_factory: bool = True,
) -> Iterator[tuple[int, int]]:
    """`factory` under uvicorn (one worker) on 127.0.0.1; stopped by its PID on exit
    (with `is_factory` False, `factory` names the app itself: ``module:app``).

    Ready once `probe` answers (within `startup` seconds); yields its port and PID. `env`
    adds to the environment; `log` takes its output; `prefix` goes before the command (a
    profiler that runs it); `cwd` is where it runs (first on its path). Every server gets
    the same hash seed (unless the environment sets one): with a seed of its own, each
    process's dicts and sets collide its own way, which makes one process a few per cent
    faster than another running the same code, for as long as it runs, and that reads as a
    difference between contenders.
    """
    port = free_port()
    proc = subprocess.Popen(
        [*prefix, sys.executable, "-m", "uvicorn", *(["--factory"] if is_factory else []),
         factory, "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning", "--no-access-log"],
        env={"PYTHONHASHSEED": "0", **os.environ, **(env or {}), "DATABASE_URL": url},
        stdout=log,
        stderr=subprocess.STDOUT if log else None,
        cwd=cwd,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + startup
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{probe}", timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{factory} did not start") from None
                time.sleep(0.1)
        yield port, proc.pid
    finally:
        if proc.poll() is None:  # one that died at startup is reaped already: no PID to kill
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def _check(name: str, port: int, path: str) -> None:
    """A contender that fails would be measured at the speed of its error page."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            status = response.status
    except urllib.error.HTTPError as ex:
        status = ex.code
    if status != 200:
        raise RuntimeError(f"{name} answers {status} on {path}; fix it before measuring it")


def load(port: int, path: str, connections: int, seconds: float) -> dict[str, float]:
    """One load run from a separate process: wrk if installed, else `benchmarks._load`."""
    if shutil.which("wrk"):
        return _wrk(port, path, connections, seconds)
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks._load", str(port), path,
         "--connections", str(connections), "--seconds", str(seconds)],
        check=True, capture_output=True, text=True, timeout=seconds + 60,
    ).stdout  # fmt: skip
    result: dict[str, float] = json.loads(out)
    return result


def _wrk(port: int, path: str, connections: int, seconds: float) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency",
         f"http://127.0.0.1:{port}{path}"],
        check=True, capture_output=True, text=True, timeout=seconds + 60,
    ).stdout  # fmt: skip

    def field(pattern: str) -> str:
        match = re.search(pattern, out, re.MULTILINE)
        return match.group(1) if match else "0"

    errors = int(field(r"Non-2xx or 3xx responses: (\d+)"))
    errors += sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    return {
        "requests": float(field(r"(\d+) requests in")),
        "errors": float(errors),
        "rps": float(field(r"Requests/sec:\s+([\d.]+)")),
        "p50_ms": _ms(field(r"^\s+50%\s+(\S+)")),
        "p99_ms": _ms(field(r"^\s+99%\s+(\S+)")),
    }


def _ms(text: str) -> float:
    for unit, factor in (("us", 0.001), ("ms", 1.0), ("s", 1000.0)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * factor
    return float(text)


def compare(
    url: str,
    contenders: Sequence[tuple[str, str]],
    paths: Sequence[str],
    *,
    rounds: int,
    seconds: float,
    connections: int,
) -> str:
    """Every contender on every path, interleaved for `rounds`; a table of medians.

    The first contender is the baseline of the ratio column. Rounds alternate the order,
    so that a slow moment of a shared machine does not fall on one contender only.
    """
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    with contextlib.ExitStack() as stack:
        ports = {name: stack.enter_context(served(factory, url))[0] for name, factory in contenders}
        for name, port in ports.items():  # each answers 200, then warm up
            for path in paths:
                _check(name, port, path)
                load(port, path, connections, 1.0)
        for round_no in range(rounds):
            order = list(contenders) if round_no % 2 == 0 else list(reversed(contenders))
            for path in paths:
                for name, _ in order:
                    run = load(ports[name], path, connections, seconds)
                    results.setdefault((path, name), []).append(run)
    header = (
        f"uvicorn 1 worker, {'wrk' if shutil.which('wrk') else 'benchmarks._load'} with "
        f"{connections} connections, {rounds} rounds x {seconds:g} s, medians; ratio = "
        f"median over rounds of req/s / {contenders[0][0]}'s req/s in the same round"
    )
    return _table(header, results, [name for name, _ in contenders], paths)


def _table(
    header: str,
    results: dict[tuple[str, str], list[dict[str, float]]],
    names: Sequence[str],
    paths: Sequence[str],
) -> str:
    lines = [
        header,
        "",
        "| endpoint | contender | req/s | p50 ms | p99 ms | errors | ratio | 95% interval |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for path in paths:
        base_runs = results[path, names[0]]
        for name in names:
            runs = results[path, name]
            rps = statistics.median(r["rps"] for r in runs)
            # the median of per-round ratios: each round's runs are close in time
            ratios = [r["rps"] / b["rps"] for r, b in zip(runs, base_runs, strict=True)]
            ratio = statistics.median(ratios)
            p50 = statistics.median(r["p50_ms"] for r in runs)
            p99 = statistics.median(r["p99_ms"] for r in runs)
            errors = int(sum(r["errors"] for r in runs))
            lines.append(
                f"| {path} | {name} | {rps:,.0f} | {p50:.2f} | {p99:.2f} | {errors} | "
                f"{ratio:.2f}x | {_interval(ratios) if name != names[0] else ''} |"
            )
    return "\n".join(lines)


def _interval(ratios: Sequence[float]) -> str:
    """A 95% confidence interval of the median ratio, from the rounds' own spread.

    Distribution-free (order statistics of the sorted ratios: no assumption that the noise
    of a shared machine is normal); a wide interval says the run cannot tell the
    contenders apart at that precision, whatever the median says.
    """
    n = len(ratios)
    k = math.floor(n / 2 - 0.98 * math.sqrt(n))  # the k-th smallest and k-th largest
    if k < 1:
        return "more rounds needed"
    ordered = sorted(ratios)
    return f"{ordered[k - 1]:.2f}x-{ordered[n - k]:.2f}x"


@contextlib.contextmanager
def _none(url: str) -> Iterator[Sequence[tuple[str, str]]]:
    yield ()


def cli(
    doc: str,
    contenders: Sequence[tuple[str, str]],
    paths: Sequence[str],
    rounds: int,
    more: Callable[[str], contextlib.AbstractContextManager[Sequence[tuple[str, str]]]]
    | None = None,
) -> None:
    """The command line of a benchmark script: parse, start PostgreSQL, compare, print.

    `more(url)`, if given, starts what further contenders need (a pooler in front of the
    server at `url`) and gives them, for as long as the comparison runs.

    Many short rounds rather than a few long ones: on a shared machine req/s drifts by
    20% over seconds, so the closer in time a pair of runs, the closer their ratio is to
    the truth (two identical apps read 0.92x-1.08x over 9 rounds of 3 s, 1.00x over 40
    rounds of 1 s).
    """
    from fastapi_dbpool.testing import database_url

    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--connections", type=int, default=32)
    add_write_option(parser)
    args = parser.parse_args()
    with database_url() as url, (more or _none)(url) as extra:
        prepare(url)
        table = compare(
            url,
            [*contenders, *extra],
            paths,
            rounds=args.rounds,
            seconds=args.seconds,
            connections=args.connections,
        )
    print(table)
    write(args.write, table)


def add_write_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--write",
        metavar="FILE",
        help="also write the table to FILE, with the command and date that made it "
        "(the docs include docs/benchmarks/*.md as written)",
    )


def write(path: str | None, table: str) -> None:
    """`table` to `path` (if given) as Markdown, saying which command made it, and when."""
    if path is None:
        return
    argv = sys.argv[1:]
    at = argv.index("--write") if "--write" in argv else None
    shown = argv if at is None else argv[:at] + argv[at + 2 :]
    command = shlex.join(["python", "-m", f"benchmarks.{Path(sys.argv[0]).stem}", *shown])
    day = datetime.date.today().isoformat()
    Path(path).write_text(f"Made by `{command}` on {day}:\n\n{table}\n")
