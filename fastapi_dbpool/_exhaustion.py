"""The warning when a pool runs dry: who holds its connections, or why none can be opened.

A pool answering 503s under load would log one warning per refused request; one every
`EVERY` seconds says the same. It names the routes holding the most connections (the
answer to "who is holding the pool?"), or, when the server refuses new connections, that
failure and its own hint instead of "raise max_size".
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from ._log import error, fields
from ._metrics import top_holders
from ._network import HINT_NETWORK, TRANSIENT

if TYPE_CHECKING:
    from ._state import PoolRuntime

logger = logging.getLogger("fastapi_dbpool")
EVERY = 10.0  # seconds between two warnings of one pool

_HINT_BUSY = (
    "raise max_size if PostgreSQL has room, or hold connections for less time (no slow work "
    "or external calls while a ConnectionDep/TransactionDep is held; the routes above hold "
    "the most)"
)


class ExhaustionReport:
    """One pool's exhaustion warnings, at most one every `EVERY` seconds."""

    def __init__(self) -> None:
        self.last = -EVERY

    def report(self, runtime: PoolRuntime, ex: Exception) -> None:
        """A checkout of `runtime`'s pool got no connection in time (`ex`): warn, unless
        warned lately. Its stats count the checkouts waiting for a hand-over too."""
        now = time.monotonic()
        if now - self.last < EVERY:
            return
        self.last = now
        pool = runtime.pool
        stats = runtime.pool_stats()
        holders = top_holders(runtime.leases, now)
        failure = runtime.connect_log.current
        silent = runtime.connect_log.silence.describe()
        if silent is not None and (failure is None or failure.cause in TRANSIENT):
            # not a busy pool: the server stopped answering
            why, hint = silent, HINT_NETWORK.removeprefix("hint: ")
        elif failure is not None:  # not a busy pool: the server refuses new connections
            why, hint = f"new connections fail: {failure}", failure.hint
        else:
            held_by = ", ".join(
                f"{h.route} ({h.connections}, longest {h.longest_seconds:.1f} s)" for h in holders
            )
            why, hint = f"held by: {held_by or 'no request'}", _HINT_BUSY
        logger.warning(
            "pool %r exhausted, answering 503: %s; %s (stats: %s). hint: %s",
            pool.name,
            ex,
            why,
            stats,
            hint,
            extra=fields(
                "exhausted",
                pool.name,
                error=error(ex),
                stats=stats,
                holders=[vars(h) for h in holders],
                connect_failure=None if failure is None else str(failure),
            ),
        )
