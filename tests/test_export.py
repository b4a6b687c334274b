"""Export: img2dataset-layout webdataset shards read back with the webdataset library, byte-identical
re-exports, open_clip's CSV, the retry manifest, one-line CLI errors, and the round trip
manifest -> curate -> export -> curate the export -> the same rows and content digests.

One pipeline run (the real flow, ending with an export) is shared by the module."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pyarrow.parquet as pq
import pytest

from mmcore import export, graph, sources, tables
from mmcore.layout import ExportLayout, StagePaths
from tests.conftest import demo_config

pytestmark = pytest.mark.usefixtures("prefect_harness")

# A re-curation of an export: quality's exact-duplicate check is off, because an image with several
# captions becomes one tar member per caption (img2dataset's layout) and the check calls equal bytes
# under two references duplicates; the first curation already removed the real ones.
NO_DUPLICATE_CHECK = "quality.checks=[too_small, extreme_aspect, too_dark, too_bright, low_information, blurry]"


@pytest.fixture(scope="module")
def curated(synth_small, tmp_path_factory, prefect_harness):
    """The demo pipeline up to split on 300 synthetic rows, ending with a webdataset export (the flow's way)."""
    from flows.pipeline import pipeline

    base = tmp_path_factory.mktemp("export")
    cfg = demo_config(synth_small / "manifest.csv", base / "run")
    wds_out = base / "wds"
    pipeline(cfg, until="split", exports=(export.ExportConfig(format="webdataset", out=wds_out, shard_size=64),))
    kept = tables.read_parquet(StagePaths.of(cfg.run_dir, "split").kept)
    return SimpleNamespace(cfg=cfg, run=cfg.run_dir, wds=wds_out, kept=kept.set_index("row_id", drop=False))


def _samples(out: Path) -> list[dict]:
    import webdataset as wds

    shards = [str(p) for p in sorted(out.glob("*.tar"))]
    return list(wds.WebDataset(shards, shardshuffle=False, empty_check=False))


def _files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_the_flow_ends_with_img2dataset_shards_that_webdataset_reads_back(curated):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    summary = export.read_summary(curated.wds)
    assert summary["complete"] and summary["n_skipped"] == 0 and summary["stage"] == "split"
    assert summary["n_exported"] == len(curated.kept) and summary["n_shards"] == -(-len(curated.kept) // 64)
    source = sources.of(curated.cfg.data)
    samples = _samples(curated.wds)
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in curated.kept.index]  # row_id order, every row
    for s in samples:
        meta = json.loads(s["json"])
        row = curated.kept.loc[meta["mmpipe"]["row_id"]]
        (ext,) = set(s) & set(export.EXTENSIONS.values())
        assert ext == export.EXTENSIONS[row["format"]]
        assert s[ext] == source.read(row["image_path"])  # the original bytes
        assert "sha256:" + hashlib.sha256(s[ext]).hexdigest() == row["content_digest"] == meta["mmpipe"]["content_digest"]
        assert meta["sha256"] == row["content_digest"].removeprefix("sha256:") and meta["status"] == "success"
        assert s["txt"].decode() == row["text"] == meta["caption"]
        assert meta["mmpipe"]["split"] == row["split"] and meta["mmpipe"]["source"] == row["image_path"]
        assert meta["mmpipe"]["blurry_score"] == pytest.approx(row["blurry_score"])  # the stages' scores travel
        assert (meta["width"], meta["height"]) == (row["width"], row["height"])
    # webdataset's own decoder opens the images.
    import webdataset as wds

    first = next(iter(wds.WebDataset(str(curated.wds / "00000.tar"), shardshuffle=False).decode("pil")))
    (ext,) = set(first) & set(export.EXTENSIONS.values())
    assert first["__key__"] == samples[0]["__key__"] and first[ext].size == tuple(curated.kept.iloc[0][["width", "height"]])
    # Beside each shard, img2dataset's Parquet and stats; sizes.json for open_clip.
    lay = ExportLayout(curated.wds)
    sizes = tables.read_json(lay.sizes)
    assert sum(sizes.values()) == len(samples)
    for shard in range(summary["n_shards"]):
        t = pq.read_table(lay.shard_parquet(shard)).to_pandas()
        assert {"key", "caption", "status", "error_message", "width", "height", "sha256", "url"} <= set(t.columns)
        with tarfile.open(lay.shard_tar(shard)) as tar:
            members = tar.getmembers()
        assert sorted({m.name.split(".")[0] for m in members}) == t["key"].tolist()
        assert {(m.mtime, m.uid, m.gid, m.uname, m.mode) for m in members} == {(export.TAR_MTIME, 0, 0, "", 0o644)}
        assert tables.read_json(lay.shard_stats(shard))["successes"] == len(t) == sizes[lay.shard_tar(shard).name]
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["export-webdataset"])))
    assert arts and f"**{len(samples)}** of {len(samples)} rows exported" in str(arts[-1].data)


