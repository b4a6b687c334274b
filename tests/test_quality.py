"""Quality stage: one real image per check, the synthetic set end to end, duplicates, config errors."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFilter

from mmcore import checks, clean, images, parallel, probe, quality, synth, tables
from mmcore.base import DataConfig, StageContext
from mmcore.config import build_config
from mmcore.errors import ConfigError


def _scene(w: int = 320, h: int = 240, seed: int = 0, textured: bool = True) -> Image.Image:
    scene = synth.Scene("circle", "red", "large", "left", "gray", "textured" if textured else "flat", "square", "blue", "small", "left of")
    return synth.render(scene, w, h, np.random.default_rng(seed))


def _ctx(root: Path, tmp_path: Path, workers: int = 1) -> StageContext:
    return StageContext(data=DataConfig(manifest=root / "manifest.csv"), run_dir=tmp_path / "run", workers=workers)


def _probe_then_quality(root: Path, paths: list[str], tmp_path: Path, cfg=quality.QualityConfig(), workers: int = 1):
    table = pd.DataFrame({tables.ROW_ID: np.arange(len(paths), dtype=np.int64), tables.IMAGE: paths, tables.TEXT: "a red circle"})
    ctx = _ctx(root, tmp_path, workers)
    p = probe.run(table, probe.ProbeConfig(), ctx)
    assert p.quarantined.empty, p.quarantined
    res = quality.run(p.kept, cfg, ctx)
    tables.check_accounting("quality", table[tables.ROW_ID].to_numpy(), res.kept, res.quarantined)
    return res


def _defect(kind: str) -> Image.Image:
    if kind == "too_small":
        return _scene(24, 20)
    if kind == "extreme_aspect":
        return _scene(1200, 110)
    if kind == "too_dark":
        return Image.fromarray((np.asarray(_scene(), dtype=np.float32) * 0.06).astype(np.uint8))
    if kind == "too_bright":
        return Image.fromarray((235 + np.asarray(_scene(), dtype=np.float32) * 0.07).astype(np.uint8))
    if kind == "blurry":
        return _scene().filter(ImageFilter.GaussianBlur(12))
    if kind == "low_information":
        return Image.new("RGB", (320, 240), (90, 120, 150))
    raise AssertionError(kind)


@pytest.fixture
def root(tmp_path) -> Path:
    r = tmp_path / "data"
    (r / "images").mkdir(parents=True)
    _scene(seed=1).save(r / "images" / "good.jpg", quality=90)
    return r


@pytest.mark.parametrize("kind", ["too_small", "extreme_aspect", "too_dark", "too_bright", "blurry", "low_information"])
def test_each_check_triggers_exactly_its_reason(root, tmp_path, kind):
    _defect(kind).save(root / "images" / f"{kind}.png")
    res = _probe_then_quality(root, ["images/good.jpg", f"images/{kind}.png"], tmp_path)
    assert res.kept[tables.IMAGE].tolist() == ["images/good.jpg"]
    assert res.quarantined[tables.REASON].tolist() == [kind]
    row = res.quarantined.iloc[0]
    assert row[checks.issue_column(kind)] and row[checks.score_column(kind)] < quality.QualityConfig().threshold(kind)
    # The healthy image fails no check at all.
    good = res.kept.iloc[0]
    assert not any(good[checks.issue_column(n)] for n in checks.DEFAULT_CHECKS)


def test_exact_duplicate_file_is_quarantined_but_shared_path_rows_are_kept(root, tmp_path):
    data = (root / "images" / "good.jpg").read_bytes()
    (root / "images" / "copy.jpg").write_bytes(data)
    _scene(seed=1).save(root / "images" / "other.jpg", quality=60)  # same scene, other bytes
    _scene(seed=7, textured=False).save(root / "images" / "different.png")
    paths = ["images/good.jpg", "images/good.jpg", "images/copy.jpg", "images/other.jpg", "images/different.png"]
    res = _probe_then_quality(root, paths, tmp_path)
    assert res.quarantined[tables.ROW_ID].tolist() == [2]
    assert res.quarantined[tables.REASON].tolist() == ["duplicate_image"]
    kept = res.kept.set_index(tables.ROW_ID)
    assert kept.index.tolist() == [0, 1, 3, 4]
    # Near-duplicates (re-encoded) share the cluster of the first row; a different image does not.
    assert kept.loc[0, "dup_cluster"] == kept.loc[1, "dup_cluster"] == kept.loc[3, "dup_cluster"] == 0
    assert res.quarantined.iloc[0]["dup_cluster"] == 0
    assert kept.loc[4, "dup_cluster"] == 4
    assert res.kept["dup_cluster"].dtype == np.int64


def test_isoluminant_shape_is_neither_blurry_nor_uninformative(root, tmp_path):
    # Yellow on beige has (almost) the same luma: gray alone would call it flat and blurry.
    img = Image.new("RGB", (300, 200), synth.BACKGROUNDS["beige"])
    synth._draw_shape(__import__("PIL.ImageDraw", fromlist=["Draw"]).Draw(img), "square", 150, 100, 60, synth.COLORS["yellow"])
    img.save(root / "images" / "iso.png")
    res = _probe_then_quality(root, ["images/iso.png"], tmp_path)
    assert res.quarantined.empty
    assert res.kept.iloc[0]["sharpness"] > 0.3


def test_file_broken_after_probe_is_quarantined_not_raised(root, tmp_path):
    _scene(seed=2).save(root / "images" / "later.jpg")
    table = pd.DataFrame({tables.ROW_ID: [0, 1], tables.IMAGE: ["images/good.jpg", "images/later.jpg"], tables.TEXT: "x"})
    ctx = _ctx(root, tmp_path)
    p = probe.run(table, probe.ProbeConfig(), ctx)
    (root / "images" / "later.jpg").write_bytes(b"garbage")
    res = quality.run(p.kept, quality.QualityConfig(), ctx)
    # Not the bytes the probe read (issue 23): the change is the reason, never a wrong score.
    assert res.quarantined[tables.REASON].tolist() == ["file_changed"]
    assert res.quarantined[tables.DETAIL].str.startswith("RefusedImage: file_changed: 7 bytes, the probe read").all()
    assert res.kept[tables.ROW_ID].tolist() == [0]


@pytest.mark.parametrize("name", sorted(checks.CHECKS))
def test_every_check_scores_in_unit_interval_and_has_a_reason(name):
    rng = np.random.default_rng(0)
    n = 50
    df = pd.DataFrame({
        tables.ROW_ID: np.arange(n), tables.IMAGE: [f"i{k % 40}.jpg" for k in range(n)],
        "width": rng.integers(1, 5000, n), "height": rng.integers(1, 5000, n),
        "brightness_p5": rng.random(n), "brightness_p99": rng.random(n), "sharpness": rng.random(n) * 3,
        "entropy": rng.random(n) * 8, "pixel_hash": [f"h{k % 30}" for k in range(n)], "clip_score": rng.uniform(-1, 1, n),
    })
    out = checks.evaluate(df, checks.CHECKS[name])
    s = out[checks.score_column(name)]
    assert s.between(0, 1).all()
    assert out[checks.issue_column(name)].dtype == bool
    assert name in quality.REASONS and quality.REASONS[name]
    assert set(checks.CHECKS[name].needs) <= set(df.columns)


def test_registry_refuses_duplicates_and_unknown_names():
    with pytest.raises(ValueError, match="already registered"):
        checks.register(checks.CHECKS["blurry"])
    with pytest.raises(ConfigError, match=r"unknown check\(s\) 'fuzzy'; expected one of blurry, duplicate_image, "):
        checks.get(["blurry", "fuzzy"])


def test_unknown_check_in_config_is_a_one_line_error(tmp_path):
    tree = {"data": {"manifest": str(tmp_path / "m.csv")}, "quality": {"thresholds": {"blury": 0.2}}}
    with pytest.raises(ConfigError, match=r"quality.thresholds: unknown check\(s\) 'blury'; expected one of blurry,") as e:
        build_config(tree)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"unknown check\(s\) 'nope'"):
        build_config({"data": {"manifest": "m.csv"}, "quality": {"checks": ["nope"]}})


def test_near_duplicate_labels_match_brute_force():
    rng = np.random.default_rng(3)
    base = rng.integers(0, 2**63, 40, dtype=np.int64).astype(np.uint64)
    flips = [base[i % 40] ^ np.uint64(1 << int(rng.integers(0, 64))) ^ np.uint64(1 << int(rng.integers(0, 64))) for i in range(60)]
    h = np.concatenate([base, np.array(flips, dtype=np.uint64), base[:5]])
    for radius in (0, 2, 4):
        labels = quality.near_duplicate_labels(h, radius)
        d = np.bitwise_count(h[:, None] ^ h[None, :]) <= radius
        from scipy.sparse.csgraph import connected_components
        _, ref = connected_components(d, directed=False)
        # Same partition: labels agree up to renaming.
        assert len(set(zip(labels, ref))) == len(set(labels)) == len(set(ref))


def test_same_output_whatever_batch_size_and_workers(root, tmp_path, monkeypatch):
    paths = []
    for k in range(6):
        _scene(seed=10 + k, textured=k % 2 == 0).save(root / "images" / f"s{k}.png")
        paths.append(f"images/s{k}.png")
    # This data is far below parallel.MIN_ROWS_PER_WORKER: force the pool, so workers=2 uses two processes.
    map_batches = parallel.map_batches
    monkeypatch.setattr(parallel, "map_batches", lambda *a, **kw: map_batches(*a, **{**kw, "min_rows_per_worker": 0}))
    a = _probe_then_quality(root, paths, tmp_path)
    b = _probe_then_quality(root, paths, tmp_path, cfg=quality.QualityConfig(batch_size=2), workers=2)
    pd.testing.assert_frame_equal(a.kept.reset_index(drop=True), b.kept.reset_index(drop=True))
    assert a.stats == b.stats


def test_describe_summarises_scores_thresholds_and_counts(root, tmp_path):
    _defect("blurry").save(root / "images" / "b.png")
    res = _probe_then_quality(root, ["images/good.jpg", "images/b.png"], tmp_path)
    text = quality.describe(res.kept, {**res.stats, "reasons": {"blurry": 1}, "n_rows": 2, "n_kept": 1})
    assert "blurry" in text and "0.300" in text and "alignment off" in text
    lines = text.splitlines()
    assert any(line.startswith("blurry") and line.split()[2:4] == ["1", "1"] for line in lines)


def test_synthetic_defects_caught_by_the_right_stage_and_healthy_rows_kept(tmp_path):
    out = tmp_path / "synth"
    synth.generate(out, n=600, seed=0)
    data = DataConfig(manifest=out / "manifest.csv")
    ctx = StageContext(data=data, run_dir=tmp_path / "run", workers=2)
    c = clean.run(clean.read_manifest(data), clean.CleanConfig(), ctx)
    p = probe.run(c.kept, probe.ProbeConfig(), ctx)
    tables.check_accounting("probe", c.kept[tables.ROW_ID].to_numpy(), p.kept, p.quarantined)
    q = quality.run(p.kept, quality.QualityConfig(), ctx)
    tables.check_accounting("quality", p.kept[tables.ROW_ID].to_numpy(), q.kept, q.quarantined)

    planted = synth.planted(out)
    manifest = pd.read_csv(out / "manifest.csv", keep_default_na=False)
    # synth may plant a copy *before* its source; the rule is "the first row is kept", so the
    # expected duplicate is the later of the two rows sharing the bytes.
    digest = {r: tables.file_digest(out / manifest.image_path[r]) for r in planted.row_id[planted.defect == "duplicate_image"]}
    for r, d in digest.items():
        twins = [i for i, path in enumerate(manifest.image_path) if i != r and (out / path).is_file()
                 and not (out / path).is_symlink() and tables.file_digest(out / path) == d]
        assert len(twins) == 1
        planted.loc[planted.row_id == r, "row_id"] = max(r, twins[0])

    got = pd.concat([
        p.quarantined[[tables.ROW_ID, tables.REASON]].assign(stage="probe"),
        q.quarantined[[tables.ROW_ID, tables.REASON]].assign(stage="quality"),
    ])
    want = planted[planted.stage.isin(["probe", "quality"])]
    for (stage, reason), w in want.groupby(["stage", "reason"]):
        g = got[(got.stage == stage) & (got[tables.REASON] == reason)]
        tp = len(set(w.row_id) & set(g[tables.ROW_ID]))
        assert tp == len(w) == len(g), f"{stage}/{reason}: planted {sorted(w.row_id)}, caught {sorted(g[tables.ROW_ID])}"
    assert set(got[tables.ROW_ID]) == set(want.row_id)  # nothing healthy dropped
    healthy_odd = planted[planted.stage == ""].row_id
    assert set(healthy_odd) - set(c.quarantined[tables.ROW_ID]) <= set(q.kept[tables.ROW_ID])


def _tiny_clip(path: Path, captions: list[str]) -> Path:
    """A randomly initialised tiny CLIP and a WordLevel tokenizer, saved like any local HF model."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(captions, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[EOS]"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=fast.vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, eos_token_id=2, pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    CLIPModel(cfg).save_pretrained(path)
    fast.save_pretrained(path)
    # The image preprocessing comes from the folder (mmcore.clip_model.load refuses a folder without it).
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def test_alignment_check_scores_with_a_local_clip_model(root, tmp_path, monkeypatch):
    paths = []
    for k in range(6):
        _scene(seed=20 + k, textured=k % 2 == 1).save(root / "images" / f"a{k}.png")
        paths.append(f"images/a{k}.png")
    captions = [f"a {c} circle on the {p}" for c, p in zip(["red", "blue", "green", "red", "blue", "green"], ["left", "right"] * 3)]
    model = _tiny_clip(tmp_path / "clip", captions)
    table = pd.DataFrame({tables.ROW_ID: np.arange(6, dtype=np.int64), tables.IMAGE: paths, tables.TEXT: captions})
    ctx = _ctx(root, tmp_path)
    p = probe.run(table, probe.ProbeConfig(), ctx)
    res = quality.run(p.kept, quality.QualityConfig(alignment_model=model, alignment_keep_fraction=0.5, alignment_batch_size=4), ctx)
    assert res.stats["alignment"] == "on (cosine)"
    allrows = pd.concat([res.kept, res.quarantined])
    assert allrows["clip_score"].between(-1, 1).all() and allrows["clip_score"].nunique() == 6
    low = res.quarantined[res.quarantined[tables.REASON] == "low_alignment"]
    assert len(low) == 3
    assert low["clip_score"].max() < res.kept["clip_score"].min()
    off = quality.run(p.kept, quality.QualityConfig(alignment_model=model, alignment_threshold=-1.0), ctx)
    assert off.quarantined.empty
    plain = quality.run(p.kept, quality.QualityConfig(), ctx)
    assert plain.stats["alignment"].startswith("off") and "clip_score" not in plain.kept
    with pytest.raises(ConfigError, match="quality.alignment_model: cannot load a CLIP model from"):
        quality.run(p.kept, quality.QualityConfig(alignment_model=tmp_path / "nope"), ctx)
    # A file broken after it was scored costs its own row in the CLIP pass, not the batch.
    (root / "images" / "broken_later.png").write_bytes(b"not a png any more")
    rows = pd.concat([table, pd.DataFrame({tables.ROW_ID: [6], tables.IMAGE: ["images/broken_later.png"], tables.TEXT: "x"})])
    scores, errors = quality.clip_scores(rows, model, str(root), batch_size=4)
    assert np.isnan(scores[6]) and errors[6].startswith("alignment decode: ") and not any(errors[:6])
    assert np.allclose(scores[:6], allrows.sort_values(tables.ROW_ID)["clip_score"], atol=1e-5)
    # Several captions of one image: it is decoded once, and each caption is scored against it.
    shared = pd.DataFrame({tables.ROW_ID: np.arange(4), tables.IMAGE: [paths[0], paths[1], paths[0], paths[0]],
                           tables.TEXT: [captions[0], captions[1], captions[1], captions[2]]})
    alone = [quality.clip_scores(shared.iloc[[i]], model, str(root))[0][0] for i in range(4)]
    decoded = []
    load_rgb = images.load_rgb
    monkeypatch.setattr(images, "load_rgb", lambda path, **kw: decoded.append(Path(path).name) or load_rgb(path, **kw))
    scores, errors = quality.clip_scores(shared, model, str(root), batch_size=2)  # a0's rows span two batches
    assert sorted(decoded) == ["a0.png", "a1.png"] and not any(errors)
    assert np.allclose(scores, alone, atol=1e-5) and scores[0] != scores[2]


