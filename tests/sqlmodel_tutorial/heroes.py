"""SQLModel's FastAPI tutorial app (the heroes, with HeroCreate/HeroPublic/HeroUpdate),
switched to fastapi_dbpool as docs/sqlalchemy.md says. What changed from the tutorial:

- the engine and ``get_session`` are gone: ``DBPool.from_env()`` (``DATABASE_URL``) and
  ``Sessions(db, session_class=AsyncSession)`` give ``SessionDep``;
- the routes are ``async`` and ``await`` the session (SQLModel's ``AsyncSession``);
- the tables are created when the pool opens, through ``orm.connect()``.

Run it: ``DATABASE_URL=postgresql://... uvicorn heroes:app``.
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Query
from sqlmodel import Field, SQLModel, select
from sqlmodel.ext.asyncio.session import AsyncSession

from fastapi_dbpool import DBPool
from fastapi_dbpool.sqlalchemy import Sessions


class HeroBase(SQLModel):
    name: str = Field(index=True)
    age: int | None = Field(default=None, index=True)


class Hero(HeroBase, table=True):
    id: int | None = Field(default=None, primary_key=True)
    secret_name: str


class HeroPublic(HeroBase):
    id: int


class HeroCreate(HeroBase):
    secret_name: str


class HeroUpdate(HeroBase):
    name: str | None = None  # type: ignore[assignment]
    age: int | None = None
    secret_name: str | None = None


db = DBPool.from_env()
orm = Sessions(db, session_class=AsyncSession)
SessionDep = Annotated[AsyncSession, orm.session_dependency]


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
    async with db.lifespan(app) as state:
        async with orm.connect() as conn:
            await conn.run_sync(SQLModel.metadata.create_all)
        yield state


app = FastAPI(lifespan=lifespan)


@app.post("/heroes/", response_model=HeroPublic)
async def create_hero(hero: HeroCreate, session: SessionDep) -> Hero:
    db_hero = Hero.model_validate(hero)
    session.add(db_hero)
    await session.commit()
    await session.refresh(db_hero)
    return db_hero


@app.get("/heroes/", response_model=list[HeroPublic])
async def read_heroes(
    session: SessionDep, offset: int = 0, limit: Annotated[int, Query(le=100)] = 100
) -> Any:
    return (await session.exec(select(Hero).offset(offset).limit(limit))).all()


@app.get("/heroes/{hero_id}", response_model=HeroPublic)
async def read_hero(hero_id: int, session: SessionDep) -> Hero:
    hero = await session.get(Hero, hero_id)
    if not hero:
        raise HTTPException(status_code=404, detail="Hero not found")
    return hero


@app.patch("/heroes/{hero_id}", response_model=HeroPublic)
async def update_hero(hero_id: int, hero: HeroUpdate, session: SessionDep) -> Hero:
    hero_db = await session.get(Hero, hero_id)
    if not hero_db:
        raise HTTPException(status_code=404, detail="Hero not found")
    hero_db.sqlmodel_update(hero.model_dump(exclude_unset=True))
    session.add(hero_db)
    await session.commit()
    await session.refresh(hero_db)
    return hero_db


@app.delete("/heroes/{hero_id}")
async def delete_hero(hero_id: int, session: SessionDep) -> dict[str, bool]:
    hero = await session.get(Hero, hero_id)
    if not hero:
        raise HTTPException(status_code=404, detail="Hero not found")
    await session.delete(hero)
    await session.commit()
    return {"ok": True}
