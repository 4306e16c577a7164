"""uvicorn in this process, on 127.0.0.1, on a port the OS picks."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import psycopg
import uvicorn


@asynccontextmanager
async def uvicorn_server(app: Any, **config: Any) -> AsyncIterator[int]:
    """Serve `app` (lifespan included) on the running loop; yield its port; shut it down."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    config.setdefault("log_level", "warning")
    server = uvicorn.Server(uvicorn.Config(app, access_log=False, lifespan="on", **config))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        with anyio.fail_after(30):
            while not server.started:
                if task.done():
                    task.result()
                    raise RuntimeError("uvicorn stopped during startup (see its log)")
                await asyncio.sleep(0.01)
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        with anyio.fail_after(30):
            await task
        sock.close()


async def http_get(
    port: int, path: str, headers: dict[str, str] | None = None, *, timeout: float = 30
) -> tuple[int, dict[str, str], bytes, bool]:
    """GET over a fresh connection: (status, headers, body, whether the body was complete)."""
    return await http_request(port, "GET", path, headers, timeout=timeout)


async def http_request(
    port: int,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    *,
    timeout: float = 30,
) -> tuple[int, dict[str, str], bytes, bool]:
    """One request over a fresh connection: (status, headers, body, whether it was complete)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        sent = {**(headers or {}), "Content-Length": str(len(body))} if body else headers or {}
        extra = "".join(f"{k}: {v}\r\n" for k, v in sent.items())
        request = f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{extra}\r\n"
        writer.write(request.encode() + body)
        with anyio.fail_after(timeout):
            raw = await reader.read()
    finally:
        writer.transport.abort()
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    fields = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    if fields.get("transfer-encoding") == "chunked":
        body, complete = _dechunk(rest)
    else:
        body = rest
        complete = len(rest) == int(fields.get("content-length", len(rest)))
    return status, fields, body, complete


async def settled_states(url: str, app_name: str, within: float = 5.0) -> list[str]:
    """The states of `app_name`'s backends once all are idle, or as they are after `within`."""
    states: list[str] = []
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        for _ in range(int(within / 0.05)):
            cur = await conn.execute(
                "SELECT coalesce(state, '') FROM pg_stat_activity WHERE application_name = %s",
                (app_name,),
            )
            states = [r[0] for r in await cur.fetchall()]
            if set(states) <= {"idle"}:
                break
            await asyncio.sleep(0.05)
    return states


def _dechunk(data: bytes) -> tuple[bytes, bool]:
    body = bytearray()
    while True:
        size_line, sep, data = data.partition(b"\r\n")
        if not sep:
            return bytes(body), False
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return bytes(body), True
        body += data[:size]
        data = data[size + 2 :]
