"""Decontamination (issue 18): reference sets kept out of the pool, mirrored and semantic near-duplicates
kept on one side of the split, on the synthetic data's planted copies."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mmcore import clean, decontam, execute, graph, probe, quality, report, split, synth, tables
from mmcore.base import DataConfig, StageContext
from mmcore.config import load_config
from mmcore.decontam import DecontamConfig
from mmcore.errors import ConfigError, InputError
from mmcore.layout import RunLayout
from tests.conftest import REPO, demo_config

# How each planted benchmark copy must be named (the first kind that matches).
EXPECTED_KIND = {"bench_exact": {"exact"}, "bench_resized": {"phash"}, "bench_reencoded": {"phash"},
                 "bench_mirrored": {"mirrored"}, "bench_cropped": {"phash", "cropped"}, "bench_caption": {"caption"}}


@pytest.fixture(scope="module")
def curated(synth_small, tmp_path_factory):
    """The 300-row synthetic set through clean, probe and quality (the input of decontam)."""
    tmp = tmp_path_factory.mktemp("decontam")
    data = DataConfig(manifest=synth_small / "manifest.csv", group_column="scene_id", time_column="timestamp",
                      label_column="label", domain_column="domain")
    ctx = StageContext(data=data, run_dir=tmp / "run", workers=1)
    c = clean.run(clean.read_manifest(data), clean.CleanConfig(), ctx)
    p = probe.run(c.kept, probe.ProbeConfig(), ctx)
    q = quality.run(p.kept, quality.QualityConfig(), ctx)
    return ctx, q.kept, synth.planted(synth_small)


def _bench(synth_small) -> dict[str, DataConfig]:
    return {"benchmark": DataConfig(manifest=synth_small / synth.BENCH_DIR / "manifest.csv")}


@pytest.fixture(scope="module")
def decontaminated(curated, synth_small):
    ctx, q, planted = curated
    return decontam.run(q, DecontamConfig(reference_sets=_bench(synth_small)), ctx)


def test_the_stage_hashes_images_as_quality_does(curated, decontaminated):
    _, q, _ = curated
    rows = q.drop_duplicates(tables.IMAGE).head(60)
    got = decontam.hash_batch(rows, decontam.sources.FileSource(curated[0].data.image_root))
    assert (got["error"] == "").all()
    assert got["phash"].tolist() == rows["phash"].tolist()
    # Every kept image has its mirror's hash, and the mirror's mirror is the image itself.
    assert decontaminated.kept[decontam.PHASH_MIRROR].str.fullmatch(r"[0-9a-f]{16}").all()
    gray = np.asarray(Image.open(curated[0].data.image_root / rows[tables.IMAGE].iloc[0]).convert("L"))
    h, m = decontam.phash_pair(gray)
    assert decontam.phash_pair(np.ascontiguousarray(gray[:, ::-1])) == (m, h)


def test_every_planted_benchmark_copy_is_caught_and_nothing_else(curated, decontaminated, synth_small):
    _, q, planted = curated
    want = planted[planted["stage"] == decontam.STAGE]
    assert set(want["defect"]) == set(synth.BENCH_COPIES) and len(want) >= 12
    res = decontaminated
    tables.check_accounting("decontam", q[tables.ROW_ID].to_numpy(), res.kept, res.quarantined)
    got = res.quarantined.set_index(tables.ROW_ID)
    assert set(got.index) == set(want["row_id"])  # every copy caught, no other row of the demo set
    assert (got[tables.REASON] == "eval_contamination").all()
    for r in want.itertuples():
        row = got.loc[r.row_id]
        ref = int(r.source.split(":")[1])
        assert row["match_set"] == "benchmark" and row["match_row"] == ref, (r.defect, row.to_dict())
        assert row["match_kind"] in EXPECTED_KIND[r.defect], (r.defect, row[tables.DETAIL])
        assert f"reference set 'benchmark' row {ref} (" in row[tables.DETAIL]
    st = res.stats["reference_sets"]["benchmark"]
    assert st["contaminated_rows"] == len(want) and st["matched_reference_rows"] == len(want)
    assert res.stats["semantic"] == "off: no decontam.model configured"


def test_a_reference_set_is_hashed_once_and_cached_by_content(curated, synth_small, tmp_path):
    ctx, q, _ = curated
    ctx = StageContext(data=ctx.data, run_dir=tmp_path / "run", workers=1)
    cfg = DecontamConfig(reference_sets=_bench(synth_small))
    first = decontam.run(q, cfg, ctx)
    again = decontam.run(q, cfg, ctx)
    assert not first.stats["reference_sets"]["benchmark"]["cached"] and again.stats["reference_sets"]["benchmark"]["cached"]
    pd.testing.assert_frame_equal(first.kept, again.kept)
    pd.testing.assert_frame_equal(first.quarantined, again.quarantined)
    assert len(list((tmp_path / "run" / "decontam" / "references").glob("benchmark.*.parquet"))) == 1
    # Another margin set is another table (the key holds them), and the old one is replaced.
    decontam.run(q.head(30), cfg.model_copy(update={"crop_margins": (0.05,)}), ctx)
    assert len(list((tmp_path / "run" / "decontam" / "references").glob("benchmark.*.parquet"))) == 1


def test_phash_only_lets_mirrored_copies_straddle_the_split_and_decontam_does_not(curated, decontaminated, synth_small):
    """The leak today: quality's pHash does not link a mirrored copy to its source, so across seeds some
    pair lands on two sides of the split; decontam's mirror_cluster keeps every pair together."""
    ctx, q, planted = curated
    pairs = [(r.row_id, int(r.source.split(":")[1])) for r in planted.itertuples() if r.defect == "mirror_copy"]
    assert len(pairs) >= 2

    def straddling(table: pd.DataFrame, seed: int) -> int:
        kept = split.run(table, split.SplitConfig(), StageContext(data=ctx.data, run_dir=ctx.run_dir, seed=seed)).kept
        side = kept.set_index(tables.ROW_ID)["split"]
        return sum(side[a] != side[b] for a, b in pairs)

    seeds = range(6)
    assert all(q.set_index(tables.ROW_ID).loc[a, "dup_cluster"] != q.set_index(tables.ROW_ID).loc[b, "dup_cluster"] for a, b in pairs)
    assert sum(straddling(q, s) for s in seeds) > 0
    kept = decontaminated.kept.set_index(tables.ROW_ID)
    assert all(kept.loc[a, decontam.MIRROR_CLUSTER] >= 0 and kept.loc[a, decontam.MIRROR_CLUSTER] == kept.loc[b, decontam.MIRROR_CLUSTER]
               for a, b in pairs)
    assert sum(straddling(decontaminated.kept, s) for s in seeds) == 0


