"""`benchmarks.instructions --revisions` measures the package it names, never another copy.

Comparing a revision with the working tree is only worth something if each server really
imports its own revision: a server started from the checkout's root finds the working
tree's package first, whatever PYTHONPATH says, and two versions then read the same.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks._runner import served
from benchmarks.instructions import REVISIONS_APP, Package, revisions

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not (REPO / ".git").exists(), reason="needs the git checkout")


def test_each_revision_is_served_from_its_own_copy(database_url: str) -> None:
    with revisions(["HEAD"]) as packages:
        (label, head), (tree_label, tree) = packages
        assert label.startswith("HEAD (")
        assert tree_label == "working tree"
        assert head.root != REPO
        assert (head.root / "fastapi_dbpool" / "__init__.py").is_file()
        assert not (head.bench / "fastapi_dbpool").exists()  # where the servers run
        # the working tree's is a copy too, served the same way as every revision
        assert tree.root != REPO
        copied = (tree.root / "fastapi_dbpool" / "_state.py").read_text()
        assert copied == (REPO / "fastapi_dbpool" / "_state.py").read_text()
        # The app checks, at import, that it got the package it was given: it starts...
        for package in (head, tree):
            with served(REVISIONS_APP, database_url, env=package.env(), cwd=package.bench):
                pass
        # ...and refuses to, on any other copy (here the working tree's, found first on
        # the path because the server runs in the checkout's root).
        elsewhere = Package(head.root, REPO)
        with (
            pytest.raises(RuntimeError, match="did not start"),
            served(REVISIONS_APP, database_url, env=elsewhere.env(), cwd=REPO),
        ):
            pass
