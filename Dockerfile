# The example app under uvicorn: slim, non-root, DATABASE_URL from the environment.
# `docker compose up` runs it with PostgreSQL. Pin the base to the patch release you test
# (an update is then a change you see and review).
FROM python:3.12.8-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FORWARDED_ALLOW_IPS=127.0.0.1

WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY fastapi_dbpool ./fastapi_dbpool
COPY example_app ./example_app
# DL3013: "." is this checkout, whose dependencies pyproject.toml bounds
# hadolint ignore=DL3013
RUN pip install ".[binary,prometheus]" "uvicorn==0.55.0" \
    && useradd --create-home --uid 10001 app

# numeric, so that Kubernetes' runAsNonRoot can verify it
USER 10001
EXPOSE 8000
# Liveness, not readiness: a database outage must take the app out of the load balancer's
# rotation (its readiness probe, /readyz), not mark every container unhealthy.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/livez', timeout=2)"]
# 0.0.0.0 inside the container only: publish the port on 127.0.0.1 (see compose.yaml).
# Behind a load balancer, set FORWARDED_ALLOW_IPS to its address(es), so that uvicorn
# takes the client's address and scheme from its X-Forwarded-* headers.
CMD ["uvicorn", "--factory", "example_app.app:from_env", "--host", "0.0.0.0", "--port", "8000", "--proxy-headers"]
