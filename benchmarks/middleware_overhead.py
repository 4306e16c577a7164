"""What CancellationMiddleware costs: requests/s with and without it, in one run.

    python -m benchmarks.middleware_overhead [--rounds 5] [--seconds 5] [--connections 32]

Uses ``DATABASE_URL``, or starts an embedded PostgreSQL. Both apps run under uvicorn on
127.0.0.1 and are loaded in turn from a separate process; prints a table of medians.
"""

from __future__ import annotations

import argparse

from fastapi_dbpool.testing import database_url

from ._runner import compare, prepare

CONTENDERS = [
    ("fastapi_dbpool", "benchmarks._apps:fastapi_dbpool"),
    ("+ a pass-through middleware", "benchmarks._apps:fastapi_dbpool_passthrough"),
    ("+ CancellationMiddleware", "benchmarks._apps:fastapi_dbpool_middleware"),
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args(argv)
    with database_url() as url:
        prepare(url)
        print(
            compare(
                url,
                CONTENDERS,
                ["/select/42", "/nodb"],
                rounds=args.rounds,
                seconds=args.seconds,
                connections=args.connections,
            )
        )


if __name__ == "__main__":
    main()
