# The example app under uvicorn: slim, non-root, DATABASE_URL from the environment,
# healthy when its readiness probe says so. `docker compose up` runs it with PostgreSQL.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY fastapi_dbpool ./fastapi_dbpool
COPY example_app ./example_app
RUN pip install ".[prometheus]" "uvicorn>=0.30" \
    && useradd --create-home --uid 10001 app

USER app
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2)"]
# 0.0.0.0 inside the container only: publish the port on 127.0.0.1 (see compose.yaml)
CMD ["uvicorn", "--factory", "example_app.app:from_env", "--host", "0.0.0.0", "--port", "8000"]
