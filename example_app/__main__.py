"""``python -m example_app``: serve the example on 127.0.0.1:8000.

Uses ``DATABASE_URL`` when it is set; otherwise starts a throwaway embedded PostgreSQL
(deleted on exit). ``PORT`` changes the port.
"""

import logging
import os
import signal
import sys

import uvicorn

from fastapi_dbpool import DBPool
from fastapi_dbpool.testing import database_url

from .app import create_app, replicas_from_env


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not os.environ.get("DATABASE_URL"):
        print("example_app: starting an embedded PostgreSQL (DATABASE_URL unset)", flush=True)
    host, port = "127.0.0.1", int(os.environ.get("PORT", "8000"))
    # uvicorn re-raises SIGTERM once it has shut down; exit normally so the embedded
    # PostgreSQL is stopped by the `with` below
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with database_url() as url:
        db = DBPool.from_env({**os.environ, "DATABASE_URL": url}, min_size=1, writable=True)
        app = create_app(db, *replicas_from_env())
        print(f"example_app: listening on http://{host}:{port} (try /items, /docs)", flush=True)
        uvicorn.run(app, host=host, port=port, log_level="info")


if __name__ == "__main__":
    main()
