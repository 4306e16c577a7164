"""Helpers for testing apps built on fastapi_dbpool against a real PostgreSQL.

The pytest plugin (`fastapi_dbpool.testing._plugin`, registered as ``fastapi_dbpool``)
builds on these; see the docs, "Testing your app" (docs/testing.md).
"""

from ..errors import IsolationError
from ._app import AppHarness
from ._databases import LeakWarning
from ._postgres import database_url, embedded_postgres

__all__ = ["AppHarness", "IsolationError", "LeakWarning", "database_url", "embedded_postgres"]

LeakWarning.__module__ = __name__