def test_a_flow_whose_export_would_be_refused_fails_before_any_stage(curated, synth_small, tmp_path):
    from flows.pipeline import pipeline

    cfg = demo_config(synth_small / "manifest.csv", tmp_path / "run")
    bad = export.ExportConfig(out=Path(cfg.data.image_root) / "export")
    with pytest.raises(export.InputError, match="lies in the dataset folder"):
        pipeline(cfg, until="split", exports=(bad,))
    with pytest.raises(export.InputError, match="export --stage train: this run runs clean, probe"):
        pipeline(cfg, until="split", exports=(export.ExportConfig(out=tmp_path / "x", stage="train"),))
    assert not cfg.run_dir.exists() and not bad.out.exists()


def test_the_same_run_gives_byte_identical_files_and_a_reexport_replaces_the_last(curated, tmp_path):
    out = tmp_path / "again"
    export.export(curated.run, export.spec(format="webdataset", out=out, shard_size=64))
    first, again = _files(curated.wds), _files(out)
    summary_name = ExportLayout(out).summary.name
    assert first.keys() == again.keys()
    assert {k: v for k, v in first.items() if k != summary_name} == {k: v for k, v in again.items() if k != summary_name}
    # Into the same folder with bigger shards: the shards the first export wrote beyond them are gone.
    s = export.export(curated.run, export.spec(format="webdataset", out=out, shard_size=1000))
    assert s.n_shards == 1 and sorted(_files(out)) == sorted([*s.files, summary_name])
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left
    # A folder that holds anything but an export is never written into.
    other = tmp_path / "other"
    other.mkdir()
    (other / "00000.tar").write_bytes(b"someone else's shard")
    with pytest.raises(export.InputError, match="is not empty and holds no mmpipe export"):
        export.export(curated.run, export.spec(format="webdataset", out=other))
    assert (other / "00000.tar").read_bytes() == b"someone else's shard"


def test_one_split_reencoded_to_jpeg(curated, tmp_path):
    from PIL import Image

    s = export.export(curated.run, export.spec(format="webdataset", out=tmp_path / "train", split="train", reencode=32))
    train = curated.kept[curated.kept["split"] == "train"]
    samples = _samples(tmp_path / "train")
    assert s.n_exported == len(train) == len(samples) and s.split == "train"
    for sample in samples:
        meta = json.loads(sample["json"])
        row = train.loc[meta["mmpipe"]["row_id"]]
        with Image.open(io.BytesIO(sample["jpg"])) as im:
            assert im.format == "JPEG" and min(im.size) == min(32, row["width"], row["height"])
            assert (meta["width"], meta["height"]) == im.size
        assert (meta["original_width"], meta["original_height"]) == (row["width"], row["height"])
        assert meta["sha256"] == hashlib.sha256(sample["jpg"]).hexdigest()  # of the bytes stored
        assert meta["mmpipe"]["content_digest"] == row["content_digest"]  # of the original


