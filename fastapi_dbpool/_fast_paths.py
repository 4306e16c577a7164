"""The switch that turns every fast path off: what remains is psycopg's public path.

The package reads or replaces some psycopg and psycopg_pool internals for speed only
(`_wait`, `_pool_internals`, the open-block count in `_cleanup`); every guarantee must
hold without them. ``FASTAPI_DBPOOL_FAST_PATHS=0`` in the environment, read once at
import, turns them all off: a diagnostic (is a problem in a fast path?) and how CI runs
the suite on the public path. See docs/compatibility.md.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

logger = logging.getLogger("fastapi_dbpool")
ENV = "FASTAPI_DBPOOL_FAST_PATHS"
ENABLED = os.environ.get(ENV, "1").strip().lower() not in ("0", "off", "false", "no")
#: (fast path, module, the first release with the internals it reads)
SINCE = (
    ("the timer-less wait", "psycopg", (3, 3, 9)),
    ("the direct return", "psycopg_pool", (3, 3, 0)),
)
_warned: set[str] = set()


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", version)[:3])


def check_taken(taken: dict[str, bool], modules: dict[str, Any]) -> None:
    """Warn once per process for each fast path a release newer than its first lacks.

    `taken`: fast path -> whether this process takes it. A release that predates a fast
    path simply runs without it; a newer one that lacks it has moved an internal, which
    costs speed, never a guarantee, and the operator should know which release did.
    """
    if not ENABLED:
        return
    for name, module, since in SINCE:
        version = str(getattr(modules[module], "__version__", "0"))
        if taken.get(name, True) or _release(version) < since or name in _warned:
            continue
        _warned.add(name)
        logger.warning(
            "%s %s lacks the internals of %s; the package runs on %s's public path there "
            "instead (every guarantee holds; requests cost a little more CPU). hint: report "
            "it to fastapi_dbpool, naming %s %s; docs/compatibility.md lists each fast path",
            module,
            version,
            name,
            module,
            module,
            version,
        )
