"""The stage graph on real runs: staleness follows the real (non-linear) graph, a torchrun training
is judged like the flow's, and editing the report's code re-runs the report alone."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from mmcore import graph, tables
from mmcore.layout import RunLayout
from mmcore.stale import stale
from tests.conftest import FAST, REPO, demo_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


def _status(run_dir) -> dict[str, str]:
    return {r["stage"]: r["status"] + (f" ({r['why']})" if r["why"] else "") for r in stale(run_dir)}


def test_a_row_quarantined_by_train_leaves_nothing_stale(synth_small, tmp_path):
    """Evaluate reads split's table, not train's: a row train drops does not make it look stale."""
    from flows.pipeline import pipeline

    data = shutil.copytree(synth_small, tmp_path / "data")
    # Settings of its own: no path is in a cache key, so another test's training on the same rows
    # would otherwise be a cache hit here, and train would never read the broken file.
    cfg = demo_config(data / "manifest.csv", tmp_path / "run", "train.seed=11")
    pipeline(cfg, until="split")
    split = tables.load(cfg.run_dir, "split")
    image = data / split.loc[split["split"] == "train", tables.IMAGE].iloc[0]
    # Garbage of the same size and mtime: the probe's quick fingerprint (size, mtime) still matches,
    # so clean..split stay cached and only train, which decodes the file, finds it broken.
    st = image.stat()
    image.write_bytes(b"\xff" * st.st_size)
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    pipeline(cfg)
    trained = tables.read_json(tables.StagePaths.of(cfg.run_dir, "train").stats)
    assert trained["reasons"] == {"decode_failed": 1}
    assert _status(cfg.run_dir) == {s: "fresh" for s in graph.ORDER}


def test_a_torchrun_training_is_not_stale(synth_small, tmp_path):
    from flows.pipeline import pipeline

    cfg = demo_config(synth_small / "manifest.csv", tmp_path / "run")
    pipeline(cfg, until=graph.stage("train").input)  # up to train's input stage
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           "-m", "mmpipe", "train", str(cfg.run_dir)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    status = _status(cfg.run_dir)
    assert status["train"] == "fresh", status
    assert status["evaluate"].startswith("not run")


def test_editing_report_code_reruns_the_report_and_nothing_else(synth_small, tmp_path):
    """Two CLI runs from a copy of the code, the report's and plots' sources edited in between."""
    src = tmp_path / "src"
    for pkg in ("mmcore", "mmpipe", "flows", "tasks", "deployments"):
        shutil.copytree(REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(src), "PREFECT_HOME": str(tmp_path / ".prefect")}
    sets = [x for item in (f"data.manifest={synth_small / 'manifest.csv'}", *FAST) for x in ("--set", item)]
    cmd = [sys.executable, "-m", "mmpipe", "run", str(REPO / "configs" / "demo.yaml"), *sets, "--out", str(tmp_path / "run")]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    report_code = [p for p in (src / "mmcore").rglob("*.py") if "report" in p.parts or p.stem in ("report", "plots")]
    assert report_code
    for p in report_code:
        p.write_text(p.read_text() + "\n# edited: a new colour for the funnel\n")
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    run = RunLayout(tmp_path / "run")
    cached = {s: tables.read_json(run.stage(s).status)["cached"] for s in graph.ORDER}
    assert cached == {**{s: True for s in graph.ORDER[:-1]}, "report": False}
