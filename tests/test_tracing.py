"""OpenTelemetry's psycopg instrumentation sees the app's statements, not the package's own.

The middleware's housekeeping (reading the session's statement_timeout, setting and
restoring it) and the checkout's liveness probe showed as spans of their own, one of them
a root trace outside any request.
"""

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from fastapi import FastAPI
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from fastapi_dbpool import (
    CancellationMiddleware,
    ConfigurationError,
    ConnectionDep,
    TransactionDep,
    deadline,
)

from .conftest import Server, make_db, serve

pytestmark = pytest.mark.anyio


@pytest.fixture
def provider() -> TracerProvider:
    return TracerProvider()


@pytest.fixture
def restore_connect() -> Iterator[None]:
    """Put psycopg's connect classmethods back: uninstrument() leaves bound methods."""
    saved = {cls: vars(cls)["connect"] for cls in (psycopg.Connection, psycopg.AsyncConnection)}
    try:
        yield
    finally:
        for cls, connect in saved.items():
            cls.connect = connect  # type: ignore[method-assign]


@pytest.fixture
def spans(provider: TracerProvider, restore_connect: None) -> Iterator[InMemorySpanExporter]:
    """Every span, psycopg's and the requests', as the usual set-up records them."""
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    PsycopgInstrumentor().instrument(tracer_provider=provider)
    try:
        yield exporter
    finally:
        PsycopgInstrumentor().uninstrument()


def _statement(span: ReadableSpan) -> str:
    attributes: Any = span.attributes or {}
    return str(attributes.get("db.statement", attributes.get("db.query.text", span.name)))


async def test_only_the_apps_statements_are_traced_each_in_its_request(
    database_url: str,
    app_name: str,
    server: Server,
    provider: TracerProvider,
    spans: InMemorySpanExporter,
) -> None:
    db = make_db(database_url, app_name, min_size=1, max_size=1)
    app = FastAPI(lifespan=db.lifespan)

    @app.get("/read", dependencies=[deadline(3)])
    async def read(conn: ConnectionDep) -> int:
        row = await (await conn.execute("SELECT 41 + 1")).fetchone()
        assert row is not None
        return int(row[0])

    @app.post("/write")
    async def write(tx: TransactionDep) -> None:
        await tx.execute("SELECT 'written'")

    app.add_middleware(CancellationMiddleware, timeout=10)
    app.add_middleware(OpenTelemetryMiddleware, tracer_provider=provider)
    async with serve(app, db) as client:
        assert (await client.get("/read")).json() == 42
        assert (await client.post("/write")).status_code == 200
        assert (await client.get("/read")).json() == 42
        # the next checkout probes a dead connection, then opens a new one
        assert server.terminate_idle() == 1
        assert (await client.get("/read")).json() == 42
        # outside any request: the connection's deadline setting is restored on checkout
        async with db.connection() as conn:
            await conn.execute("SELECT 'job'")
    finished = spans.get_finished_spans()
    queries = [
        s
        for s in finished
        if s.kind == SpanKind.CLIENT
        and s.name != "http send"
        and "pg_terminate_backend" not in _statement(s)  # the test's own, through psycopg.connect
    ]
    assert sorted(_statement(s) for s in queries) == sorted(
        ["SELECT 41 + 1"] * 3 + ["SELECT 'written'", "SELECT 'job'"]
    )
    requests = {s.context.trace_id for s in finished if s.kind == SpanKind.SERVER}
    assert len(requests) == 4
    in_requests = [s for s in queries if _statement(s) != "SELECT 'job'"]
    assert all(s.parent is not None and s.context.trace_id in requests for s in in_requests)


async def test_after_uninstrument_an_app_refuses_to_start_with_the_cause(
    database_url: str, app_name: str, server: Server, restore_connect: None
) -> None:
    """uninstrument() leaves AsyncConnection.connect bound to AsyncConnection: a pool would
    make unguarded connections, and fail at its first checkout."""
    PsycopgInstrumentor().instrument()
    PsycopgInstrumentor().uninstrument()
    db = make_db(database_url, app_name, min_size=1, max_size=1)
    app = FastAPI(lifespan=db.lifespan)
    with pytest.raises(ConfigurationError, match="no longer a classmethod"):
        async with db.lifespan(app):
            pass
    assert server.query(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", app_name
    ) == [(0,)]
