"""A small HTTP/1.1 load generator, run as its own process so it does not share the server's loop.

    python -m benchmarks._load PORT PATH [--connections 32] [--seconds 5 | --requests N]

Keep-alive connections, each sending one GET after another for the given time (or until
`--requests` have been sent in all). Prints one JSON object: requests, errors, requests
per second, p50 and p99 latency in ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time


async def _connection(
    port: int, path: str, until: float, count: float, latencies: list[float]
) -> int:
    errors = sent = 0
    request = f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while (start := time.perf_counter()) < until and sent < count:
            sent += 1
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - start)
            if head[9:12] != b"200":
                errors += 1
    finally:
        writer.close()
    return errors


async def load(
    port: int, path: str, connections: int, seconds: float, requests: int | None = None
) -> dict[str, float]:
    latencies: list[float] = []
    start = time.perf_counter()
    counts = [math.inf] * connections
    if requests is not None:  # spread exactly `requests` over the connections
        counts = [
            requests // connections + (i < requests % connections) for i in range(connections)
        ]
    errors = await asyncio.gather(
        *(_connection(port, path, start + seconds, count, latencies) for count in counts)
    )
    elapsed = time.perf_counter() - start
    latencies.sort()
    n = len(latencies)
    return {
        "requests": n,
        "errors": sum(errors),
        "rps": n / elapsed,
        "p50_ms": latencies[n // 2] * 1000 if n else 0.0,
        "p99_ms": latencies[min(n - 1, n * 99 // 100)] * 1000 if n else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("path")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--requests", type=int, default=None)
    args = parser.parse_args()
    seconds = math.inf if args.requests is not None else args.seconds
    result = load(args.port, args.path, args.connections, seconds, args.requests)
    print(json.dumps(asyncio.run(result)))


if __name__ == "__main__":
    main()
