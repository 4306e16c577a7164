"""A PostgreSQL connection pool for FastAPI that cannot be misused.

::

    db = DBPool("postgresql://app@localhost/app", max_size=10)
    app = FastAPI(lifespan=db.lifespan)

    @app.get("/items/{item_id}")
    async def get_item(item_id: int, conn: ConnectionDep): ...
"""

from ._credentials import PasswordFile
from ._database_errors import handle_database_errors
from ._dbpool import DBPool
from ._deadline import deadline
from ._dependencies import (
    ConnectionDep,
    StreamTransactionDep,
    TransactionDep,
    get_connection,
    get_stream_transaction,
    get_transaction,
)
from ._health import health_router
from ._lifespan import lifespan
from ._metrics import Holder, PoolStats, RouteStats
from ._middleware import CancellationMiddleware
from ._replicas import ReadReplicas
from .errors import (
    ConfigurationError,
    ConnectionInUseError,
    ConnectionLostError,
    ConnectionMisuseError,
    ConnectionReleasedError,
    DBPoolError,
    DeadlineExceededError,
    PoolExhaustedError,
    PoolNotRunningError,
    PoolOpenError,
    SessionStateError,
    WrongEventLoopError,
)

__all__ = [
    "CancellationMiddleware",
    "ConfigurationError",
    "ConnectionDep",
    "ConnectionInUseError",
    "ConnectionLostError",
    "ConnectionMisuseError",
    "ConnectionReleasedError",
    "DBPool",
    "DBPoolError",
    "DeadlineExceededError",
    "Holder",
    "PasswordFile",
    "PoolExhaustedError",
    "PoolNotRunningError",
    "PoolOpenError",
    "PoolStats",
    "ReadReplicas",
    "RouteStats",
    "SessionStateError",
    "StreamTransactionDep",
    "TransactionDep",
    "WrongEventLoopError",
    "deadline",
    "get_connection",
    "get_stream_transaction",
    "get_transaction",
    "handle_database_errors",
    "health_router",
    "lifespan",
]


def _present_as_public() -> None:
    """Show users ``fastapi_dbpool.X``, not the private module that defines X."""
    for name in __all__:
        obj = globals()[name]
        if isinstance(obj, type) or (callable(obj) and hasattr(obj, "__code__")):
            obj.__module__ = __name__


_present_as_public()