def test_jpeg_with_garbled_data_but_an_end_marker_is_corrupt_not_scored(root, tmp_path):
    """The probe's end-marker check passes it; quality's decode must still refuse it."""
    _scene(seed=5).save(root / "images" / "garbled.jpg", quality=90)
    data = bytearray((root / "images" / "garbled.jpg").read_bytes())
    sos = data.find(b"\xff\xda")
    for k in range(sos + 200, sos + 260):  # stray 0xFF bytes: markers where none may be
        data[k] = 0xFF if k % 7 == 0 else data[k] ^ 0x5A
    (root / "images" / "garbled.jpg").write_bytes(bytes(data))
    table = pd.DataFrame({tables.ROW_ID: [0, 1], tables.IMAGE: ["images/good.jpg", "images/garbled.jpg"], tables.TEXT: "x"})
    ctx = _ctx(root, tmp_path)
    p = probe.run(table, probe.ProbeConfig(), ctx)
    assert p.quarantined.empty  # whole by structure
    res = quality.run(p.kept, quality.QualityConfig(), ctx)
    assert res.quarantined[tables.REASON].tolist() == ["corrupt_image"]
    assert res.kept[tables.ROW_ID].tolist() == [0]


def _garble(data: bytes, at: int = 200) -> bytes:
    """Stray 0xFF bytes in the entropy-coded data, 60 bytes after the start of the scan."""
    b = bytearray(data)
    sos = b.find(b"\xff\xda")
    for k in range(sos + at, sos + at + 60):
        b[k] = 0xFF if k % 7 == 0 else b[k] ^ 0x5A
    return bytes(b)


