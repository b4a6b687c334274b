"""The real Prefect flow on a small synthetic set: caching, byte-identical re-runs, artifacts."""

from __future__ import annotations

import shutil
from collections import Counter

import pytest

from mmcore import graph, tables
from tests.conftest import demo_config, wait_until

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _status(run_dir, stage):
    return tables.read_json(tables.StagePaths.of(run_dir, stage).status)


def _bytes(run_dir, stage):
    p = tables.StagePaths.of(run_dir, stage)
    return p.kept.read_bytes(), p.quarantine.read_bytes()


def test_rerun_is_cached_and_byte_identical_and_config_change_reruns(synth_small, tmp_path):
    from flows.pipeline import pipeline

    run_dir = tmp_path / "run"
    cfg = demo_config(synth_small / "manifest.csv", run_dir)
    pipeline(cfg)  # may come from the cache of an earlier run of the same inputs elsewhere (keys hold no path)
    first = {s: _bytes(run_dir, s) for s in graph.ORDER}
    assert (run_dir / "config.yaml").is_file()

    pipeline(cfg)
    assert all(_status(run_dir, s)["cached"] for s in graph.ORDER[:-1])
    assert {s: _bytes(run_dir, s) for s in graph.ORDER} == first
    # The report shows which stages came from cache: it re-renders once the badges change, then not.
    pipeline(cfg)
    assert all(_status(run_dir, s)["cached"] for s in graph.ORDER)

    # A clean threshold changes: clean (and everything after it) runs again.
    pipeline(demo_config(synth_small / "manifest.csv", run_dir, "clean.min_chars=35"))
    assert not _status(run_dir, "clean")["cached"]
    assert tables.read_json(tables.StagePaths.of(run_dir, "clean").stats)["reasons"]["caption_too_short"] > 0

    # A deleted artifact is not "cached": the stage runs again and restores the same bytes.
    pipeline(cfg)
    tables.StagePaths.of(run_dir, "clean").kept.unlink()
    pipeline(cfg)
    assert _bytes(run_dir, "clean") == first["clean"]


def test_extra_digests_are_computed_once_by_the_cache_key_and_recorded(synth_small, tmp_path, monkeypatch):
    """Each stage's graph ``extra`` digest: computed by its cache key only, recorded in its stats, seen by stale()."""
    import dataclasses

    from flows.pipeline import pipeline
    from mmcore import stale
    from mmcore.resources import DEFAULT_SYNONYMS

    calls: Counter[str] = Counter()
    with_extra = [s for s in graph.STAGES.values() if s.extra is not None and s.name != "report"]
    for s in with_extra:
        def counted(cfg, run_dir, _stage=s.name, _digest=s.extra.digest):
            calls[_stage] += 1
            return _digest(cfg, run_dir)

        monkeypatch.setitem(graph.STAGES, s.name, dataclasses.replace(s, extra=graph.Extra(s.extra.what, counted)))
    keyed = [s.name for s in with_extra]
    synonyms = shutil.copy(DEFAULT_SYNONYMS, tmp_path / "synonyms.yaml")
    cfg = demo_config(synth_small / "manifest.csv", tmp_path / "run", f"train.synonyms={synonyms}")

    pipeline(cfg, until="evaluate")
    assert calls == {s: 1 for s in keyed}  # not again in the task body
    pipeline(cfg, until="evaluate")
    assert calls == {s: 2 for s in keyed} and all(_status(cfg.run_dir, s)["cached"] for s in keyed)
    for s in keyed:
        recorded = tables.read_json(tables.StagePaths.of(cfg.run_dir, s).stats)["extra_digest"]
        assert recorded == stale.extra_digest(s, cfg), s
    assert {r["stage"]: r["status"] for r in stale.stale(cfg.run_dir, cfg)}["evaluate"] == "fresh"

    # An edited synonym table: train is stale, and the next run trains again.
    with open(synonyms, "a") as f:
        f.write("square: [box]\n")
    assert {r["stage"]: r["status"] for r in stale.stale(cfg.run_dir, cfg)}["train"] == "stale"
    pipeline(cfg, until="train")
    assert not _status(cfg.run_dir, "train")["cached"]


