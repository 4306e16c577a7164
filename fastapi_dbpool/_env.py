"""Settings: read from the environment (``DATABASE_URL``, ``DBPOOL_*``) and checked."""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from typing import Any

import psycopg

from . import _dsn
from ._credentials import PasswordFile
from .errors import ConfigurationError

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def boolean(value: str) -> bool:
    """``1/true/yes/on`` or ``0/false/no/off`` (any case); ValueError otherwise."""
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ValueError(value)


def seconds_or_off(value: str) -> float | None:
    """Seconds, or ``off``/``none`` (any case) for None; ValueError otherwise."""
    return None if value.lower() in ("off", "none") else float(value)


#: ``DBPOOL_*`` variable -> (DBPool keyword, type)
VARIABLES: dict[str, tuple[str, Callable[[str], Any]]] = {
    "DBPOOL_MIN_SIZE": ("min_size", int),
    "DBPOOL_MAX_SIZE": ("max_size", int),
    "DBPOOL_MAX_WAITING": ("max_waiting", int),
    "DBPOOL_MAX_IDLE": ("max_idle", float),
    "DBPOOL_MAX_LIFETIME": ("max_lifetime", float),
    "DBPOOL_ACQUIRE_TIMEOUT": ("acquire_timeout", float),
    "DBPOOL_OPEN_TIMEOUT": ("open_timeout", float),
    "DBPOOL_CLOSE_TIMEOUT": ("close_timeout", float),
    "DBPOOL_RELEASE_TIMEOUT": ("release_timeout", float),
    "DBPOOL_RETRY_AFTER": ("retry_after", int),
    "DBPOOL_WATCHDOG": ("watchdog", seconds_or_off),
    "DBPOOL_HOLD_WARNING": ("hold_warning", seconds_or_off),
    "DBPOOL_ALLOW_CONCURRENT_TASKS": ("allow_concurrent_tasks", boolean),
    "DBPOOL_NAME": ("name", str),
    "DBPOOL_TRANSACTION_POOLER": ("transaction_pooler", boolean),
    "DBPOOL_WRITABLE": ("writable", boolean),
    "DBPOOL_PASSWORD_FILE": ("password", PasswordFile),
}


_FORMS: dict[Callable[[str], Any], str] = {
    boolean: " (1/0, true/false, yes/no, on/off).",
    seconds_or_off: " (seconds, or off).",
}


def positive_seconds(name: str, value: object, *, none_allowed: bool = False) -> float:
    """`value` as a float, or `ConfigurationError` naming `name` if it is not seconds > 0."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        alternative = " or None" if none_allowed else ""
        raise ConfigurationError(
            f"{name} must be a positive number of seconds{alternative}, got {value!r}."
        )
    return float(value)


_EXAMPLE_URL = "postgresql://user:password@localhost:5432/dbname"


def read(environ: Mapping[str, str], *, url_required: bool = True) -> tuple[str, dict[str, Any]]:
    """The connection string ("" if unset and not `url_required`) and DBPool keywords."""
    url = environ.get("DATABASE_URL", "").strip()
    if not url and url_required:
        raise ConfigurationError(
            f"DATABASE_URL is not set. Set it to a PostgreSQL URL such as {_EXAMPLE_URL}."
        )
    try:
        if url:
            _dsn.parse(url)
    except psycopg.Error as ex:
        raise ConfigurationError(
            f"DATABASE_URL is malformed ({_dsn.scrub(str(ex))}). Expected a URL such as "
            f"{_EXAMPLE_URL} or a libpq key=value string."
        ) from None
    settings: dict[str, Any] = {}
    for var, value in environ.items():
        if not var.startswith("DBPOOL_"):
            continue
        if var not in VARIABLES:
            close = difflib.get_close_matches(var, VARIABLES, n=1)
            raise ConfigurationError(
                f"{var} is not a fastapi_dbpool setting"
                + (f"; did you mean {close[0]}?" if close else ".")
                + f" Known: {', '.join(sorted(VARIABLES))}."
            )
        keyword, convert = VARIABLES[var]
        try:
            settings[keyword] = convert(value.strip())
        except ValueError:
            raise ConfigurationError(
                f"{var}={value!r} is not a valid {convert.__name__}" + _FORMS.get(convert, ".")
            ) from None
    return url, settings
