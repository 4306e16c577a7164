"""The plain fastapi_dbpool app with every fast path off: psycopg's public path only.

``FASTAPI_DBPOOL_FAST_PATHS=0`` is read once, when fastapi_dbpool is imported, so it is
set here first; uvicorn imports this module in a server process of its own. Side by side
with the default app in ``benchmarks.instructions --set fast-paths``: what the fast paths
save (docs/compatibility.md).
"""

import os

os.environ["FASTAPI_DBPOOL_FAST_PATHS"] = "0"

from ._apps import fastapi_dbpool

__all__ = ["fastapi_dbpool"]
