"""The switch that turns every fast path off: what remains is psycopg's public path.

The package reads or replaces some psycopg and psycopg_pool internals for speed only
(`_wait`, `_pool_internals`, the open-block count in `_cleanup`); every guarantee must
hold without them. ``FASTAPI_DBPOOL_FAST_PATHS=0`` in the environment, read once at
import, turns them all off: a diagnostic (is a problem in a fast path?) and how CI runs
the suite on the public path. See docs/compatibility.md.
"""

from __future__ import annotations

import os

ENV = "FASTAPI_DBPOOL_FAST_PATHS"
ENABLED = os.environ.get(ENV, "1").strip().lower() not in ("0", "off", "false", "no")
