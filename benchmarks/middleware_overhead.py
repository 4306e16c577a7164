"""What CancellationMiddleware costs: requests/s with and without it, in one run.

    python -m benchmarks.middleware_overhead [--rounds 5] [--seconds 3] [--connections 32]

Uses ``DATABASE_URL``, or starts an embedded PostgreSQL. Both apps run under uvicorn on
127.0.0.1 and are loaded in turn from a separate process; prints a table of medians.
"""

from __future__ import annotations

from ._runner import cli

CONTENDERS = [
    ("fastapi_dbpool", "benchmarks._apps:fastapi_dbpool"),
    ("+ a pass-through middleware", "benchmarks._apps:fastapi_dbpool_passthrough"),
    ("+ CancellationMiddleware", "benchmarks._apps:fastapi_dbpool_middleware"),
]


if __name__ == "__main__":
    cli(__doc__, CONTENDERS, ["/select/42", "/nodb"], rounds=5)
