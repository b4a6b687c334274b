"""Shared fixtures: one Prefect test harness per session, and small synthetic datasets."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Before Prefect is imported anywhere: its home, results and cache records in a throwaway folder.
_PREFECT_TMP = Path(tempfile.mkdtemp(prefix="mmpipe-prefect-"))
os.environ["PREFECT_HOME"] = str(_PREFECT_TMP / "home")
os.environ["PREFECT_LOCAL_STORAGE_PATH"] = str(_PREFECT_TMP / "storage")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "mmcore,mmpipe")  # read retries, events reach the task logs

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect server and database for the whole session (starting one costs seconds)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def synth_small(tmp_path_factory) -> Path:
    """A 300-row synthetic dataset, generated once; tests must not modify it."""
    from mmcore import synth

    out = tmp_path_factory.mktemp("synth") / "data"
    synth.generate(out, n=300, seed=0)
    return out


# Train and evaluate briefly in flow tests: the stages' own tests cover their behaviour in depth.
FAST = (
    "train.steps=2",
    "train.batch_size=16",
    "train.num_workers=0",
    "evaluate.bootstrap=50",
    "evaluate.splits=[test]",
    "evaluate.degradations={downscale: [2]}",
    "evaluate.spotcheck_n=3",
)


def demo_config(manifest: Path, out: Path, *overrides: str, fast: bool = True):
    from mmcore.config import load_config

    extra = FAST if fast else ()
    return load_config(REPO / "configs" / "demo.yaml", [f"data.manifest={manifest}", f"out={out}", *extra, *overrides])


def wait_until(predicate, what: str, timeout: float = 60, interval: float = 0.5):
    """Poll ``predicate`` until it returns something true (returned) or fail after ``timeout`` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (got := predicate()):
            return got
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def write_train_run(run_dir: Path, table, data, train: dict) -> None:
    """A run folder ``mmpipe train`` (torchrun's entry) can train in: train's input table and a config.yaml."""
    import yaml

    from mmcore import graph, tables

    run_dir.mkdir(parents=True)
    tables.write_parquet(table, tables.StagePaths.of(run_dir, graph.stage("train").input).kept)
    cfg = {"data": {"manifest": str(data.manifest), "label_column": "label", "domain_column": "domain"},
           "workers": 1, "train": train}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