def test_touching_one_image_reruns_probe_and_quality_not_clean(synth_small, tmp_path):
    """Unchanged inputs come from cache; one image's bytes changed re-runs the stages that read images."""
    from flows.pipeline import pipeline

    data = shutil.copytree(synth_small, tmp_path / "data")  # an image is edited below
    cfg = demo_config(data / "manifest.csv", tmp_path / "run")
    pipeline(cfg, until="quality")
    pipeline(cfg, until="quality")
    assert all(_status(cfg.run_dir, s)["cached"] for s in ("clean", "probe", "quality"))
    probed = tables.load(cfg.run_dir, "probe")
    image = data / probed[tables.IMAGE].iloc[0]
    image.write_bytes(image.read_bytes() + b"\0")  # still a whole JPEG: only its digest changes
    pipeline(cfg, until="quality")
    assert _status(cfg.run_dir, "clean")["cached"]
    assert not _status(cfg.run_dir, "probe")["cached"] and not _status(cfg.run_dir, "quality")["cached"]
    after = tables.load(cfg.run_dir, "probe")
    assert after["content_digest"].iloc[0] != probed["content_digest"].iloc[0]
    assert after["content_digest"].iloc[1:].tolist() == probed["content_digest"].iloc[1:].tolist()


def test_a_moved_dataset_is_a_cache_hit_where_only_content_matters(synth_small, tmp_path):
    """No path is in a cache key: the same dataset copied elsewhere (another mount, another worker)
    with its config pointing there takes clean and quality from cache; probe reads the copies again
    (its cheap fingerprint sees new files) and finds the same content."""
    from flows.pipeline import pipeline

    moved = tmp_path / "elsewhere" / "data"
    shutil.copytree(synth_small, moved, symlinks=True)
    pipeline(demo_config(synth_small / "manifest.csv", tmp_path / "a", "clean.max_chars=997"), until="quality")
    pipeline(demo_config(moved / "manifest.csv", tmp_path / "b", "clean.max_chars=997"), until="quality")
    assert [_status(tmp_path / "b", s)["cached"] for s in ("clean", "probe", "quality")] == [True, False, True]
    for s in ("clean", "probe", "quality"):
        assert _bytes(tmp_path / "a", s) == _bytes(tmp_path / "b", s), s


@pytest.mark.slow
def test_train_gpus_2_trains_on_two_processes_from_inside_the_flow(synth_small, tmp_path):
    """``train.gpus=2``: the train task launches torchrun (two gloo processes on CPU) and returns the
    stage rank 0 wrote, with the digests an in-process run records (the run is not stale after)."""
    from flows.pipeline import pipeline
    from mmcore.stale import stale

    run = tmp_path / "ddp"
    out = pipeline(demo_config(synth_small / "manifest.csv", run, "train.gpus=2", "clean.max_chars=996"), until="train")
    stats = tables.read_json(tables.StagePaths.of(run, "train").stats)
    assert stats["world_size"] == 2 and stats["steps"] == 2
    assert out["train"].kept_digest == tables.file_digest(tables.StagePaths.of(run, "train").kept)
    assert {r["stage"]: r["status"] for r in stale(run)}["train"] == "fresh"


def test_a_fresh_run_folder_gives_identical_parquet(synth_small, tmp_path):
    from flows.pipeline import pipeline

    a, b = tmp_path / "a", tmp_path / "b"
    pipeline(demo_config(synth_small / "manifest.csv", a))
    pipeline(demo_config(synth_small / "manifest.csv", b))
    for s in graph.ORDER:
        assert _bytes(a, s) == _bytes(b, s), s


def test_stage_artifacts_are_published(synth_small, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.pipeline import pipeline
    from mmcore import alerts
    from mmcore.layout import RunLayout
    from tasks import events

    run = tmp_path / "run"
    pipeline(demo_config(synth_small / "manifest.csv", run, "run_name=events-check"))
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["clean-summary"])))
    assert arts and arts[0].type == "table"
    assert "n_quarantined" in str(arts[-1].data)
    # evaluate's hook sent its headline metrics as a Prefect event (no deployment: the run's name is the resource).
    sent = alerts.headline(tables.read_json(RunLayout(run).metrics))
    assert sent and all(k.startswith("test/") for k in sent)
    resource_id = events.resource("events-check")["prefect.resource.id"]
    # The server persists events in batches; a loaded 2-core machine is slow.
    wait_until(lambda: events.previous_metrics(resource_id) == sent, "the evaluation event", timeout=180, interval=1)
    assert events.previous_metrics(resource_id) == sent
