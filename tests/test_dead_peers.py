"""Dead-peer settings, a broken connection's answer, and a deadline that costs no round trip.

The network faults themselves are in test_network.py (a namespace of their own); these
run against the suite's server.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import psycopg
import pytest
from fastapi import FastAPI

from fastapi_dbpool import CancellationMiddleware, ConnectionDep, ConnectionLostError

from .conftest import Server, forward_to_server, make_db, pid_of, serve

pytestmark = pytest.mark.anyio


def _options(conn: psycopg.AsyncConnection[Any]) -> dict[str, str]:
    """The libpq options the connection was made with (PQconninfo)."""
    return {o.keyword.decode(): (o.val or b"").decode() for o in conn.pgconn.info}


async def test_dead_peer_settings_are_set_unless_the_user_chose(
    database_url: str, app_name: str
) -> None:
    """With libpq's defaults a silent server went unnoticed by idle connections for 2 hours
    (the kernel's keepalive), and a new connection into a partition waited 130 s."""
    url = database_url + ("&" if "?" in database_url else "?") + "connect_timeout=9"
    for db, connect_timeout in (
        (make_db(database_url, app_name), "5"),
        (make_db(url, app_name), "9"),  # the user's own, kept
        (make_db(database_url, app_name, kwargs={"keepalives_idle": 42}), "5"),
    ):
        async with db.lifespan(FastAPI()), db.connection() as conn:
            options = _options(conn)
        assert options["connect_timeout"] == connect_timeout
        assert options["keepalives"] == "1"
        assert options["keepalives_idle"] in ("5", "42")
        assert options["keepalives_interval"] == "2"
        assert options["keepalives_count"] == "3"
        assert options["tcp_user_timeout"] == "10000"
    assert options["keepalives_idle"] == "42"


async def test_a_connection_broken_under_a_statement_is_a_503_not_a_500(
    database_url: str, app_name: str, server: Server
) -> None:
    """A statement whose connection broke (a socket timeout, a server gone) raised psycopg's
    OperationalError through the endpoint: a 500 with a traceback."""
    db = make_db(database_url, app_name, min_size=1, max_size=1, retry_after=3)
    app = FastAPI(lifespan=db.lifespan)
    caught: list[BaseException] = []
    started = asyncio.Event()
    pids: list[int] = []

    @app.get("/sleep")
    async def sleep(conn: ConnectionDep) -> None:
        pids.append(await pid_of(conn))
        started.set()
        await conn.execute("SELECT pg_sleep(30)")

    @app.get("/caught")
    async def caught_here(conn: ConnectionDep) -> str:
        pids.append(await pid_of(conn))
        started.set()
        try:
            await conn.execute("SELECT pg_sleep(30)")
        except psycopg.OperationalError as ex:  # psycopg's own error still catches it
            caught.append(ex)
        return "handled"

    async with serve(app, db) as client:
        for path in ("/sleep", "/caught"):
            started.clear()
            request = asyncio.create_task(client.get(path))
            await asyncio.wait_for(started.wait(), 10)
            await asyncio.sleep(0.2)
            server.query("SELECT pg_terminate_backend(%s)", pids[-1])
            response = await asyncio.wait_for(request, 10)
            if path == "/sleep":
                assert response.status_code == 503
                assert response.headers["retry-after"] == "3"
                assert "lost" in response.json()["detail"]
            else:
                assert response.json() == "handled"
        (error,) = caught
        assert isinstance(error, ConnectionLostError)
        assert isinstance(error.__cause__, psycopg.OperationalError)
        # psycopg's own class and sqlstate too: `except AdminShutdown` still catches it
        assert isinstance(error, psycopg.errors.AdminShutdown)
        assert error.sqlstate == "57P01"
        stats = db.stats()
        assert stats.connections_lost == 2
        assert (await client.get("/nothing")).status_code == 404  # the app still serves
    assert server.wait_until(lambda states: states == []) == []


async def test_requests_of_one_route_share_one_statement_timeout_however_long_they_waited(
    database_url: str, app_name: str
) -> None:
    """The remaining budget, rounded to 0.1 s, differed from request to request under load:
    nearly every checkout paid a SET round trip, which on a slow link is what the deadline
    had to spare."""
    db = make_db(database_url, app_name, min_size=1, max_size=1)
    app = FastAPI(lifespan=db.lifespan)
    app.add_middleware(CancellationMiddleware, timeout=2)

    @app.get("/setting")
    async def setting(conn: ConnectionDep, hold: float = 0.0) -> Any:
        cur = await conn.execute(
            "SELECT current_setting('statement_timeout'), pg_backend_pid(), pg_sleep(%s)",
            (hold,),
        )
        row = await cur.fetchone()
        assert row is not None
        return [row[0], row[1]]

    async with serve(app, db) as client:
        first = (await client.get("/setting")).json()
        holder = asyncio.create_task(client.get("/setting", params={"hold": 0.5}))
        await asyncio.sleep(0.1)
        waited = (await client.get("/setting")).json()  # waited ~0.4 s for the connection
        await holder
    assert first[0] == waited[0] == "2100ms"  # the budget's, not the remaining 1.6 s
    assert first[1] == waited[1]


def test_dead_peer_defaults_are_documented_as_set() -> None:
    """docs/network.md's table is the package's own: a default changed in one place only
    would mislead the operator reading it."""
    from pathlib import Path

    from fastapi_dbpool._network import DEAD_PEER_DEFAULTS

    page = (Path(__file__).parent.parent / "docs" / "network.md").read_text()
    for key, value in DEAD_PEER_DEFAULTS.items():
        assert f"| `{key}` | `{value}`" in page, key


class _FallsSilent:
    """A TCP front for the suite's server: connections are forwarded until `silence()`; from
    then on a new one gets no answer at all (its SYN is dropped: the listener's accept queue
    is kept full), as a cancel request into a partition or through a firewall that drops it.
    Connections made before go on working."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(0)
        self.listener.setblocking(False)
        self.url = psycopg.conninfo.make_conninfo(
            database_url, host="127.0.0.1", port=self.listener.getsockname()[1]
        )
        self.fillers: list[socket.socket] = []
        self.tasks: list[asyncio.Task[Any]] = []

    def start(self) -> None:
        self.accepting = asyncio.create_task(self._accept())

    def silence(self) -> None:
        self.accepting.cancel()
        for _ in range(2):  # one waits in the accept queue, the next fills it
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(self.listener.getsockname())
            self.fillers.append(filler)

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            client, _ = await loop.sock_accept(self.listener)
            self.tasks.append(asyncio.create_task(self._forward(client)))

    async def _forward(self, client: socket.socket) -> None:
        reader, writer = await asyncio.open_connection(sock=client)
        await forward_to_server(self.database_url, reader, writer)

    def close(self) -> None:
        for task in (self.accepting, *self.tasks):
            task.cancel()
        for sock in (*self.fillers, self.listener):
            sock.close()


async def test_a_cancel_request_nobody_answers_does_not_stop_the_event_loop(
    database_url: str, app_name: str, server: Server
) -> None:
    """psycopg's cancel_safe() polled libpq's cancel connection before its socket was
    writable (psycopg #1335): with libpq 18.0 PQcancelPoll() then waited in a blocking
    poll(). Over a partition the whole loop stopped until tcp_user_timeout (10 s), and
    every request of the process missed its deadline."""
    front = _FallsSilent(database_url)
    front.start()
    db = make_db(
        front.url,
        app_name,
        min_size=1,
        max_size=1,
        release_timeout=1,
        close_timeout=1,  # its replacement keeps trying to connect into the silence
        kwargs={"connect_timeout": 1},
    )
    app = FastAPI(lifespan=db.lifespan)
    app.add_middleware(CancellationMiddleware, timeout=0.5)

    @app.get("/sleep")
    async def sleep(conn: ConnectionDep) -> Any:
        front.silence()  # the server's connections work on; the cancel request's cannot
        await conn.execute("SELECT pg_sleep(30)")

    gaps: list[float] = []

    async def heartbeat() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.02)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    try:
        async with serve(app, db) as client:
            beat = asyncio.create_task(heartbeat())
            response = await client.get("/sleep")
            await asyncio.sleep(1.5)  # the cancel request's whole timeout, and then some
            beat.cancel()
    finally:
        front.close()
    assert response.status_code == 504
    assert len(gaps) > 20
    assert max(gaps) < 0.5  # the loop never stopped
    # the connection that could not be cancelled was closed: its statement ended with it
    assert server.wait_until(lambda states: states == []) == []
