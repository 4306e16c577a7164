"""Where psycopg or psycopg_pool change what the package reads of their internals, the
package imports and works on their public paths (issue: a `wait()` without `interval`
raised KeyError at import)."""

import subprocess
import sys
from pathlib import Path


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
