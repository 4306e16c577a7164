"""Throwaway databases on a test server: one template with the schema, cheap clones of it."""

from __future__ import annotations

import contextlib
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from urllib.parse import quote, urlencode

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from .. import _dsn
from ..errors import ConfigurationError

#: What `dbpool_schema` may return: SQL to run, or a callable given the database's URL
#: (to run migrations: Alembic, yoyo, a psql script...).
Schema = str | Callable[[str], object] | None


def url_for(server_url: str, dbname: str) -> str:
    """`server_url` with its database replaced by `dbname`, as a ``postgresql://`` URL.

    A URL whatever form `server_url` has (the embedded server's is key=value): the
    fixtures' URLs go to migration tools (Alembic, SQLAlchemy's ``make_url``) that take
    URLs only. A socket directory, or several hosts, go in the query, as libpq reads them.
    """
    params = {k: str(v) for k, v in conninfo_to_dict(server_url).items()}
    params["dbname"] = dbname
    user = quote(params.pop("user", ""), safe="")
    password = params.pop("password", None)
    auth = user + (":" + quote(password, safe="") if password else "")
    host, port = params.pop("host", ""), params.pop("port", "")
    netloc = ""
    if host and not host.startswith("/") and "," not in host and "," not in port:
        netloc = f"[{host}]" if ":" in host else host
        netloc += f":{port}" if port else ""
    else:
        params.update({k: v for k, v in (("host", host), ("port", port)) if v})
    path = quote(params.pop("dbname"), safe="")
    query = urlencode(params, quote_via=quote, safe="/")
    return f"postgresql://{auth}{'@' if auth else ''}{netloc}/{path}" + (
        f"?{query}" if query else ""
    )


def new_name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def create(server_url: str, name: str, template: str | None = None) -> str:
    """CREATE DATABASE `name` (a copy of `template`, if given); returns its URL."""
    query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template is not None:
        query = sql.SQL("{} TEMPLATE {}").format(query, sql.Identifier(template))
    try:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(query)
    except psycopg.errors.InsufficientPrivilege:
        user = conninfo_to_dict(server_url).get("user", "the role")
        raise ConfigurationError(
            f"fastapi_dbpool's test databases are created on {_dsn.describe(server_url)}, but "
            f"{user} may not create databases. Grant it (ALTER ROLE ... CREATEDB), or point "
            "--dbpool-url (or DATABASE_URL) at a server where it can; unset, an embedded "
            "PostgreSQL is started."
        ) from None
    except psycopg.OperationalError as ex:
        raise ConfigurationError(
            f"Could not reach the test server {_dsn.describe(server_url)}: "
            f"{_dsn.scrub(str(ex).strip())}. Check --dbpool-url or DATABASE_URL."
        ) from None
    return url_for(server_url, name)


def drop(server_url: str, name: str, settle: float = 2.0) -> list[str]:
    """DROP DATABASE `name`; returns the sessions still connected to it, which it ends.

    Sessions that are closing leave within `settle` seconds; what is left was leaked.
    """
    query = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
    with psycopg.connect(server_url, autocommit=True) as conn:
        deadline = time.monotonic() + settle
        while True:
            rows = conn.execute(
                "SELECT coalesce(application_name, ''), coalesce(state, '') "
                "FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            ).fetchall()
            if not rows or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        conn.execute(query)
    return [f"{app or '?'} ({state or 'starting'})" for app, state in rows]


def apply_schema(url: str, schema: Schema, fixture: str = "dbpool_schema") -> None:
    """Run `schema` (SQL, or a callable given the URL) on `url`'s database, committed."""
    if schema is None:
        return
    if isinstance(schema, str):
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(schema.encode())  # several statements: the simple query protocol
        return
    if callable(schema):
        schema(url)
        return
    raise ConfigurationError(
        f"The {fixture} fixture must return SQL (a str), a callable that takes the "
        f"database URL, or None; it returned {type(schema).__name__}."
    )


@contextlib.contextmanager
def database(server_url: str, prefix: str, template: str | None = None) -> Iterator[str]:
    """A new database for the block, dropped afterwards; yields its URL."""
    name = new_name(prefix)
    url = create(server_url, name, template)
    try:
        yield url
    finally:
        _warn_leaks(name, drop(server_url, name))


@contextlib.contextmanager
def template(server_url: str, schema: Schema) -> Iterator[str | None]:
    """A template database holding `schema`, for the block; None when there is no schema."""
    if schema is None:
        yield None
        return
    name = new_name("dbpool_template")
    url = create(server_url, name)
    try:
        apply_schema(url, schema)
        yield name
    finally:
        drop(server_url, name)


class LeakWarning(UserWarning):
    """Connections were still open on a test database when it was dropped."""


def _warn_leaks(name: str, sessions: list[str]) -> None:
    if sessions:
        warnings.warn(
            LeakWarning(
                f"{len(sessions)} connection(s) still open on test database {name} when it was "
                f"dropped: {', '.join(sessions)}. A pool or connection opened by a test was not "
                "closed: run apps through dbpool_app/dbpool_client or `async with AppHarness`, "
                "and close your own connections."
            ),
            stacklevel=1,
        )
