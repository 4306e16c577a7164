"""What the Dockerfile and compose.yaml rely on, checked without a Docker engine."""

import re
import shlex
from pathlib import Path

import pytest

from example_app.app import from_env

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instructions(name: str) -> list[str]:
    joined = DOCKERFILE.replace("\\\n", " ")
    return [line.split(None, 1)[1] for line in joined.splitlines() if line.startswith(name + " ")]


def test_every_copied_path_exists() -> None:
    for args in instructions("COPY"):
        *sources, _target = shlex.split(args)
        for source in sources:
            assert (ROOT / source).exists(), source


def test_it_runs_as_a_numeric_non_root_user_and_checks_liveness() -> None:
    assert instructions("USER") == ["10001"]  # runAsNonRoot verifies a number, not a name
    assert "useradd --create-home --uid 10001" in DOCKERFILE
    (healthcheck,) = instructions("HEALTHCHECK")
    assert "/livez" in healthcheck  # an outage of the database is not an unhealthy app
    assert instructions("EXPOSE") == ["8000"]


def test_the_build_context_holds_only_what_it_copies() -> None:
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignored[ignored.index("*") :][:1] == ["*"]  # everything out, then the COPY sources in
    for args in instructions("COPY"):
        *sources, _target = shlex.split(args)
        for source in sources:
            assert f"!{source.rstrip('/')}" in {line.rstrip("/") for line in ignored}, source


def test_the_command_it_runs_builds_the_app_with_the_routes_it_probes(
    monkeypatch: pytest.MonkeyPatch, database_url: str
) -> None:
    (cmd,) = instructions("CMD")
    assert '"--factory", "example_app.app:from_env"' in cmd
    assert '"--port", "8000"' in cmd
    assert '"--proxy-headers"' in cmd
    assert "FORWARDED_ALLOW_IPS=127.0.0.1" in DOCKERFILE
    monkeypatch.setenv("DATABASE_URL", database_url)
    app = from_env()  # builds without connecting: the lifespan opens the pool
    paths = set(app.openapi()["paths"])
    assert {"/livez", "/readyz", "/items", "/export", "/report"} <= paths


def test_compose_points_the_app_at_its_database_and_publishes_on_localhost() -> None:
    compose = (ROOT / "compose.yaml").read_text()
    assert "DATABASE_URL: postgresql://postgres:example@db:5432/postgres" in compose
    assert '"127.0.0.1:8000:8000"' in compose
    assert "condition: service_healthy" in compose


def test_the_start_order_the_docs_show_is_compose_yamls() -> None:
    """docs/docker.md shows how compose orders the start: what it shows must be there."""
    page = (ROOT / "docs" / "docker.md").read_text()
    (shown,) = re.findall(r"```yaml\n(.*?)```", page, re.S)
    compose = (ROOT / "compose.yaml").read_text()
    for line in shown.splitlines():
        if line.strip().startswith(("test:", "condition:", "interval:", "retries:")):
            assert line.strip() in compose, line
