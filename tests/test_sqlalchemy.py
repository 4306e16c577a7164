"""SQLAlchemy sessions on the request's lease (fastapi_dbpool.sqlalchemy), against a real
server: the guarantees of ConnectionDep and TransactionDep, through an ORM session."""

import asyncio
import logging
import random
from typing import Annotated, Any

import anyio
import httpx
import psycopg
import pytest

pytest.importorskip("sqlalchemy", reason="fastapi_dbpool[sqlalchemy] is not installed")

from fastapi import BackgroundTasks, FastAPI, HTTPException
from psycopg.rows import dict_row
from sqlalchemy import Integer, String, select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from benchmarks.cancel_storm import storm
from fastapi_dbpool import (
    CancellationMiddleware,
    ConfigurationError,
    ConnectionDep,
    ConnectionReleasedError,
    DBPool,
    PoolNotRunningError,
    TransactionDep,
    WrongEventLoopError,
    deadline,
    handle_database_errors,
    lifespan,
)
from fastapi_dbpool.sqlalchemy import Sessions

from .conftest import Server, make_db, running, serve

pytestmark = pytest.mark.anyio


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "sa_items"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


def setup_table(server: Server, table: str) -> None:
    server.query(f"DROP TABLE IF EXISTS {table}")
    server.query(f"CREATE TABLE {table} (id int PRIMARY KEY, name varchar(50))")


@pytest.fixture
def table(server: Server) -> Any:
    setup_table(server, "sa_items")
    yield "sa_items"
    server.query("DROP TABLE IF EXISTS sa_items")


def orm_app(db: DBPool, orm: Sessions[AsyncSession], timeout: float | None = None) -> FastAPI:
    app = FastAPI(lifespan=db.lifespan)
    if timeout is not None:
        app.add_middleware(CancellationMiddleware, timeout=timeout)
    SessionDep = Annotated[AsyncSession, orm.session_dependency]

    @app.post("/items/{id}")
    async def create(id: int, session: SessionDep, fail: str = "") -> dict[str, int]:
        session.add(Item(id=id, name=f"n{id}"))
        await session.flush()
        if fail == "http":
            raise HTTPException(409, "no")
        if fail == "error":
            raise RuntimeError("boom")
        return {"id": id}

    @app.get("/pid")
    async def pid(session: SessionDep) -> int:
        return int((await session.execute(text("SELECT pg_backend_pid()"))).scalar_one())

    @app.get("/sleep")
    async def sleep(session: SessionDep) -> int:
        await session.execute(text("SELECT pg_sleep(3)"))
        return 0

    return app


def count(server: Server, where: str = "") -> int:
    return int(server.query(f"SELECT count(*) FROM sa_items {where}")[0][0])


async def test_a_session_commits_before_the_response_and_rolls_back_on_errors(
    database_url: str, app_name: str, server: Server, table: str
) -> None:
    # one connection: without the direct return (fast paths off) a release is put back by
    # psycopg_pool's worker, and a second connection could serve the next request
    db = make_db(database_url, app_name, max_size=1)
    orm = Sessions(db)
    async with serve(orm_app(db, orm), db) as client:
        assert (await client.post("/items/1")).status_code == 200
        assert count(server, "WHERE id = 1") == 1  # committed before the response
        assert (await client.post("/items/2?fail=http")).status_code == 409
        assert (await client.post("/items/3?fail=error")).status_code == 500
        assert count(server) == 1
        pids = {(await client.get("/pid")).json() for _ in range(5)}
        stats = db.pool.get_stats()
        discarded = db.stats().discarded_on_release
    assert len(pids) == 1  # the same connection served every request: none was replaced
    assert stats["connections_num"] == 1
    assert discarded == 0
    assert server.wait_until(lambda s: s == []) == []


async def test_a_commit_that_fails_is_a_500_and_stores_nothing(
    database_url: str, app_name: str, server: Server
) -> None:
    server.query("DROP TABLE IF EXISTS sa_deferred")
    server.query(
        "CREATE TABLE sa_deferred (id int PRIMARY KEY, other int REFERENCES sa_deferred "
        "DEFERRABLE INITIALLY DEFERRED)"
    )
    db = make_db(database_url, app_name)
    orm = Sessions(db)
    app = FastAPI(lifespan=db.lifespan)

    @app.post("/bad")
    async def bad(session: Annotated[AsyncSession, orm.session_dependency]) -> str:
        await session.execute(text("INSERT INTO sa_deferred VALUES (1, 42)"))
        return "ok"

    try:
        async with serve(app, db) as client:
            answer = await client.post("/bad")
            assert answer.status_code == 500
        assert server.query("SELECT count(*) FROM sa_deferred")[0][0] == 0
    finally:
        server.query("DROP TABLE IF EXISTS sa_deferred")


