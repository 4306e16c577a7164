"""The package's log records carry their figures as fields, as well as in the message.

Every record of the ``fastapi_dbpool`` logger has ``dbpool_event`` (what happened, a fixed
name such as ``"exhausted"`` or ``"loop_stall"``) and ``dbpool_pool`` (the pool's name, or
None) as attributes, and further ``dbpool_*`` attributes by event: JSON log pipelines
(python-json-logger, structlog's stdlib bridge, OpenTelemetry's logs bridge) take them as
they are, without parsing the message. No field holds a secret: error texts are scrubbed
of passwords as messages are.
"""

from __future__ import annotations

import math
import time
from typing import Any

from . import _dsn

PREFIX = "dbpool_"
BURST = 10.0  # seconds: a record of one kind is logged once per burst, with a count


def fields(event: str, pool: str | None = None, **more: Any) -> dict[str, Any]:
    """The ``extra=`` of one record: `event`, `pool` and `more`, each name prefixed."""
    extra = {PREFIX + "event": event, PREFIX + "pool": pool}
    for name, value in more.items():
        extra[PREFIX + name] = value
    return extra


def error(ex: BaseException) -> str:
    """An exception as a field: its type and message, without secrets."""
    return f"{type(ex).__name__}: {_dsn.scrub(str(ex))}"


class Bursts:
    """Records of one kind logged once per `BURST`: an outage or a load spike repeats one
    event by the hundred, and a log of it, line after line, hides everything else."""

    def __init__(self) -> None:
        self._bursts: dict[str, tuple[float, int]] = {}

    def admit(self, kind: str) -> int | None:
        """None: hold this record back (counted). Else log it, with the returned count of
        those held back since the last one logged."""
        now = time.monotonic()
        logged_at, held = self._bursts.get(kind, (-math.inf, 0))
        if now - logged_at < BURST:
            self._bursts[kind] = (logged_at, held + 1)
            return None
        self._bursts[kind] = (now, 0)
        return held
