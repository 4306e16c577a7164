"""Helpers for testing and running apps built on fastapi_dbpool against a real PostgreSQL."""

from ._postgres import database_url, embedded_postgres

__all__ = ["database_url", "embedded_postgres"]