async def test_a_session_shares_the_request_connection_and_transaction(
    database_url: str, app_name: str, server: Server, table: str
) -> None:
    db = make_db(database_url, app_name, max_size=1)
    orm = Sessions(db)
    app = FastAPI(lifespan=db.lifespan)

    @app.get("/with-connection")
    async def with_connection(
        conn: ConnectionDep, session: Annotated[AsyncSession, orm.session_dependency]
    ) -> bool:
        session.add(Item(id=10, name="x"))
        await session.flush()
        # the session's transaction is the connection's: the row is visible on it
        row = await (await conn.execute("SELECT count(*) FROM sa_items")).fetchone()
        return row is not None and row[0] == 1

    @app.get("/with-transaction")
    async def with_transaction(
        tx: TransactionDep, session: Annotated[AsyncSession, orm.session_dependency]
    ) -> list[int]:
        await tx.execute("INSERT INTO sa_items VALUES (20, 'outer')")
        session.add(Item(id=21, name="inner"))
        await session.flush()
        await session.rollback()  # a savepoint inside TransactionDep's transaction
        ids = await (await tx.execute("SELECT id FROM sa_items ORDER BY id")).fetchall()
        return [r[0] for r in ids]

    async with serve(app, db) as client:
        assert (await client.get("/with-connection")).json() is True
        assert (await client.get("/with-transaction")).json() == [10, 20]
    assert [r[0] for r in server.query("SELECT id FROM sa_items ORDER BY id")] == [10, 20]


async def test_a_cut_orm_statement_is_cancelled_and_its_connection_reused(
    database_url: str, app_name: str, server: Server, table: str
) -> None:
    db = make_db(database_url, app_name, max_size=1)
    orm = Sessions(db)
    async with serve(orm_app(db, orm, timeout=0.5), db) as client:
        before = (await client.get("/pid")).json()
        answer = await client.get("/sleep")
        assert answer.status_code == 504
        states = server.wait_until(lambda s: "active" not in s, timeout=2)
        assert "active" not in states  # pg_sleep stopped on the server, not left running
        assert (await client.get("/pid")).json() == before  # the same backend, reused
        assert db.pool.get_stats()["connections_num"] == 1


async def test_notice_handlers_do_not_grow_with_requests(
    database_url: str, app_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    db = make_db(database_url, app_name, max_size=1)
    orm = Sessions(db)
    app = FastAPI(lifespan=db.lifespan)

    @app.get("/notice")
    async def notice(session: Annotated[AsyncSession, orm.session_dependency]) -> str:
        await session.execute(text("DO $$ BEGIN RAISE NOTICE 'dbpool-notice-7f3'; END $$"))
        return "ok"

    async with serve(app, db) as client:
        for _ in range(999):
            assert (await client.get("/notice")).status_code == 200
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="sqlalchemy.dialects.postgresql"):
            assert (await client.get("/notice")).status_code == 200
        assert db.pool.get_stats()["connections_num"] == 1  # all on the one connection
    notices = [r for r in caplog.records if "dbpool-notice-7f3" in r.getMessage()]
    assert len(notices) == 1  # one handler on the connection, after 1,000 checkouts


async def test_a_storm_of_cut_session_requests_over_uvicorn_leaks_and_commits_nothing(
    database_url: str,
) -> None:
    """1,000 requests through sessions under real uvicorn, each cut by its deadline or its
    client at a random moment (waiting for the pool, mid flush, mid pg_sleep); PostgreSQL
    is the witness: no query runs on past its cut, no backend is left busy, no row kept."""
    summary = await storm(database_url, requests=1000, concurrency=16, orm=True)
    print(summary.line())
    assert summary.ok, (summary.line(), summary.errors[:10])
    assert sum(summary.outcomes.values()) == 1000
    assert summary.outcomes["deadline_504"] > 100
    assert summary.outcomes["hung_up_tx"] > 100


