"""The tutorial's tests (test_main.py), async, on the plugin's dbpool_client."""

import pytest
from httpx import AsyncClient

pytestmark = pytest.mark.asyncio


async def test_create_hero(dbpool_client: AsyncClient) -> None:
    response = await dbpool_client.post(
        "/heroes/", json={"name": "Deadpond", "secret_name": "Dive Wilson"}
    )
    data = response.json()
    assert response.status_code == 200
    assert data["name"] == "Deadpond"
    assert data["age"] is None
    assert data["id"] is not None


async def test_create_hero_incomplete(dbpool_client: AsyncClient) -> None:
    response = await dbpool_client.post("/heroes/", json={"name": "Deadpond"})
    assert response.status_code == 422


async def test_read_heroes(dbpool_client: AsyncClient) -> None:
    for body in (
        {"name": "Deadpond", "secret_name": "Dive Wilson"},
        {"name": "Rusty-Man", "secret_name": "Tommy Sharp", "age": 48},
    ):
        assert (await dbpool_client.post("/heroes/", json=body)).status_code == 200
    data = (await dbpool_client.get("/heroes/")).json()
    assert [(h["name"], h["age"]) for h in data] == [("Deadpond", None), ("Rusty-Man", 48)]


async def test_a_test_sees_no_hero_of_another(dbpool_client: AsyncClient) -> None:
    assert (await dbpool_client.get("/heroes/")).json() == []


async def test_update_and_delete_hero(dbpool_client: AsyncClient) -> None:
    hero = (
        await dbpool_client.post("/heroes/", json={"name": "Deadpond", "secret_name": "Dive"})
    ).json()
    response = await dbpool_client.patch(f"/heroes/{hero['id']}", json={"name": "Deadpuddle"})
    assert response.json()["name"] == "Deadpuddle"
    assert (await dbpool_client.delete(f"/heroes/{hero['id']}")).json() == {"ok": True}
    assert (await dbpool_client.get(f"/heroes/{hero['id']}")).status_code == 404
