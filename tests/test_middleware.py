"""CancellationMiddleware, ASGI level: scripted `receive`, recorded `send`, real PostgreSQL."""

import asyncio
import contextvars
import gc
import json
import logging
import weakref
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, cast

import anyio
import psycopg
import pytest
from fastapi import BackgroundTasks, FastAPI, Request
from fastapi.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from fastapi_dbpool import (
    CancellationMiddleware,
    ConfigurationError,
    ConnectionDep,
    DBPool,
    DeadlineExceededError,
    PoolExhaustedError,
    StreamTransactionDep,
    TransactionDep,
    _log,
    _watcher,
    deadline,
)
from fastapi_dbpool._deadline import RequestControl, current_control
from fastapi_dbpool._log import Bursts
from fastapi_dbpool._watcher import Watcher

from .conftest import Server, make_db, pid_of

pytestmark = pytest.mark.anyio

DISCONNECT: Message = {"type": "http.disconnect"}


def body(chunk: bytes, more: bool = False) -> Message:
    return {"type": "http.request", "body": chunk, "more_body": more}


class Client:
    """A scripted ASGI client. `steps` are messages to hand out, pauses (seconds) or events to
    wait for; then, like a server, nothing until the response is complete, then a disconnect.
    After a disconnect every receive() is a disconnect."""

    def __init__(self, *steps: Message | float | asyncio.Event) -> None:
        self.steps = deque(steps)
        self.sent: list[Message] = []
        self.receive_calls = 0
        self.complete = asyncio.Event()
        self.gone = False

    async def receive(self) -> Message:
        self.receive_calls += 1
        while self.steps and not self.gone:
            step = self.steps.popleft()
            if isinstance(step, asyncio.Event):
                await step.wait()
            elif isinstance(step, (int, float)):
                await asyncio.sleep(step)
            else:
                self.gone = step["type"] == "http.disconnect"
                return step
        if not self.gone:
            await self.complete.wait()
        return DISCONNECT

    async def send(self, message: Message) -> None:
        self.sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self.complete.set()

    @property
    def status(self) -> int | None:
        starts = [m["status"] for m in self.sent if m["type"] == "http.response.start"]
        assert len(starts) <= 1, self.sent
        return starts[0] if starts else None

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")

    @property
    def finished(self) -> bool:
        return self.complete.is_set()


def scope(path: str, method: str = "GET", headers: dict[str, str] | None = None) -> Scope:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
        "client": ("127.0.0.1", 1234),
        "server": ("127.0.0.1", 80),
    }


async def call(app: Any, client: Client, path: str, **kw: Any) -> None:
    with anyio.fail_after(15):
        await app(scope(path, **kw), client.receive, client.send)


async def until(predicate: Any, timeout: float = 10.0) -> Any:
    """Poll `predicate` (run in a thread: it may query PostgreSQL) until it is truthy."""
    with anyio.fail_after(timeout):
        while not (result := await anyio.to_thread.run_sync(predicate)):
            await asyncio.sleep(0.02)
    return result


def active(server: Server) -> list[str]:
    return [s for s in server.states() if s not in ("idle", "")]


def db_app(db: DBPool, **middleware: Any) -> FastAPI:
    """A small app of slow endpoints, behind the middleware."""
    app = FastAPI(lifespan=db.lifespan)
    app.add_middleware(CancellationMiddleware, **middleware)
    app.state.reached = []

    @app.get("/sleep")
    async def sleep(conn: ConnectionDep) -> None:
        await conn.execute("SELECT pg_sleep(30)")
        app.state.reached.append("sleep")

    @app.post("/write")
    async def write(request: Request, tx: TransactionDep) -> None:
        await request.body()
        await tx.execute("INSERT INTO mw_rows VALUES ('write')")
        await tx.execute("SELECT pg_sleep(30)")
        app.state.reached.append("write")

    @app.get("/pid")
    async def pid(conn: ConnectionDep) -> int:
        return await pid_of(conn)

    @app.get("/timeout", dependencies=[deadline(2)])
    async def timeout(conn: ConnectionDep) -> str:
        cur = await conn.execute("SELECT current_setting('statement_timeout')")
        row = await cur.fetchone()
        assert row is not None
        return str(row[0])

    @app.get("/stream")
    async def stream(tx: StreamTransactionDep) -> StreamingResponse:
        async def rows() -> AsyncIterator[bytes]:
            for n in range(1000):
                await tx.execute("INSERT INTO mw_rows VALUES ('stream')")
                yield f"{n}\n".encode()
                await asyncio.sleep(0.01)

        return StreamingResponse(rows())

    return app