async def test_ownership_errors_hold_for_sessions(
    database_url: str, app_name: str, table: str
) -> None:
    db = make_db(database_url, app_name)
    orm = Sessions(db)
    app = FastAPI(lifespan=db.lifespan)
    seen: list[BaseException] = []

    @app.get("/spawn")
    async def spawn(session: Annotated[AsyncSession, orm.session_dependency]) -> str:
        task = asyncio.create_task(session.execute(text("SELECT 1")))
        try:
            await task
        except BaseException as ex:
            return type(ex).__name__
        return "no error"

    @app.get("/later")
    async def later(
        session: Annotated[AsyncSession, orm.session_dependency], background: BackgroundTasks
    ) -> str:
        async def after() -> None:
            try:
                await session.execute(text("SELECT 1"))
            except BaseException as ex:
                seen.append(ex)

        background.add_task(after)
        return "ok"

    @app.get("/own-context-manager")
    async def own(conn: Annotated[AsyncConnection, orm.core_dependency]) -> int:
        # SQLAlchemy ends this block in a task of its own: allowed, as the request's
        async with AsyncSession(bind=conn) as session:
            session.add(Item(id=5, name="own"))
            await session.commit()
        return 1

    @app.get("/child-cleanup")
    async def child_cleanup(conn: Annotated[AsyncConnection, orm.core_dependency]) -> str:
        async def child() -> None:
            # its exit flushes and commits in a task of SQLAlchemy's, which the request
            # does not await: refused like any other task
            async with async_sessionmaker(bind=conn).begin() as session:
                session.add(Item(id=77, name="child"))

        try:
            await asyncio.gather(child())
        except BaseException as ex:
            return type(ex).__name__
        return "no error"

    async with serve(app, db) as client:
        assert (await client.get("/child-cleanup")).json() == "ConnectionInUseError"
        assert (await client.get("/spawn")).json() == "ConnectionInUseError"
        assert (await client.get("/later")).status_code == 200
        assert (await client.get("/own-context-manager")).status_code == 200
        for _ in range(50):
            if seen:
                break
            await asyncio.sleep(0.02)
    assert len(seen) == 1
    assert isinstance(seen[0], ConnectionReleasedError)


async def test_exhaustion_through_a_session_is_a_503(
    database_url: str, app_name: str, table: str
) -> None:
    db = make_db(database_url, app_name, max_size=1, acquire_timeout=0.3)
    orm = Sessions(db)
    async with serve(orm_app(db, orm), db) as client:
        holder = asyncio.create_task(client.get("/sleep"))
        await asyncio.sleep(0.3)
        answer = await client.get("/pid")
        assert answer.status_code == 503
        assert answer.headers["retry-after"] == "1"
        holder.cancel()
        with pytest.raises(asyncio.CancelledError):
            await holder


async def test_random_cancellations_leak_nothing(
    database_url: str, app_name: str, server: Server, table: str
) -> None:
    """200 sessions outside requests, cut by task.cancel() or an anyio cancel scope at a
    random moment: no slot leaked, no transaction left open, the same backends reused."""
    db = make_db(database_url, app_name, min_size=2, max_size=2)
    orm = Sessions(db)
    rng = random.Random(7)

    async def work(n: int) -> None:
        async with orm.session() as session:
            session.add(Item(id=1000 + n, name="c"))
            await session.flush()
            await session.execute(text("SELECT pg_sleep(0.2)"))

    async with db.open():
        pids = {
            r[0]
            for r in server.query(
                "SELECT pid FROM pg_stat_activity WHERE application_name = %s", app_name
            )
        }
        for n in range(200):
            delay = rng.uniform(0, 0.03)  # in the checkout, the INSERT, the sleep, or between
            if n % 2:
                task = asyncio.create_task(work(n))
                await asyncio.sleep(delay)
                assert not task.done()
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            else:
                with anyio.move_on_after(delay):
                    await work(n)
        stats = db.stats()
        assert stats.pool_size - stats.pool_available == 0  # nothing checked out
        assert stats.discarded_on_release == 0
        after = server.query(
            "SELECT pid, state FROM pg_stat_activity WHERE application_name = %s", app_name
        )
        assert {r[1] for r in after} == {"idle"}
        assert {r[0] for r in after} == pids
        locks = server.query(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
            "WHERE a.application_name = %s AND l.locktype = 'transactionid'",
            app_name,
        )
        assert locks[0][0] == 0
    assert count(server) == 0  # every session was cut before its commit


async def test_outside_a_request_a_session_commits_or_rolls_back(
    database_url: str, app_name: str, server: Server, table: str
) -> None:
    db = make_db(database_url, app_name)
    orm = Sessions(db)
    async with db.open():
        async with orm.session() as session:
            session.add(Item(id=1, name="kept"))

        async def fails() -> None:
            async with orm.session() as session:
                session.add(Item(id=2, name="dropped"))
                await session.flush()
                raise RuntimeError("boom")

        with pytest.raises(RuntimeError):
            await fails()
        async with orm.session() as session:
            names = (await session.execute(select(Item.name))).scalars().all()
    assert names == ["kept"]