def test_jpeg_fast_path_gives_pillows_pixels():
    """simplejpeg (libjpeg-turbo directly) and Pillow's draft decode agree pixel for pixel."""
    rng = np.random.default_rng(0)
    cases = [((640, 480), {}), ((300, 300), {"subsampling": 0}), ((1000, 750), {"subsampling": 1}),
             ((383, 191), {"progressive": True}), ((97, 500), {"restart_marker_blocks": 3}), ((50, 40), {})]
    for (w, h), kw in cases:
        rgb = synth.render(synth._random_scene(rng), w, h, rng)
        for im in (rgb, rgb.convert("L")):
            for o in (1, 3, 6, 8):
                exif = Image.Exif()
                exif[images.ORIENTATION_TAG] = o
                buf = io.BytesIO()
                im.save(buf, "JPEG", quality=90, exif=exif, **kw)
                data = buf.getvalue()
                for color in (False, True):
                    want = images.load_reduced(io.BytesIO(data), 96, color)  # Pillow
                    for tag in (None, o):  # orientation parsed here, or known from the probe
                        got = images.decode_reduced(data, 96, color, tag)
                        assert got.dtype == want.dtype and np.array_equal(got, want), ((w, h), kw, im.mode, o, color, tag)
    cmyk = io.BytesIO()
    rgb.convert("CMYK").save(cmyk, "JPEG")  # not YCbCr: Pillow's own conversion
    assert np.array_equal(images.decode_reduced(cmyk.getvalue(), 16), images.load_reduced(io.BytesIO(cmyk.getvalue()), 16))


