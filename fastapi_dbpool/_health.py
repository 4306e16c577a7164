"""Liveness and readiness endpoints, in the container platforms' convention."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from . import _dsn, _failover, _network
from ._registry import Pools, find_pools
from ._state import PoolRuntime
from .errors import DBPoolError

_FIGURES = {
    "size": "pool_size",
    "available": "pool_available",
    "waiting": "requests_waiting",
    "errors": "connections_errors",
}


def health_router(*, probe_timeout: float = 1.0, prefix: str = "") -> APIRouter:
    """``GET /livez`` and ``GET /readyz`` for the app's running pools.

    ``app.include_router(health_router())``. Liveness answers 200 without touching the
    database: if the loop can answer, the process is alive. Readiness answers 200 when
    every pool of the app is running, a connection can be had within `probe_timeout`
    seconds and ``SELECT 1`` answers (for a ``writable`` pool, ``SHOW transaction_read_only``
    answers off), the pools probed at once; otherwise 503 with the
    reason, naming the pool when there are several. Both bodies carry the figures (size,
    available, waiting, errors) of the first pool under ``pool`` and of each under
    ``pools``, never the connection string. A read replica of `ReadReplicas` that fails
    leaves readiness 200 and is named under ``degraded``: reads go elsewhere. From the
    moment shutdown
    begins, readiness is 503, before the pool closes. A probe takes one connection for one
    round trip, like a request: it never grows an idle pool (unlike ``pool.check()``).
    """
    router = APIRouter(prefix=prefix, tags=["health"])

    @router.get("/livez", summary="Liveness: the process and its event loop answer")
    async def livez(request: Request) -> dict[str, Any]:
        runtimes = _runtimes(find_pools(request.scope))
        return {"status": "alive", **_all_figures(runtimes)}

    @router.get("/readyz", summary="Readiness: every pool can serve a query now")
    async def readyz(request: Request) -> JSONResponse:
        pools = find_pools(request.scope)
        runtimes = _runtimes(pools)
        optional = pools.optional if pools is not None else set()
        reasons: dict[str, str] = {}
        degraded: dict[str, str] = {}
        if runtimes:
            found = await asyncio.gather(
                *(_unready_reason(r, probe_timeout) for r in runtimes.values())
            )
            for name, why in zip(runtimes, found, strict=True):
                if why is not None:
                    (degraded if name in optional else reasons)[name] = why
        else:
            reasons = {"": "the pool is not running"}
        body: dict[str, Any] = {"status": "not ready" if reasons else "ready"}
        body.update(_all_figures(runtimes))
        if reasons:
            body["reason"] = _joined(reasons, len(runtimes))
        if degraded:
            body["degraded"] = _joined(degraded, 2)
        return JSONResponse(body, status_code=503 if reasons else 200)

    return router


def _runtimes(pools: Pools | None) -> dict[str, PoolRuntime]:
    """The app's running pools on this loop, by name."""
    if pools is None:
        return {}
    found = {}
    for name, runtime in pools.by_name.items():
        try:
            runtime.check_loop()
        except DBPoolError:
            continue
        found[name] = runtime
    return found


def _joined(reasons: dict[str, str], pool_count: int) -> str:
    """One reason as is; several (or of one of several pools) each with its pool's name."""
    if pool_count > 1:
        return "; ".join(f"pool {name!r}: {why}" for name, why in reasons.items())
    return next(iter(reasons.values()))


def _all_figures(runtimes: dict[str, PoolRuntime]) -> dict[str, Any]:
    """``pool``: the first pool's figures (the only one's, in most apps); ``pools``: each's."""
    each = {name: _figures(runtime) for name, runtime in runtimes.items()}
    return {"pool": next(iter(each.values()), {}), "pools": each}


async def _unready_reason(runtime: PoolRuntime, timeout: float) -> str | None:
    if runtime.closing:
        return "shutting down"
    try:
        async with runtime.lease(timeout, for_request=False) as lease:
            try:
                if not runtime.settings.writable:
                    await lease.conn.execute("SELECT 1")
                elif await _failover.is_read_only(lease.conn):  # its answer is the round trip
                    _failover.replace_all(runtime.pool, "the readiness probe found it read-only")
                    return _failover.READ_ONLY
            except psycopg.Error as ex:
                return f"the database did not answer: {_dsn.scrub(str(ex).strip())}"
    except DBPoolError:
        failure = runtime.connect_log.current
        silent = runtime.connect_log.silence.describe()
        if silent is not None and (failure is None or failure.cause in _network.TRANSIENT):
            return f"no connection within {timeout:g}s: {silent}"
        if failure is not None:
            return f"no connection within {timeout:g}s: new connections fail: {failure}"
        return f"no connection within {timeout:g}s"
    return None


def _figures(runtime: PoolRuntime) -> dict[str, int]:
    stats = runtime.pool_stats()
    return {ours: int(stats.get(theirs, 0)) for ours, theirs in _FIGURES.items()}
