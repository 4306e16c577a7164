"""Liveness and readiness probes: they tell the truth and do not disturb the pool."""

import asyncio
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from fastapi_dbpool import _cleanup, health_router

from .conftest import Server, make_db, serve

pytestmark = pytest.mark.anyio


def health_app() -> FastAPI:
    app = FastAPI()
    app.include_router(health_router(probe_timeout=0.3))
    return app


async def test_liveness_needs_no_database_and_readiness_runs_a_query(
    database_url: str, app_name: str
) -> None:
    db = make_db(database_url, app_name, min_size=1, max_size=2)
    async with serve(health_app(), db) as client:
        before = db.pool.get_stats().get("requests_num", 0)
        live = await client.get("/livez")
        assert live.status_code == 200
        assert db.pool.get_stats().get("requests_num", 0) == before  # no checkout
        ready = await client.get("/readyz")
        assert ready.status_code == 200
        body = ready.json()
        assert body["status"] == "ready"
        assert set(body["pool"]) == {"size", "available", "waiting", "errors"}
        assert db.pool.get_stats()["requests_num"] == before + 1
        for response in (live, ready):
            assert "postgres" not in response.text  # neither user, host nor database


async def test_readiness_is_503_with_the_reason_when_no_connection_can_be_had(
    database_url: str, app_name: str
) -> None:
    db = make_db(database_url, app_name, min_size=1, max_size=1)
    async with serve(health_app(), db) as client, db.connection():
        response = await client.get("/readyz")
        assert response.status_code == 503
        assert response.json()["reason"] == "no connection within 0.3s"
        assert response.json()["pool"]["available"] == 0


async def test_readiness_is_503_when_no_pool_runs() -> None:
    transport = httpx.ASGITransport(app=health_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/readyz")
    assert response.status_code == 503
    assert response.json() == {
        "status": "not ready",
        "pool": {},
        "pools": {},
        "reason": "the pool is not running",
    }


async def test_readiness_turns_503_before_the_pool_closes(
    database_url: str, app_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = make_db(database_url, app_name, min_size=1, max_size=2)
    app = health_app()
    seen: list[tuple[int, str, bool]] = []
    close_pool = _cleanup.close_pool

    async def probe_then_close(pool: Any, timeout: float) -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as probe:
            response = await probe.get("/readyz")
        seen.append((response.status_code, response.json()["reason"], pool.closed))
        await close_pool(pool, timeout)

    monkeypatch.setattr(_cleanup, "close_pool", probe_then_close)
    async with serve(app, db) as client:
        assert (await client.get("/readyz")).status_code == 200
    assert seen == [(503, "shutting down", False)]


async def test_a_readiness_probe_never_grows_an_idle_pool(
    database_url: str, server: Server, app_name: str
) -> None:
    """psycopg_pool's pool.check() adds a connection per call: a probe using it every few
    seconds grew an idle pool to max_size. A probe every 100 ms for a minute leaves the
    pool at its idle size."""
    db = make_db(database_url, app_name, min_size=2, max_size=10)
    async with serve(health_app(), db) as client:
        for _ in range(600):
            assert (await client.get("/readyz")).status_code == 200
            await asyncio.sleep(0.1)
        assert db.pool.get_stats()["pool_size"] == 2
        assert len(server.states()) == 2
