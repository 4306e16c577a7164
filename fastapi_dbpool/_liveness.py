"""Whether an idle connection is fit to hand out, without a round trip when it plainly is."""

from __future__ import annotations

import select

from psycopg.pq import ConnStatus, TransactionStatus

from ._connection import GuardedConnection, run_own


async def alive(conn: GuardedConnection) -> bool:
    """Whether `conn` is fit to hand out, at the cost of a round trip only when in doubt.

    An idle connection has nothing to read. A terminated backend leaves its socket
    readable (an error, then end of file): only then is the server asked.
    """
    pgconn = conn.pgconn
    if conn.closed or pgconn.status != ConnStatus.OK:
        return False
    if pgconn.transaction_status != TransactionStatus.IDLE:
        return False
    if not _readable(conn):
        return True
    try:
        await run_own(conn, "")
    except Exception:
        return False
    return not conn.closed and pgconn.transaction_status == TransactionStatus.IDLE


def _readable(conn: GuardedConnection) -> bool:
    poller = conn._dbpool_poller
    if poller is None:
        if not hasattr(select, "poll"):  # select.select() fails for descriptors over 1023
            readable, _, _ = select.select([conn.pgconn.socket], [], [], 0)
            return bool(readable)
        poller = conn._dbpool_poller = select.poll()  # the socket is the same for life
        poller.register(conn.pgconn.socket, select.POLLIN)
    return bool(poller.poll(0))
