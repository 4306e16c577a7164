"""Why new connections fail: the last failure of one pool, its cause, and what to do.

psycopg_pool opens connections in the background and only logs why one failed; a request
that waited for it sees a timeout ("no connection within 1s", a 503), and the natural
hint, "raise max_size", points the wrong way when the server is refusing connections.
A pool's `ConnectLog` keeps the last failure (without secrets) until a connection opens
again, so the exhaustion warning, ``/readyz`` and `DBPool.stats()` can name it.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from psycopg import AsyncConnection
from psycopg.conninfo import conninfo_to_dict

from . import _dsn, _network
from ._metrics import Histogram, Observer, tell

#: cause -> substrings of libpq's or PostgreSQL's message that identify it (lower case)
_CAUSES = (
    (
        "authentication",
        (
            "password authentication failed",
            "authentication failed",
            "no pg_hba.conf entry",
            "not permitted to log in",
            "no password supplied",
        ),
    ),
    (
        "too_many_connections",
        ("too many clients", "too many connections", "remaining connection slots"),
    ),
    ("read_only", ("read-only", "read only", "is in recovery", "hot standby")),
    ("missing", ("does not exist",)),
    ("dns", ("could not translate host name", "name or service not known")),
    ("refused", ("connection refused", "no such file or directory")),
    ("timeout", ("timeout expired", "timed out")),
    ("starting_up", ("the database system is starting up", "the database system is shutting")),
    (
        "network",
        ("no route to host", "network is unreachable", "connection reset", "server closed the"),
    ),
)
#: cause -> what an operator can do about it
HINTS = {
    "authentication": "the server refuses the credentials: check the password or its "
    "source (a rotated secret, an expired token), the role's LOGIN, and pg_hba.conf",
    "too_many_connections": "the server (or the role's CONNECTION LIMIT) takes no more "
    "connections: keep workers x max_size within max_connections minus the reserved "
    "slots and other clients, or put PgBouncer in front; raising max_size makes it worse",
    "read_only": "the server is read-only (a standby, or a primary being demoted): point "
    "the pool at the primary, or add target_session_attrs=read-write to a multi-host URL",
    "missing": "the database or the role does not exist: check the database name and the "
    "user in the connection string (or create them)",
    "dns": "the host name does not resolve: check the host in the connection string",
    "refused": "nothing listens at the server's address: is PostgreSQL (or the pooler) up?",
    "timeout": "the server did not answer in time: check the network and connect_timeout",
    "starting_up": "the server is starting up or shutting down: connections are retried",
    "network": "the network between the app and the server fails: check routes, firewalls "
    "and the server's host",
    "other": "new connections fail: see the error",
}
CAUSES = (*(cause for cause, _ in _CAUSES), "other")


def classify(ex: BaseException) -> str:
    """One of `CAUSES` for a failed connection attempt."""
    text = str(ex).lower()
    for cause, needles in _CAUSES:
        if any(needle in text for needle in needles):
            return cause
    return "other"


@dataclass(frozen=True)
class ConnectFailure:
    cause: str
    message: str  # scrubbed of secrets
    at: float  # time.monotonic()

    def __str__(self) -> str:
        return f"{self.message} ({self.cause})"

    @property
    def hint(self) -> str:
        return HINTS[self.cause]


class ConnectLog:
    """The connection attempts of one pool: the last failure while it lasts, failures by
    cause, and how long each connection took to open."""

    def __init__(self, pool: str, observers: list[Observer]) -> None:
        self.pool = pool
        self.observers = observers  # the DBPool's (see _metrics)
        self.silence = _network.Silence()  # whether its server stopped answering
        self.reset()

    def reset(self) -> None:
        """Forget everything: the pool opens anew."""
        self.last: ConnectFailure | None = None
        self.failing = False
        self.by_cause: dict[str, int] = {}
        self.created = Histogram()

    def failed(self, ex: BaseException) -> None:
        message = _dsn.scrub(str(ex).strip()) or type(ex).__name__
        cause = classify(ex)
        self.last = ConnectFailure(cause, message, time.monotonic())
        self.failing = True
        self.by_cause[cause] = self.by_cause.get(cause, 0) + 1

    def succeeded(self, seconds: float) -> None:
        self.failing = False
        self.silence.answered()
        self.created.add(seconds)
        if self.observers:
            tell(self.observers, "created", self.pool, seconds)

    @property
    def current(self) -> ConnectFailure | None:
        """The last failure, unless a connection has opened since."""
        return self.last if self.failing else None


class RecordingConnect:
    """Mixed into a pool's connection class: each ``connect()`` outcome goes to its log."""

    _dbpool_connect_log: ClassVar[ConnectLog]
    #: a check of each new connection that raises to refuse it (see `_failover`)
    _dbpool_on_connect: ClassVar[Callable[[Any], Awaitable[None]] | None] = None

    #: how long one ``connect()`` keeps trying again while the failure is transient
    _dbpool_retry_window: ClassVar[float] = 60.0

    @classmethod
    async def connect(cls, conninfo: str = "", **kwargs: Any) -> Any:
        """psycopg's connect, with dead-peer defaults, recorded, tried again while transient.

        A transient failure (refused, timed out, starting up: `_network.TRANSIENT`) is tried
        again as soon as the server accepts TCP connections, for up to
        ``_dbpool_retry_window`` seconds, so that psycopg_pool's backoff does not pile up
        during an outage and delay service long after the server is back.
        """
        params = conninfo_to_dict(conninfo)
        kwargs = _network.with_dead_peer_defaults(params, kwargs)
        started = time.monotonic()
        give_up = started + cls._dbpool_retry_window
        while True:
            try:
                conn = await super().connect(conninfo, **kwargs)  # type: ignore[misc]
                if cls._dbpool_on_connect is not None:
                    await cls._dbpool_on_connect(conn)
                break
            except Exception as ex:
                cls._dbpool_connect_log.failed(ex)
                if classify(ex) not in _network.TRANSIENT or time.monotonic() >= give_up:
                    raise
                await _network.until_reachable({**params, **kwargs}, give_up)
        cls._dbpool_connect_log.succeeded(time.monotonic() - started)
        return conn


def recording_class(
    cls: type[AsyncConnection[Any]],
    log: ConnectLog,
    on_connect: Callable[[Any], Awaitable[None]] | None = None,
    retry_window: float = 60.0,
) -> type[Any]:
    """A subclass of `cls` whose connection attempts are recorded in `log` (one per pool),
    each new connection refused if `on_connect` raises."""
    namespace = {
        "_dbpool_connect_log": log,
        "_dbpool_on_connect": on_connect,
        "_dbpool_retry_window": retry_window,
    }
    return type(cls.__name__, (RecordingConnect, cls), namespace)
