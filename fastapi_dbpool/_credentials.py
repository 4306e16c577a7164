"""Rotating credentials: a password or connection string fetched for each new connection.

Passwords rotate (a secrets manager, a Kubernetes secret mounted as a file) and cloud
IAM tokens expire within minutes. A password read once at startup then fails every new
connection after the rotation, while the connections already open keep serving, so the
failure shows only when the pool next grows or replaces one. A source given here is
asked again for every new connection (psycopg_pool calls it in `_config`'s connect
kwargs); its answer is never logged, shown in a repr or kept beyond that connection.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Awaitable, Callable
from typing import Any

from psycopg.conninfo import make_conninfo

from . import _dsn
from ._connect_errors import ConnectLog
from .errors import ConfigurationError

#: a value, or a sync or async callable giving it
Source = str | Callable[[], str] | Callable[[], Awaitable[str]]


class PasswordFile:
    """A password source that reads `path` again for each new connection.

    For a secret mounted as a file (Kubernetes, Docker secrets, a Vault agent). The file's
    content, without its trailing newline, is the password. A missing or empty file fails
    that connection with a `ConfigurationError` naming the path (never the content).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)

    def __call__(self) -> str:
        try:
            with open(self.path, encoding="utf-8") as f:
                password = f.read().rstrip("\r\n")
        except OSError as ex:
            raise ConfigurationError(
                f"The password file {self.path!r} cannot be read ({ex.strerror}); "
                "check that the secret is mounted there and readable by this process."
            ) from None
        if not password:
            raise ConfigurationError(f"The password file {self.path!r} is empty.")
        return password

    def __repr__(self) -> str:
        return f"PasswordFile({self.path!r})"


async def resolve(source: Source, what: str) -> str:
    """The string `source` gives now; `ConfigurationError` if it gives something else."""
    got: Any = source() if callable(source) else source
    if inspect.isawaitable(got):
        got = await got
    if not isinstance(got, str):
        raise ConfigurationError(f"The {what} source returned {type(got).__name__}, not a str.")
    return got


def describe(conninfo: Source) -> str:
    """Where `conninfo` points, without secrets, or which callable gives it."""
    if isinstance(conninfo, str):
        return _dsn.describe(conninfo)
    return f"<conninfo from {getattr(conninfo, '__qualname__', type(conninfo).__name__)}>"


def conninfo_source(
    source: Callable[..., Any],
    name: str,
    connect_log: ConnectLog,
    check: Callable[[dict[str, str]], None],
) -> Callable[[], Awaitable[str]]:
    """`source` as psycopg_pool's conninfo callable: checked, with our application_name.

    A conninfo from a callable cannot be checked when the DBPool is built, so each answer
    is parsed (and checked by `check`) before it is used; a failure is recorded in
    `connect_log`, without the string.
    """

    async def conninfo() -> str:
        try:
            got = await resolve(source, "conninfo")
            try:
                params = _dsn.parse(got)
            except Exception as ex:
                raise ConfigurationError(
                    f"The conninfo callable returned a malformed string: {_dsn.scrub(str(ex))}."
                ) from None
            check(params)
        except Exception as ex:
            connect_log.failed(ex)
            raise
        return got if "application_name" in params else make_conninfo(got, application_name=name)

    conninfo.__qualname__ = getattr(source, "__qualname__", type(source).__name__)
    return conninfo
