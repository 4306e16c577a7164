"""Alembic's env.py, run on a connection of a DBPool built as the app builds its own
(``DATABASE_URL``, ``DBPOOL_PASSWORD_FILE``, the dead-peer defaults, redacted errors)."""

import asyncio
from logging.config import fileConfig

from alembic import context
from notes_models import Base
from sqlalchemy.engine import Connection

from fastapi_dbpool import DBPool
from fastapi_dbpool.sqlalchemy import Sessions

config = context.config
if config.config_file_name is not None:
    fileConfig(config.config_file_name)
target_metadata = Base.metadata


def do_run_migrations(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata)
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations() -> None:
    db = DBPool.from_env(name="migrations", min_size=1, max_size=1)
    orm = Sessions(db)
    async with db.open(), orm.connect() as connection:  # committed when the block succeeds
        await connection.run_sync(do_run_migrations)


if context.is_offline_mode():
    raise SystemExit("This env.py runs migrations online only (no --sql).")
asyncio.run(run_async_migrations())
