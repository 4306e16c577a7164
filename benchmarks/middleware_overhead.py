"""What CancellationMiddleware costs: requests/s with and without it, in one run.

    python -m benchmarks.middleware_overhead [--rounds 40] [--seconds 1] [--connections 32]

Uses ``DATABASE_URL``, or starts an embedded PostgreSQL. Every app runs under uvicorn on
127.0.0.1 and is loaded in turn from a separate process; prints a table of medians, each
ratio with a 95% interval. Two rows frame the middleware's: a pass-through that does
nothing (what a middleware layer costs as such), and one that only runs the request in an
anyio ``CancelScope``, the least any middleware must do to cancel the anyio way.
"""

from __future__ import annotations

from ._runner import cli

CONTENDERS = [
    ("fastapi_dbpool", "benchmarks._apps:fastapi_dbpool"),
    ("+ a pass-through middleware", "benchmarks._apps:fastapi_dbpool_passthrough"),
    ("+ an anyio CancelScope only", "benchmarks._apps:fastapi_dbpool_scope_only"),
    ("+ CancellationMiddleware", "benchmarks._apps:fastapi_dbpool_middleware"),
]


if __name__ == "__main__":
    cli(__doc__, CONTENDERS, ["/select/42", "/nodb"], rounds=40)
