"""--runner dask: image work as batches on a Dask LocalCluster, artifacts equal to the local runner's."""

from __future__ import annotations

import pytest

from mmcore import graph
from mmcore.layout import StagePaths
from tests.conftest import demo_config

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow]


def test_dask_localcluster_artifacts_equal_local_runner(synth_small, tmp_path):
    from flows.pipeline import pipeline, with_runner

    stages = graph.ORDER[: graph.ORDER.index("quality") + 1]  # clean, probe, quality
    until = stages[-1]
    local, dask = tmp_path / "local", tmp_path / "dask"
    pipeline(demo_config(synth_small / "manifest.csv", local), until=until)
    with_runner("dask", workers=2)(demo_config(synth_small / "manifest.csv", dask), until=until)
    for stage in stages:
        a, b = StagePaths.of(local, stage), StagePaths.of(dask, stage)
        assert a.kept.read_bytes() == b.kept.read_bytes(), stage
        assert a.quarantine.read_bytes() == b.quarantine.read_bytes(), stage
