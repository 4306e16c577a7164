"""A real PgBouncer (Debian's package) in front of a PostgreSQL, on 127.0.0.1: for the
tests of transaction-pooler mode and the benchmark row through PgBouncer."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ._runner import free_port

POOL_SIZE = 4  # server connections per database and user: fewer than the tests' max_size


def binary() -> str | None:
    return shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.path.exists(p)), None
    )


class PgBouncer:
    """One running PgBouncer: `url` reaches the server's database through it."""

    def __init__(self, url: str, admin_url: str, pid: int, log: str) -> None:
        self.url = url
        self.admin_url = admin_url
        self.pid = pid
        self.log = log

    def admin(self, command: str) -> list[dict[str, Any]]:
        """A SHOW (or KILL, RECONNECT...) on PgBouncer's admin console, as dicts."""
        with psycopg.connect(
            self.admin_url, autocommit=True, cursor_factory=psycopg.ClientCursor
        ) as conn:
            cur = conn.execute(command)
            if cur.description is None:
                return []
            names = [c.name for c in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def pool(self, database: str) -> dict[str, Any]:
        """PgBouncer's SHOW POOLS row for `database`."""
        rows = [r for r in self.admin("SHOW POOLS") if r["database"] == database]
        assert len(rows) == 1, rows
        return rows[0]


@contextlib.contextmanager
def running(server_url: str, pool_size: int = POOL_SIZE, settings: str = "") -> Iterator[PgBouncer]:
    """PgBouncer in transaction mode for every database of `server_url`'s server, with
    `pool_size` server connections per database and user, and `settings` (ini lines).

    It listens on 127.0.0.1 only and is stopped by its PID. As root it runs as the user
    that owns PostgreSQL's socket directory (PgBouncer refuses to run as root).
    """
    exe = binary()
    assert exe is not None
    params = conninfo_to_dict(server_url)
    host = str(params.get("host") or "127.0.0.1")
    user = str(params.get("user") or "postgres")
    target = make_conninfo(
        "", host=host, port=str(params.get("port") or 5432), password=params.get("password")
    )
    workdir = tempfile.mkdtemp(prefix="dbpool-pgbouncer-")
    os.chmod(workdir, 0o755)
    port = free_port()
    files = {
        "users.txt": f'"{user}" ""\n',
        "pgbouncer.ini": f"""[databases]
* = {target}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {workdir}/users.txt
admin_users = {user}
pool_mode = transaction
default_pool_size = {pool_size}
max_client_conn = 2000
server_login_retry = 1
{settings}""",
    }
    for name, text in files.items():
        with open(os.path.join(workdir, name), "w") as f:
            f.write(text)
        os.chmod(os.path.join(workdir, name), 0o644)
    command = [exe, os.path.join(workdir, "pgbouncer.ini")]
    if os.getuid() == 0:
        owner = os.stat(host).st_uid if host.startswith("/") else pwd.getpwnam("nobody").pw_uid
        command[1:1] = ["-u", pwd.getpwuid(owner).pw_name]
    log = os.path.join(workdir, "pgbouncer.log")
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    url = make_conninfo(
        "", host="127.0.0.1", port=str(port), user=user, dbname=params.get("dbname") or user
    )
    bouncer = PgBouncer(url, make_conninfo(url, dbname="pgbouncer"), proc.pid, log)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                bouncer.admin("SHOW VERSION")
                break
            except psycopg.OperationalError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    with open(log) as f:
                        raise RuntimeError(f"pgbouncer did not start:\n{f.read()}") from None
                time.sleep(0.05)
        yield bouncer
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)
