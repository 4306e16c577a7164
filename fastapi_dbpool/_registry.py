"""The pools running for one app, by name, and how a request finds its pool.

One `Pools` per app, kept on ``app.state`` and yielded as the lifespan state under one
key by every `DBPool` of that app: composed lifespans that merge their states keep the
same object, so a second pool can never replace the first. ``ConnectionDep`` and the
other module-level dependencies use the app's only pool and refuse to guess among
several; each `DBPool` has its own dependencies, which find it by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from starlette.requests import HTTPConnection

from .errors import ConfigurationError, PoolNotRunningError

if TYPE_CHECKING:
    from ._state import PoolRuntime

STATE_KEY = "fastapi_dbpool"


class Pools:
    """The running pools of one app, by name; `only` is set while there is exactly one."""

    __slots__ = ("by_name", "only", "optional", "starting")

    def __init__(self) -> None:
        self.by_name: dict[str, PoolRuntime] = {}
        self.optional: set[str] = set()  # down is degraded, not unready (read replicas)
        self.starting: set[str] = set()  # names reserved by lifespans still opening
        self.only: PoolRuntime | None = None

    def reserve(self, name: str) -> None:
        """Claim `name` before opening its pool: `ConfigurationError` if it is taken."""
        if name in self.by_name or name in self.starting:
            raise same_name(name)
        self.starting.add(name)

    def add(self, name: str, runtime: PoolRuntime) -> None:
        self.starting.discard(name)
        self.by_name[name] = runtime
        self._changed()

    def remove(self, name: str) -> None:
        self.starting.discard(name)
        self.by_name.pop(name, None)
        self._changed()

    def _changed(self) -> None:
        self.only = next(iter(self.by_name.values())) if len(self.by_name) == 1 else None

    def the_only(self) -> PoolRuntime:
        """The app's pool, for the module-level dependencies; refuses to pick one of several."""
        if self.only is not None:
            return self.only
        if not self.by_name:
            raise PoolNotRunningError()
        names = ", ".join(repr(n) for n in self.by_name)
        first = next(iter(self.by_name))
        raise ConfigurationError(
            f"This app runs several pools ({names}): ConnectionDep, TransactionDep and "
            "StreamTransactionDep cannot tell which to use. Use each pool's own, e.g. "
            "`conn: db.ConnectionDep` for the DBPool named "
            f"{first!r} (or Annotated[AsyncConnection, Depends(db.get_connection)])."
        )


def same_name(name: str) -> ConfigurationError:
    return ConfigurationError(
        f"Two pools named {name!r} in one app: each DBPool of an app needs its own "
        "name, e.g. DBPool(url, name='replica') (or DBPOOL_NAME); the name labels its "
        "metrics, logs and application_name."
    )


def pools_of(app: Any) -> Pools:
    """The `Pools` of `app`, created on first use (an app's first lifespan)."""
    pools = getattr(app.state, STATE_KEY, None)
    if not isinstance(pools, Pools):
        pools = Pools()
        setattr(app.state, STATE_KEY, pools)
    return pools


def find_pools(scope: Mapping[str, Any]) -> Pools | None:
    """The `Pools` of the app of this ASGI scope: the lifespan state's, else the app's."""
    state = scope.get("state")
    pools = state.get(STATE_KEY) if type(state) is dict or isinstance(state, Mapping) else None
    if pools is None:
        pools = getattr(getattr(scope.get("app"), "state", None), STATE_KEY, None)
    return pools if isinstance(pools, Pools) else None


def find_runtime(scope: Mapping[str, Any]) -> PoolRuntime | None:
    """The app's only running pool, if it has exactly one (no checks)."""
    pools = find_pools(scope)
    return None if pools is None else pools.only


def runtime_of(connection: HTTPConnection) -> PoolRuntime:
    """The app's only pool, checked against the current loop (module-level dependencies)."""
    pools = find_pools(connection.scope)
    if pools is None:
        raise PoolNotRunningError()
    runtime = pools.only or pools.the_only()
    if runtime.pool.closed:
        raise PoolNotRunningError()
    runtime.check_loop()
    return runtime


class Finder:
    """Finds the pool of one name for a request (a DBPool's own dependencies)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, connection: HTTPConnection) -> PoolRuntime:
        pools = find_pools(connection.scope)
        runtime = None if pools is None else pools.by_name.get(self.name)
        if runtime is None or runtime.pool.closed:
            raise PoolNotRunningError(f"DBPool {self.name!r} is not running for this app")
        runtime.check_loop()
        return runtime