def test_damage_before_a_restart_marker_is_caught_and_mpo_decodes_alike(tmp_path):
    """Zeroed bytes in a JPEG with restart markers: libjpeg loses its place ('extraneous bytes before
    marker 0xd?'), Pillow decodes it silently. And an MPO (first picture) gets the same pixels either way."""
    buf = io.BytesIO()
    _scene(seed=4).save(buf, "JPEG", quality=90, restart_marker_blocks=4)
    b = bytearray(buf.getvalue())
    sos = b.find(b"\xff\xda")
    b[sos + 1500 : sos + 1510] = bytes(10)
    with Image.open(io.BytesIO(bytes(b))) as im:
        im.load()  # Pillow alone accepts it
    with pytest.raises(images.DamagedJPEG, match="extraneous bytes before marker 0xd"):
        images.decode_reduced(bytes(b), 96)
    assert images.decode_reduced(bytes(b), 96, strict_jpeg=False).shape == (120, 160)  # Pillow's decode
    mpo = tmp_path / "pair.mpo"
    _scene(800, 600, seed=1).save(mpo, "MPO", save_all=True, append_images=[_scene(800, 600, seed=2)])
    with Image.open(mpo) as im:
        assert im.format == "MPO"
    data = mpo.read_bytes()
    for color in (False, True):
        want = images.load_reduced(io.BytesIO(data), 96, color)
        assert want.shape[:2] == (150, 200) and np.array_equal(images.decode_reduced(data, 96, color), want)