@pytest.fixture
async def table(database_url: str) -> AsyncIterator[str]:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute("CREATE TABLE IF NOT EXISTS mw_rows (src text)")
        await conn.execute("TRUNCATE mw_rows")
        yield "mw_rows"


def rows(server: Server) -> list[str]:
    return [r[0] for r in server.query("SELECT src FROM mw_rows")]


async def test_lifespan_and_websocket_scopes_pass_through_untouched() -> None:
    seen: list[tuple[str, Receive, Send]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append((scope["type"], receive, send))

    middleware = CancellationMiddleware(app, timeout=0.01)
    client = Client()
    for kind in ("lifespan", "websocket"):
        await middleware({"type": kind}, client.receive, client.send)
    assert seen == [
        ("lifespan", client.receive, client.send),
        ("websocket", client.receive, client.send),
    ]


async def test_the_body_reaches_the_app_whole_and_in_order_during_a_slow_upload() -> None:
    """Watching for a disconnect must not steal body messages, whatever the read-ahead."""
    chunks = [bytes([65 + n]) * 100 for n in range(8)]
    for read_ahead in (0, 150, 1 << 20):
        app = FastAPI()
        app.add_middleware(CancellationMiddleware, timeout=5, read_ahead=read_ahead)

        @app.post("/upload")
        async def upload(request: Request) -> dict[str, Any]:
            await asyncio.sleep(0.05)  # the middleware reads ahead meanwhile
            got = [chunk async for chunk in request.stream() if chunk]
            return {"n": len(got), "body": b"".join(got).decode()}

        steps: list[Message | float] = []
        for n, chunk in enumerate(chunks):
            steps += [0.01, body(chunk, more=n < len(chunks) - 1)]
        client = Client(*steps)
        await call(app, client, "/upload", method="POST")
        assert client.status == 200, read_ahead
        assert json.loads(client.body)["body"] == b"".join(chunks).decode(), read_ahead


async def test_a_client_gone_before_the_body_cancels_the_handler_and_gets_nothing() -> None:
    app = FastAPI()
    app.add_middleware(CancellationMiddleware)
    ran: list[str] = []

    @app.post("/echo")
    async def echo(request: Request) -> None:
        await request.body()
        ran.append("after body")

    for steps in ([DISCONNECT], [body(b"x" * 10, more=True), 0.02, DISCONNECT]):
        client = Client(*steps)
        await call(app, client, "/echo", method="POST")
        assert client.sent == []
    assert ran == []


async def test_a_client_gone_mid_query_stops_the_query_on_the_server(
    database_url: str, server: Server, app_name: str
) -> None:
    """uvicorn never cancels a handler whose client left: its query ran on in PostgreSQL."""
    db = make_db(database_url, app_name, min_size=1, max_size=1)
    app = db_app(db)
    async with db.lifespan(app):
        first = Client(body(b""))
        await call(app, first, "/pid")
        gone = asyncio.Event()
        client = Client(body(b""), gone, DISCONNECT)
        request = asyncio.create_task(call(app, client, "/sleep"))
        await until(lambda: active(server))
        gone.set()
        await request
        assert client.sent == []
        assert app.state.reached == []
        assert server.states() == ["idle"]  # stopped at once, not when pg_sleep(30) ends
        again = Client(body(b""))
        await call(app, again, "/pid")
        assert again.body == first.body  # the same backend: reused, not closed


async def test_a_deadline_answers_504_rolls_back_and_stops_the_query(
    database_url: str, server: Server, app_name: str, table: str
) -> None:
    db = make_db(database_url, app_name, min_size=1, max_size=1)
    app = db_app(db, timeout=0.5)
    async with db.lifespan(app):
        client = Client(body(b"payload"))
        await call(app, client, "/write", method="POST")
        assert client.status == 504
        assert json.loads(client.body) == {
            "detail": "The request did not complete within its deadline."
        }
        assert app.state.reached == []
        assert server.states() == ["idle"]
        assert rows(server) == []


async def test_the_server_is_cancelled_first_even_where_the_task_cannot_be(
    database_url: str, server: Server, app_name: str
) -> None:
    """A query awaited under a shield (or by a task out of the request's scope) ignores the
    task's cancellation; cancelled in PostgreSQL first, it ends, and so does the request.
    (No deadline here: the statement_timeout a deadline sets would end the query too.)"""
    db = make_db(database_url, app_name, min_size=1, max_size=1)
    app = db_app(db, timeout=None)

    @app.get("/shielded")
    async def shielded(conn: ConnectionDep) -> None:
        with anyio.CancelScope(shield=True):
            await conn.execute("SELECT pg_sleep(30)")

    async with db.lifespan(app):
        client = Client(body(b""), 0.3, DISCONNECT)
        with anyio.fail_after(5):  # not the 30 s of pg_sleep
            await call(app, client, "/shielded")
        assert client.sent == []
        assert server.states() == ["idle"]


async def test_a_route_deadline_becomes_the_statement_timeout_and_is_undone_after(
    database_url: str, app_name: str
) -> None:
    db = make_db(database_url, app_name, min_size=1, max_size=1)
    app = db_app(db, timeout=30)
    async with db.lifespan(app):
        client = Client(body(b""))
        await call(app, client, "/timeout")
        assert json.loads(client.body) == "2100ms"  # 2 s, plus 0.1 s for the middleware to act
        async with db.connection() as conn:  # outside any request: the session's own value
            cur = await conn.execute("SELECT current_setting('statement_timeout')")
            assert await cur.fetchone() == ("0",)


async def test_a_deadline_never_loosens_the_sessions_own_statement_timeout(
    database_url: str, app_name: str
) -> None:
    db = make_db(
        database_url,
        app_name,
        min_size=1,
        max_size=1,
        kwargs={"options": "-c statement_timeout=1500"},
    )
    app = db_app(db, timeout=30)
    async with db.lifespan(app):
        client = Client(body(b""))
        await call(app, client, "/timeout")
        assert json.loads(client.body) == "1500ms"


async def test_the_deadline_reaches_postgresql_even_where_nothing_else_acts(
    database_url: str, app_name: str
) -> None:
    """Without the middleware's timer (a blocked loop, a task out of reach), PostgreSQL's own
    statement_timeout still stops a statement at the deadline (plus 0.1 s, rounded up)."""
    db = make_db(database_url, app_name, min_size=1, max_size=1)
    async with db.lifespan(FastAPI()):
        token = current_control.set(RequestControl(0.45, None))
        try:
            async with db.connection() as conn:
                with pytest.raises(psycopg.errors.QueryCanceled, match="statement timeout"):
                    await conn.execute("SELECT pg_sleep(5)")
                cur = await conn.execute("SELECT current_setting('statement_timeout')")
                assert await cur.fetchone() == ("600ms",)
        finally:
            current_control.reset(token)


async def test_the_deadline_bounds_the_wait_for_a_connection(
    database_url: str, app_name: str
) -> None:
    db = make_db(database_url, app_name, min_size=1, max_size=1, acquire_timeout=30)
    async with db.lifespan(FastAPI()), db.connection():
        token = current_control.set(RequestControl(0.2, None))
        try:
            with anyio.fail_after(5), pytest.raises(DeadlineExceededError) as info:
                async with db.connection():
                    pass
            assert info.value.status_code == 504
            assert not isinstance(info.value, PoolExhaustedError)
        finally:
            current_control.reset(token)


async def test_a_stream_cut_by_its_client_rolls_back_its_transaction(
    database_url: str, server: Server, app_name: str, table: str
) -> None:
    db = make_db(database_url, app_name, min_size=1, max_size=1)
    app = db_app(db)
    async with db.lifespan(app):
        client = Client(body(b""), 0.3, DISCONNECT)
        await call(app, client, "/stream")
        assert client.status == 200
        assert not client.finished
        assert client.body.count(b"\n") > 3  # it streamed for a while
        assert rows(server) == []
        assert server.wait_until(lambda s: s == ["idle"]) == ["idle"]


async def test_a_stream_cut_by_its_deadline_is_ended_and_rolled_back(
    database_url: str, server: Server, app_name: str, table: str
) -> None:
    db = make_db(database_url, app_name, min_size=1, max_size=1)
    app = db_app(db, timeout=0.3)
    async with db.lifespan(app):
        client = Client(body(b""))
        await call(app, client, "/stream")
        assert client.status == 200
        assert client.finished  # the body was ended, well-formed
        lines = client.body.decode().split()
        assert 3 < len(lines) < 1000
        assert lines == [str(n) for n in range(len(lines))]
        assert rows(server) == []


async def test_a_completed_stream_commits(
    database_url: str, server: Server, app_name: str, table: str
) -> None:
    db = make_db(database_url, app_name, min_size=1, max_size=1)
    app = FastAPI(lifespan=db.lifespan)
    app.add_middleware(CancellationMiddleware)

    @app.get("/stream")
    async def stream(tx: StreamTransactionDep) -> StreamingResponse:
        async def rows() -> AsyncIterator[bytes]:
            for n in range(3):
                await tx.execute("INSERT INTO mw_rows VALUES ('done')")
                yield b"%d\n" % n

        return StreamingResponse(rows())

    async with db.lifespan(app):
        client = Client(body(b""))
        await call(app, client, "/stream")
        assert client.body == b"0\n1\n2\n"
    assert rows(server) == ["done"] * 3


async def test_after_the_response_nothing_is_watched_or_cancelled() -> None:
    """BackgroundTasks run after the response: the deadline and disconnects no longer apply."""
    app = FastAPI()
    app.add_middleware(CancellationMiddleware, timeout=0.1)
    done: list[int] = []

    async def job() -> None:
        await asyncio.sleep(0.3)
        done.append(client.receive_calls)

    @app.get("/")
    async def index(background: BackgroundTasks) -> str:
        background.add_task(job)
        return "ok"

    client = Client(body(b""))
    await call(app, client, "/")
    assert client.status == 200
    assert len(done) == 1  # not cancelled by the 0.1 s deadline
    assert done == [client.receive_calls]  # and receive() was not called again meanwhile


async def test_users_see_their_own_exception_never_a_group() -> None:
    app = FastAPI()
    app.add_middleware(CancellationMiddleware)

    @app.get("/")
    async def index() -> None:
        raise LookupError("mine")

    with pytest.raises(LookupError, match="mine") as info:
        await call(app, Client(body(b"")), "/")
    assert type(info.value) is LookupError


async def test_a_statement_timeout_of_the_apps_own_is_its_error_not_a_cut(
    database_url: str, server: Server, app_name: str
) -> None:
    """The middleware takes a QueryCanceled as its own cut only when it cut the request or
    the deadline has passed; a statement the app bounded itself, long before the deadline,
    fails as the app's own error (FastAPI's 500), is not counted as a cut, and leaves no
    query running."""
    db = make_db(database_url, app_name, min_size=1, max_size=1)
    app = db_app(db, timeout=30)

    @app.get("/own-timeout")
    async def own_timeout(tx: TransactionDep) -> None:
        await tx.execute("SET LOCAL statement_timeout = 50")
        await tx.execute("SELECT pg_sleep(5)")

    async with db.lifespan(app):
        with pytest.raises(psycopg.errors.QueryCanceled, match="statement timeout"):
            await call(app, Client(body(b"")), "/own-timeout")
        assert db.stats().cancelled_requests == 0
        assert server.states() == ["idle"]


async def test_a_gateway_header_shortens_the_deadline_but_never_lengthens_it() -> None:
    app = FastAPI()
    app.add_middleware(CancellationMiddleware, timeout=0.5, timeout_header="X-Request-Timeout")

    @app.get("/wait/{seconds}")
    async def wait(seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "done"

    short = Client(body(b""))
    await call(app, short, "/wait/0.3", headers={"X-Request-Timeout": "0.1"})
    assert short.status == 504
    long = Client(body(b""))
    await call(app, long, "/wait/1", headers={"X-Request-Timeout": "10"})
    assert long.status == 504
    bad = Client(body(b""))
    await call(app, bad, "/wait/0", headers={"X-Request-Timeout": "soon"})
    assert bad.status == 400
    assert "X-Request-Timeout" in json.loads(bad.body)["detail"]
    assert "soon" in json.loads(bad.body)["detail"]


async def test_a_burst_of_cut_requests_is_one_log_line_with_a_count(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst cut 44 requests and logged 44 INFO lines: an outage drowned the log."""
    monkeypatch.setattr(_watcher, "_cut_bursts", Bursts())
    app = FastAPI()
    app.add_middleware(CancellationMiddleware, timeout=0.05)

    @app.get("/slow")
    async def slow() -> None:
        await asyncio.sleep(1)

    clients = [Client(body(b"")) for _ in range(20)]
    with caplog.at_level(logging.INFO, logger="fastapi_dbpool"):
        await asyncio.gather(*(call(app, c, "/slow") for c in clients))
        assert [c.status for c in clients] == [504] * 20
        lines = [r for r in caplog.records if getattr(r, "dbpool_event", "") == "request_cancelled"]
        assert len(lines) == 1
        monkeypatch.setattr(_log, "BURST", 0.0)  # the burst is over: the next line counts it
        late = Client(body(b""))
        await call(app, late, "/slow")
    lines = [r for r in caplog.records if getattr(r, "dbpool_event", "") == "request_cancelled"]
    assert len(lines) == 2
    assert "19 more since the last line like it" in lines[1].getMessage()
    assert getattr(lines[1], "dbpool_held_back", None) == 19


async def test_deadline_without_the_middleware_is_a_clear_error() -> None:
    app = FastAPI()

    @app.get("/", dependencies=[deadline(5)])
    async def index() -> None:
        pass

    with pytest.raises(ConfigurationError, match="add_middleware"):
        await call(app, Client(body(b"")), "/")
    with pytest.raises(ConfigurationError, match="positive"):
        deadline(0)
    with pytest.raises(ConfigurationError, match="positive"):
        CancellationMiddleware(app, timeout=-1)


async def test_a_stream_transaction_cannot_be_combined_with_the_request_connection(
    database_url: str, app_name: str
) -> None:
    db = make_db(database_url, app_name, min_size=1, max_size=2)
    app = FastAPI(lifespan=db.lifespan)

    @app.get("/both")
    async def both(conn: ConnectionDep, tx: StreamTransactionDep) -> None:
        pass

    async with db.lifespan(app):
        with pytest.raises(ConfigurationError, match="StreamTransactionDep alone"):
            await call(app, Client(body(b"")), "/both")
        stats = db.pool.get_stats
        await until(lambda: stats()["pool_available"] == stats()["pool_size"] > 0)


async def test_a_route_deadline_replaces_the_default_in_both_directions() -> None:
    app = FastAPI()
    app.add_middleware(CancellationMiddleware, timeout=0.1)

    @app.get("/long", dependencies=[deadline(5)])
    async def long() -> str:
        await asyncio.sleep(0.3)
        return "done"

    @app.get("/unbounded", dependencies=[deadline(None)])
    async def unbounded() -> str:
        await asyncio.sleep(0.3)
        return "done"

    @app.get("/short", dependencies=[deadline(0.05)])
    async def short() -> str:
        await asyncio.sleep(0.08)  # within the default, past the route's own budget
        return "done"

    for path, status in (("/long", 200), ("/unbounded", 200), ("/short", 504)):
        client = Client(body(b""))
        await call(app, client, path)
        assert client.status == status, path


async def test_budgets_that_straddle_a_rounding_step_cost_no_set(database_url: str) -> None:
    """Requests that waited a little longer for the pool have a little less budget: the
    setting flipped between two steps and every request paid a SET round trip."""
    from fastapi_dbpool._connection import GuardedConnection
    from fastapi_dbpool._deadline import apply_statement_timeout

    async def setting(conn: GuardedConnection) -> str:
        cur = await conn.execute("SELECT current_setting('statement_timeout')")
        row = await cur.fetchone()
        assert row is not None
        return str(row[0])

    conn = await GuardedConnection.connect(database_url, autocommit=True)
    async with conn:
        await apply_statement_timeout(conn, 29.95)  # 30.05 s, rounded up to 31 s
        assert await setting(conn) == "31s"
        await apply_statement_timeout(conn, 29.85)  # 29.95 s would round to 30 s: 31 s is kept
        assert await setting(conn) == "31s"
        await apply_statement_timeout(conn, 5.0)  # far tighter: set again
        assert await setting(conn) == "5100ms"
        await apply_statement_timeout(conn, None)  # outside deadlines: the session's own
        assert await setting(conn) == "0"


async def test_a_checkout_of_the_same_budget_asks_nothing_and_any_other_asks_again(
    database_url: str,
) -> None:
    """Each checkout under the middleware ran the whole statement_timeout step (a coroutine
    and the rounding) just to find the setting right: a tenth of the middleware's cost."""
    from fastapi_dbpool._connection import GuardedConnection
    from fastapi_dbpool._deadline import UNKNOWN_TIMEOUT, apply_statement_timeout, timeout_fits

    conn = await GuardedConnection.connect(database_url, autocommit=True)
    async with conn:
        assert not timeout_fits(conn, 29.95)  # nothing known yet
        await apply_statement_timeout(conn, 29.95)  # 31 s
        assert timeout_fits(conn, 29.95)
        assert timeout_fits(conn, 30.85)  # also 31 s
        assert not timeout_fits(conn, 29.85)  # 30 s: kept by `apply_statement_timeout` only
        assert not timeout_fits(conn, 5.0)
        conn._dbpool_timeout_ms = UNKNOWN_TIMEOUT  # e.g. a rolled-back SET
        assert not timeout_fits(conn, 29.95)


def test_the_budgets_that_fit_a_setting_are_those_rounded_to_it() -> None:
    """`timeout_fits` skips `_timeout_ms` for budgets in the same step: every budget in the
    step it remembers must round to the same setting, across both step sizes."""
    from fastapi_dbpool._deadline import _bucket, _timeout_ms

    budgets = [k / 1000 for k in range(0, 40_000, 7)] + [9.8 + k / 10_000 for k in range(2000)]
    inside = 0
    for budget in budgets:
        low, high = _bucket(budget)
        want = _timeout_ms(budget)[0]
        if low < budget < high:  # not so on a step's very edge: the slow path decides
            inside += 1
        for other in (low + 2e-6, (low + high) / 2, high - 2e-6):
            if low < other < high:
                assert _timeout_ms(other)[0] == want, (budget, other)
    assert inside > 0.95 * len(budgets)


async def test_what_outlives_a_request_holds_none_of_its_objects(
    database_url: str, app_name: str
) -> None:
    """psycopg copies the request's context into a timer at every wait, and asyncio keeps the
    copy for a while after the request. The middleware's control and the request's lease live
    in that context: they kept the whole ASGI scope alive, and the request's task in a cycle,
    so every request left objects for the cyclic GC (whose collections cost the app ~10%)."""
    db = make_db(database_url, app_name)
    app = db_app(db)
    kept: list[contextvars.Context] = []

    @app.get("/kept")
    async def keep(conn: ConnectionDep) -> None:
        await conn.execute("SELECT 1")
        kept.append(contextvars.copy_context())  # as psycopg's timer does

    class Marker:
        pass

    async with db.lifespan(app):
        client = Client(body(b""))
        request_scope = scope("/kept")
        request_scope["marker"] = marker = Marker()
        gc.disable()  # what is freed must be freed as the request ends, not by a collection
        try:
            task = asyncio.create_task(app(request_scope, client.receive, client.send))
            await task
            assert client.status == 200
            task_ref, marker_ref = weakref.ref(task), weakref.ref(marker)
            del task, marker, request_scope
            await asyncio.sleep(0)  # the loop's own callbacks about the task run
            assert len(kept) == 1  # the context is still held
            assert marker_ref() is None, "the request's scope outlived the request"
            assert task_ref() is None, "the request's task outlived the request"
            control = kept[0][current_control]
            assert isinstance(control, Watcher)
            assert control.cancel_scope is None, "the request's cancel scope outlived it"
        finally:
            gc.enable()


def test_a_request_control_holds_every_lease_taken_for_it() -> None:
    """A request's leases are kept in one slot, and a set only from the second on (a set
    for every request was a tenth of the middleware's garbage-collector cost): the ones
    past the first must still be found, or a cut would not cancel their statements."""
    from fastapi_dbpool._connection import Lease

    control = RequestControl(1.0, None)
    first, second, third = (Lease(cast(Any, None), None, False, 1.0) for _ in range(3))
    control.hold(first)
    control.hold(second)
    assert control.held() == [first, second]
    control.drop(first)
    assert control.held() == [second]
    control.hold(third)
    assert set(control.held()) == {second, third}
    control.drop(second)
    control.drop(third)
    assert control.held() == []


@pytest.mark.timeout(20)
async def test_a_server_that_answers_receive_at_once_forever_does_not_freeze_the_loop() -> None:
    """Out of spec, a server whose receive() hands out empty body messages at once instead
    of waiting for the client: watching for a disconnect read them ahead without ever
    yielding (no bytes to count), froze the event loop, and buffered without end."""
    calls = 0

    async def receive() -> Message:
        nonlocal calls
        calls += 1
        return body(b"")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await asyncio.sleep(0.5)  # past the point where watching for a disconnect starts
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})

    client = Client()
    with anyio.fail_after(10):
        await CancellationMiddleware(app)(scope("/"), receive, client.send)
    assert client.status == 200
    assert client.body == b"done"
    assert calls <= 100