def test_options_the_pool_owns_are_refused(database_url: str, app_name: str) -> None:
    db = make_db(database_url, app_name)
    with pytest.raises(ConfigurationError, match=r"pool_size.*min_size/max_size"):
        Sessions(db, engine_options={"pool_size": 5})
    with pytest.raises(ConfigurationError, match="session_class must be"):
        Sessions(db, session_class=dict)


async def test_database_errors_through_a_session_are_answered_as_without_one(
    database_url: str, app_name: str, table: str
) -> None:
    db = make_db(database_url, app_name)
    orm = Sessions(db)
    app = orm_app(db, orm)
    handle_database_errors(app)
    async with serve(app, db) as client:
        assert (await client.post("/items/1")).status_code == 200
        again = await client.post("/items/1")
        assert again.status_code == 409
        assert again.json()["sqlstate"] == "23505"
        assert again.json()["constraint"] == "sa_items_pkey"
        assert (await client.post("/items/2?fail=error")).status_code == 500  # not psycopg's


async def test_a_session_and_a_core_connection_share_one_transaction(
    database_url: str, app_name: str, server: Server, table: str
) -> None:
    db = make_db(database_url, app_name, max_size=1)
    orm = Sessions(db)
    other = Sessions(db)
    app = FastAPI(lifespan=db.lifespan)

    @app.post("/both/{first}")
    async def both(
        first: str,
        conn: Annotated[AsyncConnection, orm.core_dependency],
        session: Annotated[AsyncSession, orm.session_dependency],
        fail: bool = False,
    ) -> bool:
        await conn.execute(text("INSERT INTO sa_items VALUES (1, 'core')"))
        session.add(Item(id=2, name="orm"))
        await session.flush()
        seen = (await conn.execute(text("SELECT count(*) FROM sa_items"))).scalar_one()
        if fail:
            raise RuntimeError("boom")
        return bool(seen == 2)

    @app.get("/two-sessions")
    async def two(
        session: Annotated[AsyncSession, orm.session_dependency],
        again: Annotated[AsyncSession, other.session_dependency],
    ) -> str:
        return "unreachable"

    async with serve(app, db) as client:
        assert (await client.post("/both/core?fail=true")).status_code == 500
        assert count(server) == 0  # neither part committed
        assert (await client.post("/both/core")).json() is True
        assert count(server) == 2  # both committed, together
        assert (await client.get("/two-sessions")).status_code == 500
        assert db.stats().discarded_on_release == 0


async def test_what_a_session_sets_on_the_connection_does_not_outlive_it(
    database_url: str, app_name: str, server: Server, table: str
) -> None:
    """An isolation level and read-only mode set through SQLAlchemy, then a deadline cut
    (SQLAlchemy invalidates and undoes nothing): the next request's connection is back as
    the pool made it. A pool-wide dict row_factory does not reach SQLAlchemy's cursors."""
    db = make_db(database_url, app_name, max_size=1, kwargs={"row_factory": dict_row})
    orm = Sessions(db)
    app = FastAPI(lifespan=db.lifespan)
    app.add_middleware(CancellationMiddleware, timeout=0.5)

    @app.get("/serializable-sleep")
    async def serializable(conn: Annotated[AsyncConnection, orm.core_dependency]) -> int:
        await conn.execution_options(isolation_level="SERIALIZABLE", postgresql_readonly=True)
        await conn.execute(text("SELECT pg_sleep(3)"))
        return 0

    @app.get("/settings")
    async def settings(raw: ConnectionDep) -> dict[str, Any]:
        row = await (
            await raw.execute(
                "SELECT current_setting('transaction_isolation') AS iso, "
                "current_setting('transaction_read_only') AS ro"
            )
        ).fetchone()
        return {"row": row, "isolation": raw.isolation_level, "read_only": raw.read_only}

    @app.get("/orm-rows")
    async def orm_rows(session: Annotated[AsyncSession, orm.session_dependency]) -> list[str]:
        return list((await session.execute(text("SELECT 'a' AS x"))).scalars())

    async with serve(app, db) as client:
        assert (await client.get("/serializable-sleep")).status_code == 504
        answer = (await client.get("/settings")).json()
        assert answer == {
            "row": {"iso": "read committed", "ro": "off"},  # still dict rows for raw psycopg
            "isolation": None,
            "read_only": None,
        }
        assert (await client.get("/orm-rows")).json() == ["a"]
        assert (await client.get("/settings")).json()["row"] == {
            "iso": "read committed",
            "ro": "off",
        }


