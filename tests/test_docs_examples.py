"""Every Python example in README.md and docs/ runs as written (the docs cannot drift from
the code: the README's own testing example once failed at import).

Each block runs in a fresh namespace that holds what a reader has from the quickstart
(`app`, `db`, its imports): imports resolve, names exist, and every `DBPool`,
`ReadReplicas` and middleware is built and so has its settings checked, without
connecting (a pool connects only in its lifespan). docs/testing.md's blocks need a
project around them and run as a real pytest run in tests/test_docs_testing.py;
docs/observability.md's set global OpenTelemetry providers and logging, and are served
by uvicorn in tests/test_docs_served.py.
"""

import re
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SEPARATE = {"testing.md", "observability.md"}


def blocks() -> list[Any]:
    found = []
    for page in PAGES:
        if page.name in SEPARATE:
            continue
        for n, block in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), re.S)):
            found.append(pytest.param(block, id=f"{page.relative_to(ROOT)}[{n}]"))
    return found


def quickstart() -> dict[str, Any]:
    (first, *_) = re.findall(r"```python\n(.*?)```", (ROOT / "docs/index.md").read_text(), re.S)
    namespace: dict[str, Any] = {"__name__": "docs_example"}
    exec(compile("from contextlib import asynccontextmanager\n" + first, "quickstart", "exec"),
         namespace)  # fmt: skip
    return namespace


def test_the_docs_have_examples() -> None:
    assert len(blocks()) >= 8


@pytest.mark.parametrize("block", blocks())
def test_example_runs(block: str) -> None:
    if "sqlalchemy" in block:  # docs/sqlalchemy.md: the optional extra
        pytest.importorskip("sqlalchemy", reason="fastapi_dbpool[sqlalchemy] is not installed")
    exec(compile(block, "example", "exec"), quickstart())
