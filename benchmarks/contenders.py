"""fastapi_dbpool against the usual ways of wiring PostgreSQL into FastAPI, in one run.

    python -m benchmarks.contenders [--rounds 20] [--seconds 1] [--connections 32]

Needs the ``bench`` extra (SQLAlchemy, asyncpg). Uses ``DATABASE_URL``, or starts an
embedded PostgreSQL. Every contender runs under uvicorn on 127.0.0.1 with a pool of 8 and
is loaded in turn (wrk if installed); ratios are to the psycopg_pool baseline.
"""

from __future__ import annotations

from ._runner import cli

CONTENDERS = [
    ("psycopg_pool, as its docs show", "benchmarks._peers:psycopg_pool_baseline"),
    ("fastapi_dbpool", "benchmarks._apps:fastapi_dbpool"),
    ("fastapi_dbpool + CancellationMiddleware", "benchmarks._apps:fastapi_dbpool_middleware"),
    ("SQLAlchemy 2 async + asyncpg", "benchmarks._peers:sqlalchemy_asyncpg"),
    ("raw asyncpg pool", "benchmarks._peers:raw_asyncpg"),
]


if __name__ == "__main__":
    cli(__doc__, CONTENDERS, ["/select/42", "/tx/42", "/nodb"], rounds=20)
