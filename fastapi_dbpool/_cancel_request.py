"""A cancel request that never blocks the event loop, on any libpq.

A cancel request travels on a new connection to the server. psycopg's
``AsyncConnection.cancel_safe()`` asks libpq to poll that connection before its socket is
writable, which libpq's documentation says not to do (psycopg #1335): with libpq 18.0
(psycopg-binary 3.3.0 to 3.3.7's), ``PQcancelPoll()`` then sends its first packet on a
socket still connecting and waits for it in a blocking ``poll()``. Over a partition, or
to a server that does not answer, the whole event loop stopped until
``tcp_user_timeout`` (10 s): every deadline of the process missed. `send_cancel` runs
the same protocol on psycopg's public ``pq`` objects, waiting for the socket as libpq
asks, so that no libpq can block.
"""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
from psycopg import AsyncConnection, capabilities, errors
from psycopg.pq import PollingStatus

_OK, _READING, _WRITING = PollingStatus.OK, PollingStatus.READING, PollingStatus.WRITING


async def send_cancel(conn: AsyncConnection[Any], timeout: float) -> None:
    """Ask the server to cancel what `conn` runs now; return once the request is delivered.

    Raises ``psycopg.errors.CancellationTimeout`` after `timeout` seconds (the server may
    still get it), and ``psycopg.OperationalError`` if the server refused the connection.
    A closed `conn` has nothing to cancel. Without libpq 17's cancel API, psycopg runs
    libpq's blocking ``PQcancel()`` in a thread: the loop is free, that thread is not.
    """
    if conn.closed:
        return
    if not capabilities.has_cancel_safe():
        await conn.cancel_safe(timeout=timeout)
        return
    cancel_conn = conn.pgconn.cancel_conn()
    loop = asyncio.get_running_loop()
    try:
        with anyio.fail_after(timeout):
            cancel_conn.start()
            status: int = _WRITING  # libpq: as if PQcancelStart() had returned WRITING
            while status != _OK:
                if status not in (_READING, _WRITING):
                    raise errors.OperationalError(
                        f"cancellation failed: {cancel_conn.get_error_message()}"
                    )
                await _ready(loop, cancel_conn.socket, status == _READING)
                status = cancel_conn.poll()
    except TimeoutError:
        raise errors.CancellationTimeout("cancellation timeout expired") from None
    finally:
        cancel_conn.finish()


async def _ready(loop: asyncio.AbstractEventLoop, fileno: int, reading: bool) -> None:
    """Wait until `fileno` is readable (`reading`) or writable."""
    future: asyncio.Future[None] = loop.create_future()

    def wakeup() -> None:
        if not future.done():
            future.set_result(None)

    if reading:
        loop.add_reader(fileno, wakeup)
    else:
        loop.add_writer(fileno, wakeup)
    try:
        await future
    finally:
        if reading:
            loop.remove_reader(fileno)
        else:
            loop.remove_writer(fileno)