def test_open_clip_csv_points_at_the_original_files(curated, tmp_path):
    from typer.testing import CliRunner

    from mmpipe.cli import app

    r = CliRunner().invoke(app, ["export", str(curated.run), "--format", "csv", "--split", "val", "--out",
                                 str(tmp_path / "csv")])
    assert r.exit_code == 0 and "python -m open_clip_train.main --dataset-type csv --train-data" in r.stdout, r.output
    s = export.read_summary(tmp_path / "csv")
    df = pd.read_csv(s["open_clip_data"], sep="\t")  # as open_clip's CsvDataset reads it
    val = curated.kept[curated.kept["split"] == "val"]
    assert list(df.columns[:2]) == ["filepath", "title"] and len(df) == len(val) == s["n_exported"]
    root = os.path.realpath(curated.cfg.data.image_root)
    assert df["filepath"].tolist() == [os.path.join(root, p) for p in val["image_path"]]
    assert df["title"].tolist() == val["text"].tolist()


def test_a_changed_or_missing_image_is_skipped_with_a_reason_never_exported(curated, tmp_path):
    import shutil

    # A copy of the run whose dataset is a copy too, with one image changed and one deleted.
    data = tmp_path / "data"
    shutil.copytree(curated.cfg.data.image_root, data)
    run = tmp_path / "run"
    for stage in graph.ORDER:
        if StagePaths.of(curated.run, stage).dir.is_dir():
            shutil.copytree(StagePaths.of(curated.run, stage).dir, StagePaths.of(run, stage).dir)
    from mmcore.config import dump_config
    from mmcore.layout import RunLayout

    cfg = curated.cfg.model_copy(update={"data": curated.cfg.data.model_copy(
        update={"manifest": data / "manifest.csv", "root": data}), "out": run})
    tables.write_bytes(dump_config(cfg).encode(), RunLayout(run).config)
    changed, gone = curated.kept.iloc[0], curated.kept.iloc[1]
    (data / changed["image_path"]).write_bytes((data / changed["image_path"]).read_bytes() + b"\0")
    (data / gone["image_path"]).unlink()
    s = export.export(run, export.spec(format="webdataset", out=tmp_path / "out"))
    assert s.skipped == {"file_changed": 1, "missing_file": 1} and s.n_exported == len(curated.kept) - 2
    keys = {x["__key__"] for x in _samples(tmp_path / "out")}
    assert export.key_of(changed["row_id"]) not in keys and export.key_of(gone["row_id"]) not in keys
    listed = export.read_summary(tmp_path / "out")["skipped_rows"]
    assert {(r["row_id"], r["reason"]) for r in listed} == {(changed["row_id"], "file_changed"),
                                                           (gone["row_id"], "missing_file")}


