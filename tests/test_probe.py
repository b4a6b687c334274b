"""Probe stage: every failure reason with a real file, healthy odd encodings kept, determinism."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mmcore import images, parallel, probe, synth, tables
from mmcore.base import DataConfig, StageContext


def _picture(w: int = 96, h: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    arr[h // 4 : h // 2, w // 4 : w // 2] = (220, 40, 40)
    return Image.fromarray(arr, "RGB")


def _save(img: Image.Image, path: Path, fmt: str, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt, **kw)
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A dataset root with one file per case; returns (root, case -> manifest path)."""
    base = tmp_path_factory.mktemp("probe")
    root = base / "data"
    d = root / "images"
    d.mkdir(parents=True)
    outside = _save(_picture(), base / "outside.jpg", "JPEG")  # a real, valid image outside root
    pic = _picture()
    cases: dict[str, str] = {}

    def add(case: str, rel: str) -> None:
        cases[case] = rel

    _save(pic, d / "ok.jpg", "JPEG", quality=90)
    add("ok", "images/ok.jpg")
    exif = Image.Exif()
    exif[images.ORIENTATION_TAG] = 6
    _save(_picture(60, 40), d / "rotated.jpg", "JPEG", exif=exif)
    add("rotated", "images/rotated.jpg")
    _save(pic.convert("CMYK"), d / "cmyk.jpg", "JPEG")
    add("cmyk", "images/cmyk.jpg")
    _save(pic.convert("L"), d / "gray.png", "PNG")
    add("gray", "images/gray.png")
    _save(pic.convert("P", palette=Image.Palette.ADAPTIVE, colors=16), d / "pal.png", "PNG", transparency=0)
    add("palette", "images/pal.png")
    rgba = pic.convert("RGBA")
    rgba.putalpha(128)
    _save(rgba, d / "rgba.png", "PNG")
    add("rgba", "images/rgba.png")
    _save(Image.fromarray(np.asarray(pic.convert("L"), dtype=np.uint16) * 257), d / "png16.png", "PNG")
    add("png16", "images/png16.png")
    _save(pic, d / "pic.webp", "WEBP")
    add("webp", "images/pic.webp")
    frames = [pic.convert("P"), pic.transpose(Image.Transpose.FLIP_TOP_BOTTOM).convert("P")]
    frames[0].save(d / "anim.gif", "GIF", save_all=True, append_images=frames[1:], duration=50)
    add("gif", "images/anim.gif")
    _save(pic, d / "UPPER.JPG", "JPEG")
    add("upper", "images/UPPER.JPG")
    _save(pic, d / "ünïcødé 画像.jpg", "JPEG")
    add("unicode", "images/ünïcødé 画像.jpg")
    os.symlink(d / "ok.jpg", d / "inside_link.jpg")
    add("inside_link", "images/inside_link.jpg")
    # Broken files, one per reason.
    add("missing_file", "images/nope.jpg")
    (d / "empty.jpg").write_bytes(b"")
    add("empty_file", "images/empty.jpg")
    (d / "noise.jpg").write_bytes(np.random.default_rng(1).bytes(2048))
    add("not_an_image", "images/noise.jpg")
    full = (d / "ok.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(full[: len(full) // 2])
    add("corrupt_image", "images/truncated.jpg")
    (d / "bomb.png").write_bytes(synth.bomb_png(40000, 40000))
    add("too_many_pixels", "images/bomb.png")
    _save(pic, d / "pic.ppm", "PPM")
    add("unsupported_format", "images/pic.ppm")
    add("outside_traversal", "../outside.jpg")
    add("outside_absolute", str(outside))
    os.symlink(outside, d / "escape.jpg")
    add("outside_symlink", "images/escape.jpg")
    # A symlink to a file that does not exist outside: refused as outside, never looked up.
    os.symlink(base / "not_there.jpg", d / "escape_dangling.jpg")
    add("outside_dangling", "images/escape_dangling.jpg")
    return root, cases


def _table(cases: dict[str, str], names=None) -> pd.DataFrame:
    names = list(cases) if names is None else names
    return pd.DataFrame({tables.ROW_ID: np.arange(len(names), dtype=np.int64), tables.IMAGE: [cases[n] for n in names]})


def _ctx(root: Path, tmp_path: Path, workers: int = 1) -> StageContext:
    return StageContext(data=DataConfig(manifest=root / "manifest.csv"), run_dir=tmp_path / "run", workers=workers)


def _run(dataset, tmp_path, cfg=probe.ProbeConfig(), names=None, workers=1):
    root, cases = dataset
    table = _table(cases, names)
    res = probe.run(table, cfg, _ctx(root, tmp_path, workers))
    tables.check_accounting("probe", table[tables.ROW_ID].to_numpy(), res.kept, res.quarantined)
    return table, res


EXPECTED = {
    "missing_file": "missing_file",
    "empty_file": "empty_file",
    "not_an_image": "not_an_image",
    "corrupt_image": "corrupt_image",
    "too_many_pixels": "too_many_pixels",
    "unsupported_format": "unsupported_format",
    "outside_traversal": "outside_root",
    "outside_absolute": "outside_root",
    "outside_symlink": "outside_root",
    "outside_dangling": "outside_root",
}


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_each_broken_file_gets_its_reason(dataset, tmp_path, case):
    _, res = _run(dataset, tmp_path, names=[case, "ok"])
    assert res.kept[tables.IMAGE].tolist() == [dataset[1]["ok"]]
    assert res.quarantined[tables.REASON].tolist() == [EXPECTED[case]]
    assert set(res.quarantined[tables.REASON]) <= set(probe.REASONS)


ODD = {  # case -> (width, height, format, mode, n_frames)
    "ok": (96, 64, "JPEG", "RGB", 1),
    "rotated": (40, 60, "JPEG", "RGB", 1),  # stored 60x40 with EXIF orientation 6
    "cmyk": (96, 64, "JPEG", "CMYK", 1),
    "gray": (96, 64, "PNG", "L", 1),
    "palette": (96, 64, "PNG", "P", 1),
    "rgba": (96, 64, "PNG", "RGBA", 1),
    "webp": (96, 64, "WEBP", "RGB", 1),
    "gif": (96, 64, "GIF", "P", 2),
    "upper": (96, 64, "JPEG", "RGB", 1),
    "unicode": (96, 64, "JPEG", "RGB", 1),
    "inside_link": (96, 64, "JPEG", "RGB", 1),
}


def test_healthy_odd_encodings_are_kept_with_their_displayed_size(dataset, tmp_path):
    root, cases = dataset
    _, res = _run(dataset, tmp_path, names=[*ODD, "png16"])
    assert res.quarantined.empty
    kept = res.kept.set_index(tables.IMAGE)
    for case, (w, h, fmt, mode, frames) in ODD.items():
        row = kept.loc[cases[case]]
        assert (row["width"], row["height"], row["format"], row["mode"], row["n_frames"]) == (w, h, fmt, mode, frames), case
        assert row["content_digest"] == tables.file_digest(images.resolve_path(root, cases[case]))
        assert row["file_size"] == images.resolve_path(root, cases[case]).stat().st_size
    assert kept.loc[cases["png16"], "mode"].startswith("I")
    # The EXIF orientation is kept too: quality decodes upright without parsing the header again.
    assert kept["orientation"].to_dict() == {p: 6 if p == cases["rotated"] else 1 for p in kept.index}
    for c in probe.COLUMNS:
        assert c in res.kept.columns
    assert res.kept["width"].dtype == np.int64 and res.kept["file_size"].dtype == np.int64


def test_only_broken_rows_all_quarantined_without_crashing(dataset, tmp_path):
    _, res = _run(dataset, tmp_path, names=sorted(EXPECTED))
    assert res.kept.empty
    assert sorted(res.quarantined[tables.REASON]) == sorted(EXPECTED[c] for c in EXPECTED)


def test_rows_sharing_a_path_are_measured_once_and_all_kept(dataset, tmp_path):
    root, cases = dataset
    table = pd.DataFrame({tables.ROW_ID: np.arange(3, dtype=np.int64), tables.IMAGE: [cases["ok"], cases["ok"], cases["gif"]]})
    res = probe.run(table, probe.ProbeConfig(), _ctx(root, tmp_path))
    assert res.kept[tables.ROW_ID].tolist() == [0, 1, 2]
    assert res.stats["n_files"] == 2


def test_decode_mode_catches_corrupt_pixel_data_with_an_intact_end_marker(dataset, tmp_path):
    root, cases = dataset
    data = bytearray((root / cases["gray"]).read_bytes())
    idat = data.find(b"IDAT") + 4
    data[idat + 2 : idat + 40] = np.random.default_rng(0).bytes(38)  # garbled zlib stream
    (root / "images" / "garbled.png").write_bytes(bytes(data))
    table = pd.DataFrame({tables.ROW_ID: [0], tables.IMAGE: ["images/garbled.png"]})
    ctx = _ctx(root, tmp_path)
    assert probe.run(table, probe.ProbeConfig(), ctx).quarantined.empty  # IEND is there
    res = probe.run(table, probe.ProbeConfig(verify="decode"), ctx)
    assert res.quarantined[tables.REASON].tolist() == ["corrupt_image"]


def test_header_only_probe_without_digest_still_finds_truncation(dataset, tmp_path):
    _, res = _run(dataset, tmp_path, cfg=probe.ProbeConfig(digest=False), names=["ok", "corrupt_image", "empty_file"])
    assert res.kept["content_digest"].tolist() == [""]
    assert sorted(res.quarantined[tables.REASON]) == ["corrupt_image", "empty_file"]


def test_pixel_limit_is_configurable(dataset, tmp_path):
    _, res = _run(dataset, tmp_path, cfg=probe.ProbeConfig(max_pixels=96 * 64 - 1), names=["ok"])
    assert res.quarantined[tables.REASON].tolist() == ["too_many_pixels"]


def test_buckets():
    short = pd.Series([10, 256, 700, 5000])
    assert probe.res_bucket(short, (256, 512, 1024)).tolist() == ["<256", "256-512", "512-1024", ">=1024"]
    aspect = pd.Series([0.5, 1.0, 1.5, 3.0])
    assert probe.aspect_bucket(aspect, (0.8, 1.25, 2.0)).tolist() == ["portrait", "square", "landscape", "wide"]


def test_bad_bucket_edges_are_rejected():
    with pytest.raises(ValueError, match="bucket edges must be positive and increasing"):
        probe.ProbeConfig(res_bucket_edges=(512, 256))


def test_same_output_whatever_batch_size_and_workers(dataset, tmp_path, monkeypatch):
    # This data is far below parallel.MIN_ROWS_PER_WORKER: force the pool, so workers=2 uses two processes.
    map_batches = parallel.map_batches
    monkeypatch.setattr(parallel, "map_batches", lambda *a, **kw: map_batches(*a, **{**kw, "min_rows_per_worker": 0}))
    _, a = _run(dataset, tmp_path)
    _, b = _run(dataset, tmp_path, cfg=probe.ProbeConfig(batch_size=3), workers=2)
    pd.testing.assert_frame_equal(a.kept.reset_index(drop=True), b.kept.reset_index(drop=True))
    pd.testing.assert_frame_equal(a.quarantined.reset_index(drop=True), b.quarantined.reset_index(drop=True))
    assert a.stats == b.stats


def test_measure_never_raises_and_reports_codes(dataset):
    root, cases = dataset
    m = probe.measure(_table(cases), probe.ProbeConfig(), str(root))
    assert len(m) == len(cases)
    assert set(m[probe.ERROR]) <= {"", *probe.REASONS}


def test_resolver_agrees_with_realpath_on_every_kind_of_path(dataset, tmp_path):
    """The per-folder cache gives what ``resolve_under`` gives, refusals included."""
    root, cases = dataset
    (root / "linked").mkdir(exist_ok=True)
    if not (root / "linked" / "to_images").exists():
        os.symlink(root / "images", root / "linked" / "to_images")  # a folder link that stays inside
        os.symlink(tmp_path, root / "linked" / "to_outside")  # a folder link that leaves
    rels = [*cases.values(), "linked/to_images/ok.jpg", "linked/to_outside/x.jpg", "images/../images/ok.jpg",
            "./images/ok.jpg", "images/./ok.jpg", "images/nope/../ok.jpg", "..", ".", "images/", "/etc/passwd",
            "missing_dir/a.jpg", "images//ok.jpg"]
    resolve = images.Resolver(root)
    for rel in rels * 2:  # the second pass is served from the folder cache
        try:
            want = images.resolve_under(os.path.realpath(root), rel)
        except images.UnsafePath:
            with pytest.raises(images.UnsafePath):
                resolve(rel)
            continue
        assert resolve(rel) == want, rel
