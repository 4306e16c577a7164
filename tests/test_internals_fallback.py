"""Where psycopg or psycopg_pool change what the package reads of their internals, the
package imports and works on their public paths (issue: a `wait()` without `interval`
raised KeyError at import)."""

import subprocess
import sys
from pathlib import Path

import psycopg
import psycopg_pool

from fastapi_dbpool import _fast_paths

modules = {"psycopg": psycopg, "psycopg_pool": psycopg_pool}


def test_the_package_imports_and_serves_on_psycopgs_own_paths(database_url: str) -> None:
    script = Path(__file__).with_name("fallback_app.py")
    done = subprocess.run(
        [sys.executable, str(script), database_url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[-1] == "ok"
    assert "cancelled: CancelledError" in lines
    assert "same backend: True" in lines  # the cancelled query was stopped, not its connection
    # a release that should have the internals and lacks them is named once, at open;
    # with the fast paths turned off on purpose (FASTAPI_DBPOOL_FAST_PATHS=0), nothing is
    for name, module, since in _fast_paths.SINCE:
        newer = _fast_paths._release(modules[module].__version__) >= since
        expected = 1 if newer and _fast_paths.ENABLED else 0
        assert done.stderr.count(f"lacks the internals of {name}") == expected, done.stderr
