"""What the package has seen of a server that stopped answering, and libpq's dead-peer settings.

A partition or a frozen server looks, from the pool, like exhaustion: every connection is
out and nothing comes back. What tells them apart is what only the cut and release paths
see: cancel requests that cannot be delivered, sockets that time out. `Silence` keeps that
per server (``host:port``), so that ``/readyz``, `DBPool.stats()` and the warnings can
name the server and say "network" instead of "raise max_size".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any

from ._log import Bursts, error, fields

logger = logging.getLogger("fastapi_dbpool")

#: libpq settings for noticing a dead peer, set on each connection unless the conninfo, the
#: pool's ``kwargs`` or libpq's environment already set them (see docs/network.md):
#: an idle connection to a silent server is found dead within 5 + 3 x 2 = 11 s, one with
#: unacknowledged data within 10 s, and a new connection gives up after 5 s.
DEAD_PEER_DEFAULTS = {
    "keepalives": "1",
    "keepalives_idle": "5",
    "keepalives_interval": "2",
    "keepalives_count": "3",
    "tcp_user_timeout": "10000",
    "connect_timeout": "5",
}
_ENVIRON = {"connect_timeout": "PGCONNECT_TIMEOUT"}
SLOW_CANCEL = 1.0  # seconds: a cancel request unanswered this long means a silent server
HINT_NETWORK = (
    "hint: the server stopped answering: a network partition, a failover that left "
    "sockets open, or a frozen server; connections that cannot be reached are closed and "
    "replaced (see docs/network.md)"
)


def with_dead_peer_defaults(params: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` plus each of `DEAD_PEER_DEFAULTS` that neither `params` nor `kwargs` sets."""
    for key, value in DEAD_PEER_DEFAULTS.items():
        if key in params or key in kwargs:
            continue
        env = _ENVIRON.get(key)
        if env is not None and os.environ.get(env):
            continue
        kwargs[key] = value
    return kwargs


#: failure causes (`_connect_errors.classify`) worth trying again at once when the server answers
TRANSIENT = frozenset({"refused", "timeout", "dns", "starting_up", "network"})
PROBE_EVERY = 0.25  # seconds between reachability probes while a server is unreachable


async def until_reachable(params: dict[str, Any], until: float) -> None:
    """Return once a TCP connection to one of `params`' hosts opens, or at `until`.

    While the server is unreachable, psycopg_pool backs off between attempts (1, 2, 4 ...
    seconds), so that service would come back long after the network does. A probe every
    `PROBE_EVERY` seconds costs a SYN; the connection attempt follows as soon as one is
    answered. A unix socket, or no host, is simply waited for.
    """
    hosts = [h for h in str(params.get("host") or "").split(",") if h and not h.startswith("/")]
    ports = str(params.get("port") or "5432").split(",")
    targets = [(h, int(ports[i] if i < len(ports) else ports[-1])) for i, h in enumerate(hosts)]
    while time.monotonic() < until:
        if not targets:
            await asyncio.sleep(PROBE_EVERY)
            return
        for host, port in targets:
            started = time.monotonic()
            try:
                with contextlib.suppress(asyncio.TimeoutError):
                    _, writer = await asyncio.wait_for(
                        asyncio.open_connection(host, port), PROBE_EVERY * 2
                    )
                    writer.transport.abort()
                    return
            except OSError:
                pass
            await asyncio.sleep(max(0.0, PROBE_EVERY - (time.monotonic() - started)))


def target_of(conn: Any) -> str:
    """``host:port`` of a psycopg connection (its socket directory for a unix socket)."""
    try:
        info = conn.info
        return f"{info.host}:{info.port}"
    except Exception:  # a closed connection may no longer say
        return "the server"


class Silence:
    """One server's unanswered requests since it last answered."""

    def __init__(self, target: str = "the server") -> None:
        self.target = target
        self.since: float | None = None  # first unanswered cancel or timeout since an answer
        self.cancel_failures = 0
        self.connections_lost = 0
        self.cancels_pending: dict[int, float] = {}  # id of a cancel in flight -> when sent
        self._bursts = Bursts()

    def cancel_sent(self, key: int) -> None:
        self.cancels_pending[key] = time.monotonic()

    def cancel_ended(self, key: int) -> None:
        self.cancels_pending.pop(key, None)

    def cancel_failed(self, ex: BaseException | None, timeout: float) -> None:
        """A cancel request was not delivered (`ex`), or not within `timeout` (None)."""
        self.cancel_failures += 1
        self._unanswered()
        why = error(ex) if ex is not None else f"no answer in {timeout:.1f}s"
        self._warn(
            "cancel",
            "a cancel request to %s could not be delivered (%s); its connection is closed "
            "and replaced",
            (self.target, why),
            fields("server_cancel_failed", target=self.target, error=error(ex) if ex else None),
        )

    def connection_lost(self, ex: BaseException) -> None:
        """A connection broke under a statement (a socket timeout, a reset)."""
        self.connections_lost += 1
        if "timed out" in str(ex).lower():  # silence; a reset or a FATAL is an answer
            self._unanswered()
        self._warn(
            "lost",
            "a connection to %s broke under a statement (%s)",
            (self.target, error(ex)),
            fields("connection_lost", target=self.target, error=error(ex)),
        )

    def answered(self) -> None:
        """The server answered (a cancel delivered, a connection opened): not silent."""
        self.since = None

    def silent_for(self) -> float | None:
        """Seconds since the server stopped answering, or None if it answers.

        A cancel request still unanswered after `SLOW_CANCEL` counts, before it fails.
        """
        now = time.monotonic()
        since = self.since
        if self.cancels_pending:
            oldest = min(self.cancels_pending.values())
            if now - oldest >= SLOW_CANCEL and (since is None or oldest < since):
                since = oldest
        return None if since is None else now - since

    def describe(self) -> str | None:
        """Why readiness fails, if the server is silent."""
        silent = self.silent_for()
        if silent is None:
            return None
        return (
            f"{self.target} stopped answering {silent:.1f}s ago ({len(self.cancels_pending)} "
            f"cancel requests unanswered, {self.cancel_failures} undelivered, "
            f"{self.connections_lost} connections lost): a network partition or a frozen "
            "server, not a busy pool"
        )

    def _unanswered(self) -> None:
        if self.since is None:
            self.since = time.monotonic()

    def _warn(self, kind: str, msg: str, args: tuple[Any, ...], extra: dict[str, Any]) -> None:
        held = self._bursts.admit(kind)
        if held is None:
            return
        if held:
            msg += " (%d more like it in the last burst)"
            args = (*args, held)
        logger.warning(msg + ". %s", *args, HINT_NETWORK, extra=extra)


_unpooled: dict[str, Silence] = {}  # connections made outside any DBPool (tests, scripts)


def silence_of(conn: Any) -> Silence:
    """The record of `conn`'s pool (kept by its `ConnectLog`), naming `conn`'s server."""
    target = target_of(conn)
    log = getattr(conn, "_dbpool_connect_log", None)
    if log is not None:
        found: Silence = log.silence
        found.target = target
        return found
    unpooled = _unpooled.get(target)
    if unpooled is None:
        unpooled = _unpooled[target] = Silence(target)
    return unpooled