def test_hamming_pairs_equal_brute_force():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, 700, dtype=np.int64).astype(np.uint64)
    flips = np.uint64(1) << rng.integers(0, 64, (300, 3)).astype(np.uint64)
    query = np.concatenate([base[:300] ^ flips[:, 0] ^ flips[:, 1] ^ flips[:, 2], rng.integers(0, 2**63, 200).astype(np.uint64)])
    d = np.bitwise_count(query[:, None] ^ base[None, :])
    for radius in (0, 2, 3, 6):
        q, b, dist = decontam.hamming_pairs(query, base, radius, budget=1000)
        want = set(zip(*np.nonzero(d <= radius)))
        assert set(zip(q.tolist(), b.tolist())) == want and (dist == d[q, b]).all()


def test_faiss_and_exact_search_find_the_same_near_duplicates():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(400, 32)).astype(np.float32)
    x = np.repeat(centres, 3, axis=0) + rng.normal(scale=0.05, size=(1200, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    exact = decontam.neighbour_pairs(x, 0.95, 5, exact_below=10**6, nprobe=8, device="cpu")
    approx = decontam.neighbour_pairs(x, 0.95, 5, exact_below=0, nprobe=8, device="cpu")
    assert exact[3].startswith("exact") and approx[3].startswith("faiss")
    e, a = set(zip(exact[0].tolist(), exact[1].tolist())), set(zip(approx[0].tolist(), approx[1].tolist()))
    assert len(e) >= 1100 and len(e & a) / len(e) > 0.97


def test_semantic_near_duplicates_with_a_model(curated, synth_small, tmp_path):
    from tests.test_quality import _tiny_clip

    ctx, q, _ = curated
    model = _tiny_clip(tmp_path / "clip", q[tables.TEXT].tolist())
    part = q.head(80)
    res = decontam.run(part, DecontamConfig(model=model, semantic_cosine=0.999, contamination_cosine=0.999, device="cpu",
                                            reference_sets=_bench(synth_small)), ctx)
    sem = res.stats["semantic"]
    assert isinstance(sem, dict) and sem["search"] == "exact (cpu)" and sem["cosine"] == 0.999
    assert res.kept[decontam.SEMANTIC_CLUSTER].dtype == np.int64
    # Rows of one image file share every embedding: rows with one path are never split apart.
    linked = res.kept[res.kept[decontam.SEMANTIC_CLUSTER] >= 0]
    assert sem["n_rows_in_clusters"] == len(linked)
    with pytest.raises(ConfigError, match="decontam.model: cannot load a CLIP model from"):
        decontam.run(part, DecontamConfig(model=tmp_path), ctx)


class _MirrorInvariantEncoder:
    """A deterministic image embedder that sees an image and its mirror as one picture (the
    property a pretrained CLIP has and a random tiny one has not): the zero-mean, unit-norm vector
    of the 24 x 24 grey image plus its left-right mirror."""

    class model:  # noqa: N801 (the shape of clip_model.Encoder)
        class config:  # noqa: N801
            projection_dim = 24 * 24

    image_size = 24

    def encode_images(self, imgs, batch_size=64):
        out = []
        for im in imgs:
            a = np.asarray(im.convert("L").resize((24, 24), Image.Resampling.BILINEAR), np.float32)
            v = (a + a[:, ::-1]).ravel()
            v = v - v.mean()
            out.append(v / max(float(np.linalg.norm(v)), 1e-6))
        return np.stack(out)


def test_semantic_clusters_keep_mirrored_copies_with_their_originals_through_split(curated, monkeypatch, tmp_path):
    """With an embedding model that sees a mirrored copy as the same picture, every planted mirrored
    copy of a pool scene shares its original's semantic cluster, and split keeps each pair on one side."""
    ctx, q, planted = curated
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.bin").write_bytes(b"a stand-in folder: its digest keys the stage")
    monkeypatch.setattr(decontam, "load_encoder", lambda path, device: _MirrorInvariantEncoder())
    res = decontam.run(q, DecontamConfig(model=tmp_path / "model", semantic_cosine=0.97, device="cpu"), ctx)
    kept = res.kept.set_index(tables.ROW_ID)
    pairs = [(int(r.source.split(":")[1]), r.row_id) for r in planted[planted["defect"] == "mirror_copy"].itertuples()]
    pairs = [(a, b) for a, b in pairs if a in kept.index and b in kept.index]
    assert len(pairs) >= 1
    cl = kept[decontam.SEMANTIC_CLUSTER]
    assert all(cl[a] >= 0 and cl[a] == cl[b] for a, b in pairs), [(a, b, cl[a], cl[b]) for a, b in pairs]
    sem = res.stats["semantic"]
    assert sem["largest_cluster"] < len(kept) / 4  # links pictures, does not chain the pool together
    out = split.run(res.kept, split.SplitConfig(), ctx).kept.set_index(tables.ROW_ID)[split.SPLIT]
    assert all(out[a] == out[b] for a, b in pairs)


def test_bad_reference_sets_are_one_line_errors(curated, tmp_path):
    ctx, q, _ = curated
    with pytest.raises(InputError, match=r"^decontam.reference_sets.nope: data.manifest: file not found: .*missing.csv$"):
        decontam.run(q.head(5), DecontamConfig(reference_sets={"nope": DataConfig(manifest=tmp_path / "missing.csv")}), ctx)
    with pytest.raises(ConfigError, match=r"decontam.reference_sets: .*name 'a b' must be letters"):
        load_config(REPO / "configs" / "demo.yaml", [f"data.manifest={tmp_path / 'm.csv'}", "decontam.reference_sets={'a b': {manifest: x.csv}}"])
    with pytest.raises(ConfigError, match=r"decontam.crop_margins.*\(0, 0.25\)"):
        load_config(REPO / "configs" / "demo.yaml", [f"data.manifest={tmp_path / 'm.csv'}", "decontam.crop_margins=[0.5]"])


def test_the_report_shows_contamination_per_set_and_duplicate_clusters(curated, synth_small, tmp_path):
    from tests.test_report import parse

    ctx, q, _ = curated
    cfg = demo_config(synth_small / "manifest.csv", tmp_path / "run",
                      f"decontam.reference_sets.benchmark.manifest={synth_small / synth.BENCH_DIR / 'manifest.csv'}")
    assert cfg.decontam.reference_sets["benchmark"].manifest.is_absolute()
    digest = tables.json_digest({"input": "quality"})
    stats = execute.run_stage("decontam", cfg, q, digest, None)
    page = parse(report.build(cfg.run_dir, cfg.report, cfg.data.image_root, cfg.run_name))
    assert page.sections["decontam"] == "ok"
    st = stats["reference_sets"]["benchmark"]
    assert page.value("decontam.reference_sets.benchmark.contaminated_rows") == st["contaminated_rows"] > 0
    for kind, n in st["by_kind"].items():
        assert page.value(f"decontam.reference_sets.benchmark.by_kind.{kind}") == n
    html = (RunLayout(cfg.run_dir).stage("report").dir / "report.html").read_text()
    assert "Largest duplicate clusters" in html and "mirrored" in html and "off: no decontam.model configured" in html
    assert graph.stage("split").input == "decontam"


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_the_flow_runs_decontam_caches_it_and_reruns_it_when_a_reference_set_changes(synth_small, tmp_path):
    """End to end through the flow: contamination quarantined before split, the second run all from
    cache, and an edited reference set makes decontam (and what follows) stale and re-run, alone."""
    import shutil

    from flows.pipeline import pipeline
    from mmcore.stale import stale

    bench = shutil.copytree(synth_small / synth.BENCH_DIR, tmp_path / "bench")
    cfg = demo_config(synth_small / "manifest.csv", tmp_path / "run",
                      f"decontam.reference_sets.benchmark.manifest={bench / 'manifest.csv'}")
    pipeline(cfg, until="split")
    planted = synth.planted(synth_small)
    q = tables.load(cfg.run_dir, "decontam", quarantine=True)
    assert set(q[tables.ROW_ID]) == set(planted.loc[planted["stage"] == "decontam", "row_id"])
    assert not set(q[tables.ROW_ID]) & set(tables.load(cfg.run_dir, "split")[tables.ROW_ID])
    assert {r["stage"]: r["status"] for r in stale(cfg.run_dir, cfg)}["decontam"] == "fresh"

    with open(bench / "manifest.csv", "a") as f:  # one more benchmark row (an existing image)
        f.write("images/b00000.jpg,a new benchmark caption with enough words,circle\n")
    why = {r["stage"]: r for r in stale(cfg.run_dir, cfg)}
    assert why["quality"]["status"] == "fresh" and why["decontam"]["status"] == "stale"
    assert "(reference sets, embedding model) changed" in why["decontam"]["why"]
    pipeline(cfg, until="split")
    status = {s: tables.read_json(RunLayout(cfg.run_dir).stage(s).status)["cached"] for s in ("quality", "decontam", "split")}
    assert status == {"quality": True, "decontam": False, "split": True}  # same contamination: split's input is unchanged