def test_a_run_folder_being_written_is_not_exported(curated, tmp_path):
    from mmcore import runlock

    with runlock.hold(curated.run, curated.cfg.data.image_root):
        with pytest.raises(export.InputError, match="is being written by an mmpipe run"):
            export.export(curated.run, export.spec(out=tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_retry_manifest_lists_failed_downloads(curated, tmp_path):
    import shutil

    from mmcore.layout import RunLayout

    run = tmp_path / "run"
    RunLayout(run).config.parent.mkdir(parents=True)
    shutil.copy(RunLayout(curated.run).config, RunLayout(run).config)
    # No failed download: an empty manifest, still with img2dataset's columns.
    s = export.export(run, export.spec(format="retry", out=tmp_path / "none"))
    empty = pq.read_table(ExportLayout(tmp_path / "none").retry)
    assert s.n_exported == 0 and empty.column_names == ["url", "caption", "row_id", "error_message"]
    q = pd.DataFrame({"row_id": [7, 3, 5, 9], "image_path": ["", "", "x.jpg", ""], "text": ["b", "a", "c", "d"],
                      "text_raw": ["B ", None, "c", "d"],
                      "url": ["http://b/2.jpg", "http://a/1.jpg", "http://c/3.jpg", None], "stage": "clean",
                      "reason": ["download_failed", "download_failed", "empty_caption", "download_failed"],
                      "detail": ["HTTP 404", "timeout", "", "no url"]})
    tables.write_parquet(q, StagePaths.of(run, "clean").quarantine)
    s = export.export(run, export.spec(format="retry", out=tmp_path / "retry"))
    got = pq.read_table(ExportLayout(tmp_path / "retry").retry).to_pylist()
    assert s.n_exported == 2 and s.skipped == {"no_url": 1} and got == [
        {"url": "http://a/1.jpg", "caption": "a", "row_id": 3, "error_message": "timeout"},
        {"url": "http://b/2.jpg", "caption": "B ", "row_id": 7, "error_message": "HTTP 404"},
    ]


@pytest.mark.parametrize("args, match", [
    (["{tmp}/nowhere"], "run folder not found"),
    (["{data}"], "is not a run folder: no config.yaml"),
    (["{run}", "--stage", "train"], "stage 'train' has not run in .* \\(no train/kept.parquet\\)"),
    (["{run}", "--stage", "trian"], "unknown stage 'trian'; expected one of clean"),
    (["{run}", "--split", "tarin"], "no split 'tarin' in split/kept.parquet; expected one of test, train, val"),
    (["{run}", "--stage", "clean", "--split", "train"], "stage 'clean' has no 'split' column"),
    (["{run}", "--format", "zip"], "unknown export format 'zip'; expected one of webdataset, csv, retry"),
    (["{run}", "--format", "retry", "--split", "train"], "--split does not apply"),
    (["{run}", "--out", "{data}/export"], "lies in the dataset folder"),
    (["{run}", "--out", "{run}/split"], "lies in split/ of the run folder"),
    (["{run}", "--out", "{run}"], "is the run folder"),
    (["{run}", "--out", "{data}/manifest.csv"], "is a file; expected a folder"),
    (["{run}", "--out", "{tmp}"], "is not empty and holds no mmpipe export"),
])
def test_cli_errors_are_one_line_and_write_nothing(curated, tmp_path, args, match):
    from typer.testing import CliRunner

    from mmpipe.cli import app

    (tmp_path / "x").write_text("")
    names = {"tmp": str(tmp_path), "run": str(curated.run), "data": str(curated.cfg.data.image_root)}
    argv = [a.format(**names) for a in args]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    before = sorted(p for p in tmp_path.rglob("*"))
    r = CliRunner().invoke(app, ["export", *argv])
    assert r.exit_code == 2, (r.output, r.exception)
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: "), r.stderr
    assert __import__("re").search(match, r.stderr), r.stderr
    assert sorted(p for p in tmp_path.rglob("*")) == before
    assert not (Path(curated.cfg.data.image_root) / "export").exists()


@pytest.mark.slow
def test_round_trip_curate_export_curate_keeps_the_same_rows_and_digests(curated, tmp_path):
    """manifest -> curate -> export webdataset -> mmpipe on the export (data.format webdataset) -> the same rows."""
    from flows.pipeline import pipeline
    from mmcore.config import load_config

    out = tmp_path / "shards"
    s = export.export(curated.run, export.spec(format="webdataset", out=out, shard_size=100))
    # One failed download, as img2dataset lists it in a shard's Parquet: quarantined, then in the retry manifest.
    lay = ExportLayout(out)
    t = pq.read_table(lay.shard_parquet(0)).to_pylist()
    t.append({**{k: None for k in t[0]}, "key": "999999999", "url": "http://example.com/lost.jpg",
              "caption": "a lost red circle", "status": "failed_to_download", "error_message": "HTTP 404"})
    tables.write_parquet(pd.DataFrame(t), lay.shard_parquet(0))
    again = load_config(curated.run / "config.yaml", [
        "data.manifest=null", "data.format=webdataset", f"data.root={out}", "data.shards='{00000..%05d}.tar'" % (s.n_shards - 1),
        "data.group_column=group", "data.time_column=time", "data.label_column=label", "data.domain_column=domain",
        f"out={tmp_path / 'run2'}", NO_DUPLICATE_CHECK])
    pipeline(again, until="split")
    second = tables.read_parquet(StagePaths.of(again.run_dir, "split").kept)
    assert sorted(zip(second["text"], second["content_digest"])) == sorted(zip(curated.kept["text"],
                                                                               curated.kept["content_digest"]))
    assert second["group"].tolist() == curated.kept["group"].astype(str).tolist()  # the metadata travels as columns
    q = tables.read_parquet(StagePaths.of(again.run_dir, "clean").quarantine)
    assert q["reason"].tolist() == ["download_failed"]
    retry = export.export(again.run_dir, export.spec(format="retry", out=tmp_path / "retry"))
    assert pq.read_table(retry.out + "/" + Path(retry.files[0]).name).to_pylist() == [
        {"url": "http://example.com/lost.jpg", "caption": "a lost red circle", "row_id": int(q["row_id"].iloc[0]),
         "error_message": "HTTP 404"}]
    # open_clip's CSV of images inside tar shards: written under OUT/images/, the same bytes.
    c = export.export(again.run_dir, export.spec(format="csv", out=tmp_path / "csv"))
    df = pd.read_csv(c.open_clip_data, sep="\t")
    digests = {"sha256:" + hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in df["filepath"]}
    assert all(Path(p).is_relative_to(tmp_path / "csv") for p in df["filepath"])
    assert digests == set(curated.kept["content_digest"]) and len(df) == len(curated.kept)
    # The same folder re-exported as shards: the CSV and its images are gone, the shards hold the same bytes.
    w = export.export(again.run_dir, export.spec(format="webdataset", out=tmp_path / "csv", shard_size=100))
    assert sorted(p.relative_to(tmp_path / "csv").as_posix() for p in (tmp_path / "csv").rglob("*")) == sorted(
        [*w.files, ExportLayout(out).summary.name])


# open_clip_train 3.3.0's training loader predates webdataset's end-of-shard marker (webdataset >= 0.2.96,
# this project pins 1.0.2): it raises KeyError 'fname' (open_clip issue #935). In a training environment
# pin webdataset<0.2.96; here the marker is switched off, as the fix does, to test the shards.
_OPEN_CLIP = """
import functools, sys
import open_clip_train.data as d
d.tar_file_expander = functools.partial(d.tar_file_expander, eof_value=None)
from open_clip_train.main import main
main(sys.argv[1:])
"""
_TINY_CLIP = {"model_cfg": {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16,
                                                            "head_width": 16},
                            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}}


@pytest.mark.slow
def test_open_clip_train_trains_on_the_export(curated, tmp_path):
    """open_clip's own trainer, a tiny model on CPU, one epoch over the val split's shards (sizes.json gives the count)."""
    pytest.importorskip("open_clip_train.main")
    out = tmp_path / "train"
    s = export.export(curated.run, export.spec(format="webdataset", out=out, split="val", shard_size=16))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "open_clip_config.json").write_text(json.dumps(_TINY_CLIP))
    # The README's command, with a tiny local model and CPU-sized settings.
    args = ["--dataset-type", "webdataset", "--train-data", s.open_clip_data, "--model", f"local-dir:{tmp_path / 'model'}",
            "--batch-size", "16", "--epochs", "1", "--workers", "1", "--device", "cpu", "--precision", "fp32",
            "--lr", "1e-3", "--warmup", "1", "--logs", str(tmp_path / "logs"), "--name", "t", "--save-frequency", "0",
            "--report-to", ""]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", _OPEN_CLIP, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    assert f"/{-(-s.n_exported // 16) * 16} (100%)]" in log, log[-3000:]  # every sample seen, as sizes.json counts them