def test_load_rgb_reads_through_the_retrying_reader(root, monkeypatch):
    """Shards, evaluation, the report and the CLIP score decode with load_rgb: flaky reads are retried."""
    from mmcore import faults

    path = root / "images" / "good.jpg"
    want = np.asarray(images.load_rgb(path, max_side=100))
    assert want.shape == (75, 100, 3)
    monkeypatch.setenv(faults.RATE_ENV, "0.5")
    for seed in range(5):  # some attempts fail and are retried; the pixels are the same
        monkeypatch.setenv(faults.SEED_ENV, str(seed))
        assert np.array_equal(np.asarray(images.load_rgb(path, max_side=100)), want)
    monkeypatch.setenv(faults.PERMANENT_ENV, "good.jpg")
    with pytest.raises(faults.ReadError, match="read_error"):
        images.load_rgb(path)


def test_damaged_jpeg_data_that_pillow_hides_is_corrupt(root, tmp_path):
    """A 640x480 JPEG with garbled entropy-coded data: Pillow returns it with gray blocks, libjpeg
    says 'premature end of data segment'. Strict (the default) quarantines it; strict_jpeg=False keeps it."""
    buf = io.BytesIO()
    _scene(640, 480, seed=3).save(buf, "JPEG", quality=90)
    data = _garble(buf.getvalue(), at=200)
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # Pillow alone would have accepted it
    (root / "images" / "damaged.jpg").write_bytes(data)
    paths = ["images/good.jpg", "images/damaged.jpg"]
    res = _probe_then_quality(root, paths, tmp_path)
    assert res.quarantined[tables.IMAGE].tolist() == ["images/damaged.jpg"]
    assert res.quarantined[tables.REASON].tolist() == ["corrupt_image"]
    assert "damaged JPEG data" in res.quarantined[tables.DETAIL].iloc[0]
    # Lenient: decoded as Pillow does, with gray in place of the lost blocks: mostly flat gray.
    lenient = _probe_then_quality(root, paths, tmp_path / "lenient", quality.QualityConfig(strict_jpeg=False))
    assert lenient.quarantined[tables.REASON].tolist() == ["low_information"]


