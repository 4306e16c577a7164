"""Connection strings: validate them early and never show a password."""

from __future__ import annotations

import re

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

_SHOWN = ("host", "hostaddr", "port", "dbname", "user")
_URL_SECRET = re.compile(r"(?P<pre>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/?#@\s]*:)[^@\s]*(?=@)")
_KV_SECRET = re.compile(
    r"(?P<pre>\b(?:password|sslpassword)\s*=\s*)(?:'(?:[^'\\]|\\.)*'|[^\s&]*)", re.IGNORECASE
)
_QUERY_SECRET = re.compile(r"(?P<pre>[?&](?:password|sslpassword)=)[^&\s]*", re.IGNORECASE)


def parse(conninfo: str) -> dict[str, str]:
    """Parse a URL or key=value connection string; `psycopg.ProgrammingError` if malformed."""
    return {k: str(v) for k, v in conninfo_to_dict(conninfo).items() if v is not None}


def describe(conninfo: str) -> str:
    """Where a connection string points, without secrets: ``host=db port=5432 dbname=app``."""
    try:
        params = parse(conninfo)
    except psycopg.Error:
        return "<unparsable connection string>"
    shown = {k: params[k] for k in _SHOWN if k in params}
    return make_conninfo(**shown) if shown else "<libpq defaults>"


def scrub(text: str) -> str:
    """Mask anything that looks like a password in free text (error messages, reprs)."""
    text = _URL_SECRET.sub(r"\g<pre>***", text)
    text = _QUERY_SECRET.sub(r"\g<pre>***", text)
    return _KV_SECRET.sub(r"\g<pre>***", text)
