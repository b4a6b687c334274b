"""The CLI commands that compose flows: ablate (paired comparison) and evaluate --data (another dataset)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mmcore import synth, tables
from tests.conftest import FAST, REPO

pytestmark = pytest.mark.slow


def _cli(*args, cwd, env_home):
    env = {**__import__("os").environ, "PREFECT_HOME": str(env_home)}
    return subprocess.run([sys.executable, "-m", "mmpipe", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=900, env=env)


def _sets(*items):
    return [x for item in items for x in ("--set", item)]


def test_ablate_and_evaluate_on_another_dataset(synth_small, tmp_path):
    run = tmp_path / "run"
    common = _sets(f"data.manifest={synth_small / 'manifest.csv'}", *FAST)
    r = _cli("ablate", str(REPO / "configs" / "demo.yaml"), *common, "--out", str(run),
             "--schemes", "none,aligned", "--seeds", "2", cwd=tmp_path, env_home=tmp_path / ".prefect")
    assert r.returncode == 0, r.stderr[-3000:]
    table = tables.read_parquet(run / "evaluate" / "ablation.parquet")
    assert set(table["scheme"]) == {"none", "aligned"}
    for col in ("value", "low", "high", "diff", "diff_low", "diff_high", "p_value"):
        assert col in table.columns
    base = table[table["scheme"] == "none"]
    assert (base["diff"].abs() < 1e-12).all()  # the baseline against itself
    assert ((table["low"] <= table["value"]) & (table["value"] <= table["high"])).all()
    for scheme in ("none", "aligned"):
        for seed in (0, 1):
            assert (run / "ablate" / f"{scheme}-s{seed}" / "evaluate" / "metrics.json").is_file()
    # The report re-renders once the ablation table exists (its cache key covers evaluate/).
    assert "<h3>Ablation</h3>" in (run / "report" / "report.html").read_text()

    # The trained model of one variant on another dataset, after the same curation stages.
    other = tmp_path / "other"
    synth.generate(other, n=150, seed=5)
    (tmp_path / "other.yaml").write_text(
        f"run_name: other\ndata:\n  manifest: {other / 'manifest.csv'}\n  label_column: label\n  domain_column: domain\n"
    )
    variant = run / "ablate" / "none-s0"
    r = _cli("evaluate", str(variant), "--data", str(tmp_path / "other.yaml"), cwd=tmp_path,
             env_home=tmp_path / ".prefect")
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = tables.read_json(variant / "evaluate" / "external" / "other" / "metrics.json")
    r5 = metrics["test"]["retrieval"]["i2t_r5"]
    assert r5["low"] <= r5["value"] <= r5["high"]
    curated = variant / "evaluate" / "external" / "other" / "curation"
    assert tables.read_json(tables.StagePaths.of(curated, "quality").stats)["n_quarantined"] > 0  # its defects caught

    # The external evaluation is a flow, cached like the others: a second call computes nothing.
    written = (variant / "evaluate" / "external" / "other" / "metrics.json").stat().st_mtime_ns
    r = _cli("evaluate", str(variant), "--data", str(tmp_path / "other.yaml"), cwd=tmp_path,
             env_home=tmp_path / ".prefect")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (variant / "evaluate" / "external" / "other" / "metrics.json").stat().st_mtime_ns == written
    # A name that would leave the run folder is refused before anything is written.
    r = _cli("evaluate", str(variant), "--data", str(tmp_path / "other.yaml"), "--name", "../x", cwd=tmp_path,
             env_home=tmp_path / ".prefect")
    assert r.returncode == 2 and r.stderr.startswith("error: evaluate --data: dataset name must match")