def test_flat_images_share_one_phash_at_any_gray_level():
    hashes = {quality.phash(np.full((96, 96), v, np.uint8)) for v in (1, 10, 128, 200, 255)}
    assert hashes == {0x8000000000000000}  # only the DC term stands above the median (of zeros)
    assert quality.phash(np.zeros((96, 96), np.uint8)) == 0


def test_batched_scores_equal_the_one_image_functions():
    grays = [np.asarray(_scene(160 + 7 * i, 120 + 5 * i, seed=i).convert("L")) for i in range(6)]
    for s in (96, 50):  # 96: the whole-stack pHash reduction; 50: one image at a time
        sc = quality.Scorer(len(grays), s)
        for i, g in enumerate(grays):
            sc.add(i, g)
        got = sc.scores(np.arange(len(grays)))
        a = [quality._analysis(g, s) for g in grays]
        assert np.array_equal(got["sharpness"], [quality._sharpness([x]) for x in a])
        assert np.array_equal(got["entropy"], [quality._entropy(quality._hist(x)) for x in a])
        assert got["phash"].tolist() == [quality.phash(x) for x in a]
        sub = sc.scores(np.array([4, 1]))
        assert np.array_equal(sub["sharpness"], got["sharpness"][[4, 1]]) and np.array_equal(sub["phash"], got["phash"][[4, 1]])
