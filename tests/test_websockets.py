"""WebSockets, as the README advises: a checkout per message through `db.connection()`,
because a `ConnectionDep` holds its connection for the socket's whole life."""

import pytest
from fastapi import FastAPI, WebSocket
from fastapi.testclient import TestClient

from fastapi_dbpool import ConnectionDep

from .conftest import make_db


@pytest.fixture
def app(database_url: str, app_name: str) -> FastAPI:
    db = make_db(database_url, app_name, min_size=1, max_size=1)
    app = FastAPI(lifespan=db.lifespan)

    @app.websocket("/upper")
    async def upper(ws: WebSocket) -> None:
        await ws.accept()
        async for text in ws.iter_text():
            async with db.connection() as conn:  # held for one message only
                cur = await conn.execute("SELECT upper(%s)", (text,))
                row = await cur.fetchone()
            await ws.send_text(row[0] if row else "")

    @app.websocket("/held")
    async def held(ws: WebSocket, conn: ConnectionDep) -> None:
        await ws.accept()
        async for _ in ws.iter_text():
            await ws.send_text(str(db.stats().pool_available))

    return app


def test_sockets_taking_a_connection_per_message_share_a_pool_of_one(app: FastAPI) -> None:
    with (
        TestClient(app) as client,
        client.websocket_connect("/upper") as a,
        client.websocket_connect("/upper") as b,
    ):
        for n in range(3):
            a.send_text(f"a{n}")
            b.send_text(f"b{n}")
            assert (a.receive_text(), b.receive_text()) == (f"A{n}", f"B{n}")


def test_a_connection_dependency_holds_its_connection_while_the_socket_is_open(
    app: FastAPI,
) -> None:
    with TestClient(app) as client, client.websocket_connect("/held") as ws:
        for _ in range(2):
            ws.send_text("?")
            assert ws.receive_text() == "0"  # the pool's only connection stays out