async def test_transaction_dep_after_a_session_is_refused_clearly(
    database_url: str, app_name: str, table: str
) -> None:
    db = make_db(database_url, app_name, max_size=1)
    orm = Sessions(db)
    app = FastAPI(lifespan=db.lifespan)
    errors: list[BaseException] = []

    @app.exception_handler(ConfigurationError)
    async def seen(request: Any, exc: Exception) -> Any:
        errors.append(exc)
        raise exc

    @app.get("/wrong-order")
    async def wrong(
        session: Annotated[AsyncSession, orm.session_dependency], tx: TransactionDep
    ) -> str:
        return "unreachable"

    async with serve(app, db) as client:
        assert (await client.get("/wrong-order")).status_code == 500
        assert db.stats().discarded_on_release == 0
    assert errors  # the app's handler saw it (on its way to the 500)
    assert all("declare TransactionDep first" in str(ex) for ex in errors)


async def test_a_session_without_the_lifespan_or_on_another_loop_gets_the_clear_errors(
    database_url: str, app_name: str
) -> None:
    db = make_db(database_url, app_name)
    orm = Sessions(db)
    app = FastAPI()  # lifespan=db.lifespan forgotten

    @app.get("/one")
    async def one(session: Annotated[AsyncSession, orm.session_dependency]) -> int:
        return int((await session.execute(text("SELECT 1"))).scalar_one())

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        with pytest.raises(PoolNotRunningError, match=r"lifespan=db\.lifespan"):
            await client.get("/one")

    async def on_its_own_loop() -> None:
        async with orm.session() as session:
            await session.execute(text("SELECT 1"))

    async with db.open():
        with pytest.raises(WrongEventLoopError):
            await asyncio.to_thread(asyncio.run, on_its_own_loop())
        async with orm.session() as session:  # and the pool still serves its own loop
            assert (await session.execute(text("SELECT 2"))).scalar_one() == 2


async def test_sessions_of_two_pools_in_one_request_commit_each_on_its_own_database(
    database_url: str, app_name: str, server: Server, table: str
) -> None:
    first = make_db(database_url, f"{app_name}_a")
    second = make_db(database_url, f"{app_name}_b")
    a, b = Sessions(first), Sessions(second)
    app = FastAPI(lifespan=lifespan(first, second))

    @app.post("/both/{id}")
    async def both(
        id: int,
        one: Annotated[AsyncSession, a.session_dependency],
        two: Annotated[AsyncSession, b.session_dependency],
        fail: bool = False,
    ) -> list[int]:
        one.add(Item(id=id, name="a"))
        two.add(Item(id=id + 1, name="b"))
        await one.flush()
        await two.flush()
        if fail:
            raise HTTPException(409, "no")
        pids = [await one.scalar(text("SELECT pg_backend_pid()"))]
        return [*pids, await two.scalar(text("SELECT pg_backend_pid()"))]

    async with running(app) as client:
        answer = await client.post("/both/1")
        assert answer.status_code == 200
        assert len(set(answer.json())) == 2  # a connection of each pool
        assert (await client.post("/both/10", params={"fail": True})).status_code == 409
    assert server.query("SELECT id, name FROM sa_items ORDER BY id") == [(1, "a"), (2, "b")]


async def test_behind_a_transaction_pooler_a_sessions_deadline_is_local_to_its_transaction(
    app_name: str, pgbouncer: Any
) -> None:
    """Behind PgBouncer in transaction mode, the request's budget is a SET LOCAL in the
    session's transaction, never a session SET another client could inherit."""
    db = make_db(pgbouncer.url, app_name, transaction_pooler=True, max_size=4)
    orm = Sessions(db)
    app = FastAPI(lifespan=db.lifespan)
    app.add_middleware(CancellationMiddleware, timeout=10)

    @app.get("/timeout", dependencies=[deadline(1.1)])
    async def timeout(session: Annotated[AsyncSession, orm.session_dependency]) -> str:
        return str(await session.scalar(text("SHOW statement_timeout")))

    with psycopg.connect(pgbouncer.url, autocommit=True, prepare_threshold=None) as other:
        async with serve(app, db) as client:
            answers = await asyncio.gather(*(client.get("/timeout") for _ in range(40)))
        shown = {a.json() for a in answers}
        assert {a.status_code for a in answers} == {200}
        # PostgreSQL shows 1000ms as "1s"
        millis = {int(s[:-2]) if s.endswith("ms") else 1000 * int(s[:-1]) for s in shown}
        assert all(0 < ms <= 1200 for ms in millis), shown
        for _ in range(8):  # whichever backend PgBouncer gives it
            assert other.execute("SHOW statement_timeout").fetchone() == ("0",)
