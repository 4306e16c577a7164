"""fastapi_dbpool against the usual ways of wiring PostgreSQL into FastAPI, in one run.

    python -m benchmarks.contenders [--rounds 20] [--seconds 1] [--connections 32]

Needs the ``bench`` extra (SQLAlchemy, asyncpg). Uses ``DATABASE_URL``, or starts an
embedded PostgreSQL. Every contender runs under uvicorn on 127.0.0.1 with a pool of 8 and
is loaded in turn (wrk if installed); ratios are to the psycopg_pool baseline. With
Debian's ``pgbouncer`` installed, one more row goes through a PgBouncer in transaction
mode (8 server connections) started on 127.0.0.1: what the pooler costs.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence

from . import _pgbouncer
from ._apps import PGBOUNCER_URL, POOL_SIZE
from ._runner import cli

CONTENDERS = [
    ("psycopg_pool, as its docs show", "benchmarks._peers:psycopg_pool_baseline"),
    ("psycopg_pool, autocommit, scope=function", "benchmarks._peers:psycopg_pool_autocommit"),
    ("fastapi_dbpool", "benchmarks._apps:fastapi_dbpool"),
    ("fastapi_dbpool + CancellationMiddleware", "benchmarks._apps:fastapi_dbpool_middleware"),
    ("fastapi_dbpool + SQLAlchemy session", "benchmarks._sessions:fastapi_dbpool_sqlalchemy"),
    ("SQLAlchemy 2 async + asyncpg", "benchmarks._peers:sqlalchemy_asyncpg"),
    ("SQLAlchemy 2 async + psycopg (its own pool)", "benchmarks._peers:sqlalchemy_psycopg"),
    ("raw asyncpg pool", "benchmarks._peers:raw_asyncpg"),
]
#: An AsyncSession per request: fastapi_dbpool's, and SQLAlchemy's own pools (`--set sessions`)
SESSIONS = [
    ("fastapi_dbpool + SQLAlchemy session", "benchmarks._sessions:fastapi_dbpool_sqlalchemy"),
    ("SQLAlchemy 2 async + asyncpg", "benchmarks._peers:sqlalchemy_asyncpg"),
    ("SQLAlchemy 2 async + psycopg (its own pool)", "benchmarks._peers:sqlalchemy_psycopg"),
]


THROUGH_PGBOUNCER = (
    "fastapi_dbpool + CancellationMiddleware, through PgBouncer",
    "benchmarks._apps:fastapi_dbpool_pgbouncer",
)


@contextlib.contextmanager
def through_pgbouncer(url: str) -> Iterator[Sequence[tuple[str, str]]]:
    """PgBouncer in front of the server at `url`, and the contender that goes through it."""
    if _pgbouncer.binary() is None:
        print("pgbouncer is not installed (apt-get install pgbouncer): no row through it",
              file=sys.stderr)  # fmt: skip
        yield ()
        return
    with _pgbouncer.running(url, pool_size=POOL_SIZE) as bouncer:
        os.environ[PGBOUNCER_URL] = bouncer.url  # the contenders' servers inherit it
        yield (THROUGH_PGBOUNCER,)


if __name__ == "__main__":
    cli(__doc__, CONTENDERS, ["/select/42", "/tx/42", "/nodb"], rounds=20, more=through_pgbouncer)
