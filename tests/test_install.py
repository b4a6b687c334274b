"""A non-editable install (``pip install .``) runs from any working directory: the package data
(model presets, synonym table, demo config) ships inside the packages."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import FAST, REPO

pytestmark = pytest.mark.slow


def _sh(*cmd, cwd, env=None, timeout=900):
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def test_a_non_editable_install_runs_the_pipeline_from_anywhere(tmp_path):
    # The checkout as a fresh clone would have it: tracked and new files, nothing git ignores.
    files = _sh("git", "ls-files", "-co", "--exclude-standard", "-z", cwd=REPO).split("\0")
    src = tmp_path / "src"
    for rel in filter(None, files):
        p = REPO / rel
        if p.is_file() or p.is_symlink():
            dst = src / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if p.is_symlink():
                dst.symlink_to(os.readlink(p))
            else:
                dst.write_bytes(p.read_bytes())
    # A fresh venv that sees the project venv's pinned dependencies (a .pth line) but not its
    # editable mmpipe (a .pth file inside a directory added that way is not run).
    venv = tmp_path / "venv"
    _sh(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    py = venv / "bin" / "python"
    site = _sh(py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _sh(py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-c", REPO / "constraints.txt", src,
        cwd=tmp_path)
    where = _sh(py, "-c", "import mmcore, mmpipe; print(mmcore.__file__); print(mmpipe.__file__)", cwd=tmp_path)
    assert all(line.startswith(site) for line in where.split()), where

    # From a folder that has nothing of the checkout: synth, then every stage to the report.
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PREFECT_HOME": str(work / ".prefect"), "PYTHONPATH": ""}
    mmpipe = venv / "bin" / "mmpipe"
    _sh(mmpipe, "synth", "data", "--n", "150", cwd=work, env=env)
    (work / "cfg.yaml").write_text("run_name: installed\ndata:\n  manifest: data/manifest.csv\n  label_column: label\n")
    sets = [x for item in FAST for x in ("--set", item)]
    _sh(mmpipe, "run", "cfg.yaml", *sets, "--set", "train.augment=synonym", cwd=work, env=env)
    assert (work / "runs" / "installed" / "report" / "report.html").is_file()
    # The demo's own config ships with the package too.
    out = _sh(mmpipe, "demo", "--n", "120", "--until", "clean", "--out", "demo", cwd=work, env=env)
    assert "clean" in out and (work / "demo" / "clean" / "kept.parquet").is_file()
