"""The app test_workers runs under `uvicorn` with WEB_CONCURRENCY workers, from DBPOOL_*."""

from fastapi import FastAPI

from fastapi_dbpool import CancellationMiddleware, ConnectionDep, DBPool

db = DBPool.from_env()
app = FastAPI(lifespan=db.lifespan)
app.add_middleware(CancellationMiddleware)


@app.get("/work")
async def work(conn: ConnectionDep) -> int:
    await conn.execute("SELECT pg_sleep(0.1)")
    return 1
