"""Liveness and readiness endpoints, in the container platforms' convention."""

from __future__ import annotations

from typing import Any

import psycopg
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from . import _dsn
from ._state import PoolRuntime, runtime_of
from .errors import DBPoolError

_FIGURES = {
    "size": "pool_size",
    "available": "pool_available",
    "waiting": "requests_waiting",
    "errors": "connections_errors",
}


def health_router(*, probe_timeout: float = 1.0, prefix: str = "") -> APIRouter:
    """``GET /livez`` and ``GET /readyz`` for the app's running pool.

    ``app.include_router(health_router())``. Liveness answers 200 without touching the
    database: if the loop can answer, the process is alive. Readiness answers 200 when the
    pool is running, a connection can be had within `probe_timeout` seconds and ``SELECT 1``
    answers; otherwise 503 with the reason. Both bodies carry the pool's figures (size,
    available, waiting, errors), never the connection string. From the moment shutdown
    begins, readiness is 503, before the pool closes. A probe takes one connection for one
    round trip, like a request: it never grows an idle pool (unlike ``pool.check()``).
    """
    router = APIRouter(prefix=prefix, tags=["health"])

    @router.get("/livez", summary="Liveness: the process and its event loop answer")
    async def livez(request: Request) -> dict[str, Any]:
        return {"status": "alive", "pool": _figures(_runtime_or_none(request))}

    @router.get("/readyz", summary="Readiness: the pool can serve a query now")
    async def readyz(request: Request) -> JSONResponse:
        runtime = _runtime_or_none(request)
        reason = await _unready_reason(runtime, probe_timeout)
        body = {"status": "ready" if reason is None else "not ready", "pool": _figures(runtime)}
        if reason is not None:
            body["reason"] = reason
        return JSONResponse(body, status_code=200 if reason is None else 503)

    return router


def _runtime_or_none(request: Request) -> PoolRuntime | None:
    try:
        return runtime_of(request)
    except DBPoolError:
        return None


async def _unready_reason(runtime: PoolRuntime | None, timeout: float) -> str | None:
    if runtime is None:
        return "the pool is not running"
    if runtime.closing:
        return "shutting down"
    try:
        async with runtime.lease(timeout, for_request=False) as lease:
            try:
                await lease.conn.execute("SELECT 1")
            except psycopg.Error as ex:
                return f"the database did not answer: {_dsn.scrub(str(ex).strip())}"
    except DBPoolError:
        failure = runtime.connect_log.current
        if failure is not None:
            return f"no connection within {timeout:g}s: new connections fail: {failure}"
        return f"no connection within {timeout:g}s"
    return None


def _figures(runtime: PoolRuntime | None) -> dict[str, int]:
    if runtime is None:
        return {}
    stats = runtime.pool_stats()
    return {ours: int(stats.get(theirs, 0)) for ours, theirs in _FIGURES.items()}
