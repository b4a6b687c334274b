"""The design rules a reader relies on: mmcore imports without Prefect; flows and tasks stay thin."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_mmcore_imports_without_prefect():
    modules = sorted(p.stem for p in (REPO / "mmcore").glob("*.py") if p.stem != "__init__")
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module('mmcore.' + m)\n"
        "bad = sorted(m for m in sys.modules if m == 'prefect' or m.startswith('prefect.'))\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


def test_no_prefect_import_statement_in_mmcore():
    for path in (REPO / "mmcore").glob("*.py"):
        for line in path.read_text().splitlines():
            s = line.strip()
            assert not (s.startswith("import prefect") or s.startswith("from prefect")), (path, line)


def test_readme_documents_every_reason_code_and_command():
    import importlib

    from mmcore import tables

    readme = (REPO / "README.md").read_text()
    for stage in graph.ORDER:
        for code in getattr(importlib.import_module(f"mmcore.{stage}"), "REASONS", {}):
            assert f"| {stage} | `{code}` |" in readme, (stage, code)
    for cmd in ("make demo", "make test", "mmpipe synth", "mmpipe run", "mmpipe inspect", "mmpipe report"):
        assert cmd in readme, cmd
