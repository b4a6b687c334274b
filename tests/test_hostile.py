"""Hostile and huge inputs (issue 23): each finding planted as a real file, then all of them in one run.

Every test plants the input the way an attacker would (a sparse file, an EPS named .jpg, a YAML
bomb, a pickle in the result storage) and checks the class of input is refused, cheaply, with a
reason. ``test_hostile_manifest_end_to_end`` runs ``mmpipe run`` on a manifest holding all of them.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import resource
import struct
import subprocess
import sys
import tarfile
import time
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mmcore import faults, images, probe, quality, split, spotcheck, tables
from mmcore.base import DataConfig, StageContext
from mmcore.config import load_config
from mmcore.errors import ConfigError, InputError

REPO = Path(__file__).resolve().parents[1]
SPARSE_BYTES = 8 << 30  # 8 GB, 0 bytes on disk


# --------------------------------------------------------------------------- planted files


def eps_bytes() -> bytes:
    return (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n"
            b"newpath 0 0 moveto 16 16 lineto stroke showpage\n%%EOF\n")


def rle_bmp(width: int, height: int, end_marker: bool) -> bytes:
    """An 8-bit RLE BMP of a few encoded rows; without the end-of-bitmap escape (00 01) when asked."""
    row = b"\xff\x01" * (width // 255) + b"\x00\x00"
    pix = row * 4 + (b"\x00\x01" if end_marker else b"")
    offset = 14 + 40 + 256 * 4
    head = b"BM" + struct.pack("<IHHI", offset + len(pix), 0, 0, offset)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(pix), 2835, 2835, 256, 0)
    palette = b"".join(bytes((i, i, i, 0)) for i in range(256))
    return head + info + palette + pix


def many_ifd_tiff(n: int) -> bytes:
    frames = [Image.new("L", (1, 1), i % 256) for i in range(n)]
    buf = io.BytesIO()
    frames[0].save(buf, "TIFF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def png16(side: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((side, side), 40000, np.uint16)).save(buf, "PNG")
    return buf.getvalue()


def _photo(seed: int, size=(96, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    return Image.fromarray(arr).resize(size, Image.Resampling.BILINEAR)


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def plant(root: Path) -> dict[str, tuple[str, str, str]]:
    """Hostile files under ``root/images``: name -> (path, stage, reason it must get)."""
    d = root / "images"
    d.mkdir(parents=True, exist_ok=True)
    out: dict[str, tuple[str, str, str]] = {}

    def put(name: str, rel: str, data: bytes, stage: str, reason: str) -> None:
        (root / rel).write_bytes(data)
        out[name] = (rel, stage, reason)

    put("eps_as_jpg", "images/eps.jpg", eps_bytes(), "probe", "unsupported_format")
    rgb = _photo(1, (32, 32))
    put("ico", "images/icon.jpg", _save(rgb, "ICO"), "probe", "unsupported_format")
    put("tga", "images/tga.jpg", _save(rgb, "TGA"), "probe", "unsupported_format")
    put("pcx", "images/pcx.png", _save(rgb, "PCX"), "probe", "unsupported_format")
    with open(d / "sparse.jpg", "wb") as f:  # a "video named .jpg": JPEG magic, then 8 GB of holes
        f.write(b"\xff\xd8\xff\xe0")
        f.truncate(SPARSE_BYTES)
    out["sparse_8gb"] = ("images/sparse.jpg", "probe", "file_too_large")
    put("rle_bmp_no_end", "images/rle.bmp", rle_bmp(1500, 1500, end_marker=False), "probe", "corrupt_image")
    put("rle_bmp_huge", "images/rle_huge.bmp", rle_bmp(5000, 5000, end_marker=True), "probe", "too_many_pixels")
    return out


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> tuple[Path, dict[str, tuple[str, str, str]]]:
    root = tmp_path_factory.mktemp("hostile") / "data"
    return root, plant(root)


def _ctx(root: Path, tmp: Path) -> StageContext:
    manifest = root / "manifest.csv"
    manifest.touch()
    return StageContext(data=DataConfig(manifest=manifest, root=root), run_dir=tmp / "run", seed=0, workers=1, progress=False)


def _probe(root: Path, paths: list[str], tmp: Path, cfg: probe.ProbeConfig | None = None):
    table = pd.DataFrame({tables.ROW_ID: range(len(paths)), tables.IMAGE: paths, tables.TEXT: "a photo"})
    return probe.run(table, cfg or probe.ProbeConfig(), _ctx(root, tmp))


def _fake_gs(tmp: Path) -> tuple[Path, Path]:
    """A stand-in ``gs`` first on PATH that records being called."""
    bin_dir, marker = tmp / "bin", tmp / "gs-was-called"
    bin_dir.mkdir(exist_ok=True)
    gs = bin_dir / "gs"
    gs.write_text(f"#!/bin/sh\necho called >> {marker}\nexit 1\n")
    gs.chmod(0o755)
    return bin_dir, marker


# --------------------------------------------------------------------------- 1. dangerous decoders


def test_dangerous_formats_never_reach_their_decoders(hostile, tmp_path, monkeypatch):
    root, planted = hostile
    bin_dir, marker = _fake_gs(tmp_path)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    names = ["eps_as_jpg", "ico", "tga", "pcx"]
    res = _probe(root, [planted[n][0] for n in names], tmp_path)
    assert res.kept.empty and set(res.quarantined[tables.REASON]) == {"unsupported_format"}
    for n in names:  # every other decoder: the report's thumbnails, shards, evaluate, spot-check
        with pytest.raises(images.RefusedImage, match="unsupported_format"):
            images.load_rgb(root / planted[n][0], max_side=64)
    # Even a direct Pillow open in this process cannot hand an EPS to Ghostscript.
    with pytest.raises(Exception):
        with Image.open(io.BytesIO(eps_bytes())) as im:
            im.load()
    assert not marker.exists()


def test_quality_decodes_only_the_probed_format(hostile, tmp_path):
    root, planted = hostile
    table = pd.DataFrame({tables.ROW_ID: [0], tables.IMAGE: [planted["tga"][0]], "orientation": [1],
                          "format": ["JPEG"], "width": [32], "height": [32], "file_size": [(root / planted["tga"][0]).stat().st_size]})
    m = quality.measure(table, quality.QualityConfig(), str(root))
    assert m[quality.ERROR].tolist() == ["file_changed"]  # a TGA where the probe saw a JPEG


# --------------------------------------------------------------------------- 2. huge files


def test_sparse_8gb_file_is_refused_unread_in_a_memory_capped_process(hostile):
    root, planted = hostile
    code = f"""
import resource, time
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))  # an 8 GB read would die here
import pandas as pd
from mmcore import faults, images, probe
t = time.perf_counter()
rows = pd.DataFrame({{"row_id": [0], "image_path": [{planted['sparse_8gb'][0]!r}]}})
m = probe.measure(rows, probe.ProbeConfig(), {str(root)!r})
assert m["probe_error"].tolist() == ["file_too_large"], m.to_dict()
try:
    images.load_rgb({str(root / planted['sparse_8gb'][0])!r})
except faults.ReadError as e:
    assert e.reason == "file_too_large"
else:
    raise AssertionError("read")
print(time.perf_counter() - t)
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert float(r.stdout.split()[-1]) < 5


def test_byte_limit_set_small_refuses_and_hashing_is_chunked(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(_save(_photo(2, (200, 200)), "PNG"))
    size = (tmp_path / "images" / "a.png").stat().st_size
    res = _probe(tmp_path, ["images/a.png"], tmp_path, probe.ProbeConfig(max_file_bytes=size - 1))
    assert res.quarantined[tables.REASON].tolist() == ["file_too_large"]
    with pytest.raises(faults.ReadError) as e:
        faults.read_bytes(tmp_path / "images" / "a.png", max_bytes=100)
    assert e.value.reason == "file_too_large"
    ok = _probe(tmp_path, ["images/a.png"], tmp_path, probe.ProbeConfig(max_file_bytes=size))
    assert ok.kept["content_digest"].tolist() == [tables.file_digest(tmp_path / "images" / "a.png")]


def test_memory_error_while_decoding_costs_the_row_not_the_run(tmp_path, monkeypatch):
    (tmp_path / "images").mkdir()
    for i in range(2):
        (tmp_path / "images" / f"{i}.png").write_bytes(_save(_photo(i), "PNG"))
    real = images.decode_reduced

    def explode(data, *a, **kw):
        if len(data) == (tmp_path / "images" / "0.png").stat().st_size:
            raise MemoryError()
        return real(data, *a, **kw)

    monkeypatch.setattr(images, "decode_reduced", explode)
    rows = pd.DataFrame({tables.ROW_ID: [0, 1], tables.IMAGE: ["images/0.png", "images/1.png"]})
    m = quality.measure(rows, quality.QualityConfig(), str(tmp_path))
    assert m[quality.ERROR].tolist() == ["file_too_large", ""]


# --------------------------------------------------------------------------- 4. symlinks, files changed


def test_fingerprint_follows_symlinks_and_stays_inside_the_root(tmp_path):
    from mmcore.digests import files_fingerprint

    root = tmp_path / "data"
    (root / "store").mkdir(parents=True)
    (root / "images").mkdir()
    (root / "store" / "blob").write_bytes(b"one")
    os.symlink(root / "store" / "blob", root / "images" / "a.jpg")
    outside = tmp_path / "secret"
    outside.write_bytes(b"x")
    os.symlink(outside, root / "images" / "out.jpg")
    before = files_fingerprint(root, ["images/a.jpg", "images/out.jpg"])
    (root / "store" / "blob").write_bytes(b"three")  # the link itself is untouched
    assert files_fingerprint(root, ["images/a.jpg", "images/out.jpg"]) != before
    after = files_fingerprint(root, ["images/a.jpg", "images/out.jpg"])
    outside.write_bytes(b"changed outside")  # never stat'ed: no difference
    assert files_fingerprint(root, ["images/a.jpg", "images/out.jpg"]) == after


def test_file_changed_between_probe_and_quality_is_a_reason(tmp_path):
    (tmp_path / "images").mkdir()
    for i in range(3):
        (tmp_path / "images" / f"{i}.png").write_bytes(_save(_photo(i, (96, 64)), "PNG"))
    p = _probe(tmp_path, [f"images/{i}.png" for i in range(3)], tmp_path)
    # 0: a 900-megapixel-style swap (bigger file); 1: another format; 2: untouched.
    (tmp_path / "images" / "0.png").write_bytes(png16(2000))
    (tmp_path / "images" / "1.png").write_bytes(_save(_photo(1, (96, 64)), "JPEG"))
    res = quality.run(p.kept, quality.QualityConfig(), _ctx(tmp_path, tmp_path))
    reasons = dict(zip(res.quarantined[tables.IMAGE], res.quarantined[tables.REASON]))
    assert (reasons["images/0.png"], reasons["images/1.png"]) == ("file_changed", "file_changed")
    # Same bytes count, other dimensions: the decoded size is checked against the probe's.
    policy = images.DecodePolicy(size=(10, 10), format="PNG")
    with pytest.raises(images.RefusedImage, match="file_changed: 20x10"):
        images.open_image(io.BytesIO(_save(Image.new("L", (20, 10)), "PNG")), policy)


# --------------------------------------------------------------------------- 9. small inputs, huge cost


def test_16bit_png_decodes_without_int64_copies():
    data = png16(3000)  # 9 MP, a few KB
    tracemalloc.start()
    images.decode_reduced(data, 96)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # Pillow's own array export peaks at 4 bytes a pixel; the int64 path added 16 more (two 72 MB copies).
    assert peak < 9_000_000 * 4.5, peak


def test_rle_bmp_and_deep_tiff_cost_is_bounded(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "rle.bmp").write_bytes(rle_bmp(1500, 1500, end_marker=False))
    (tmp_path / "images" / "ok.bmp").write_bytes(rle_bmp(600, 20, end_marker=True))
    (tmp_path / "images" / "huge.bmp").write_bytes(rle_bmp(5000, 5000, end_marker=True))
    (tmp_path / "images" / "deep.tif").write_bytes(many_ifd_tiff(images.MAX_FRAMES + 200))
    t = time.perf_counter()
    res = _probe(tmp_path, ["images/rle.bmp", "images/ok.bmp", "images/huge.bmp", "images/deep.tif"], tmp_path)
    assert time.perf_counter() - t < 10
    reasons = dict(zip(res.quarantined[tables.IMAGE], res.quarantined[tables.REASON]))
    assert reasons == {"images/rle.bmp": "corrupt_image", "images/huge.bmp": "too_many_pixels"}
    assert res.kept.set_index(tables.IMAGE).loc["images/deep.tif", "n_frames"] == images.MAX_FRAMES


def test_default_pixel_limit_is_pillows():
    assert probe.ProbeConfig().max_pixels == images.DEFAULT_MAX_PIXELS == Image.MAX_IMAGE_PIXELS


# --------------------------------------------------------------------------- 5. run lock, run identity, run folder


def test_second_run_into_a_held_run_folder_fails_in_one_line(tmp_path):
    from mmcore import runlock

    data = tmp_path / "data"
    data.mkdir()
    with runlock.hold(tmp_path / "run", data) as run_id:
        with pytest.raises(runlock.RunFolderBusy, match=rf"in use by another mmpipe run \(pid {os.getpid()}, run {run_id}"):
            with runlock.hold(tmp_path / "run", data):
                pass
    with runlock.hold(tmp_path / "run", data):  # released on exit
        pass
    for bad in ("/", data):  # a folder above the dataset is allowed (the demo's layout; tested below)
        with pytest.raises(InputError, match="expected a folder of its own"):
            runlock.check_run_dir(bad, data)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        runlock.check_run_dir(tmp_path / "file", data)


# --------------------------------------------------------------------------- 6. spreadsheet formulas


def test_spotcheck_csv_cells_cannot_start_a_formula():
    caps = ["=HYPERLINK(\"http://x\",\"y\")", "+1+1", "-2", "@SUM(A1)", "'=already", "\tTAB", "plain"]
    emb = np.eye(len(caps), dtype=np.float32)
    sheet = spotcheck.build(emb, emb, [f"-img{i}.jpg" for i in range(len(caps))], range(len(caps)), caps,
                            range(len(caps)), n=len(caps), seed=0)
    for cell in pd.read_csv(io.StringIO(sheet.to_csv(index=False)), dtype=str, keep_default_na=False)[["query", "retrieved"]].stack():
        assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), cell
    assert {spotcheck.cell_text(spotcheck.spreadsheet_safe(c)) for c in caps} == set(caps)
    page = spotcheck.to_html(sheet, lambda p: Image.new("RGB", (4, 4)))
    assert "+1+1" in page and "&#x27;+1+1" not in page


# --------------------------------------------------------------------------- 7. persisted results are JSON


def test_planted_pickle_result_is_never_unpickled(tmp_path, monkeypatch):
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    from tasks.common import StageOutput, StageOutputSerializer, guard_record

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    out = StageOutput("clean", "/r", "sha256:a", "sha256:b", 3, 1, "sha256:c")
    ser = StageOutputSerializer()
    assert ser.loads(ser.dumps(out)) == out
    assert ser.loads(ser.dumps(Path("/r/m.json"))) == Path("/r/m.json")  # the external evaluation's result
    with pytest.raises(ValueError):
        ser.loads(json.dumps({"__class__": "os.system"}).encode())
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path / "storage"}):
        (tmp_path / "storage").mkdir()
        good = {"metadata": {"serializer": {"type": ser.type}}, "result": ser.dumps(out).decode()}
        (tmp_path / "storage" / "k1").write_text(json.dumps(good))
        assert not guard_record("k1") and (tmp_path / "storage" / "k1").exists()
        import base64

        bad = {"metadata": {"serializer": {"type": "pickle", "picklelib": "cloudpickle"}},
               "result": base64.b64encode(pickle.dumps(Evil())).decode()}
        for key, content in (("k2", json.dumps(bad).encode()), ("k3", pickle.dumps(Evil()))):
            (tmp_path / "storage" / key).write_bytes(content)
            assert guard_record(key) and not (tmp_path / "storage" / key).exists()
    assert not marker.exists()


def test_disk_full_is_not_retried():
    from tasks.common import is_transient

    def state(exc):
        return SimpleNamespace(result=lambda raise_on_failure=False: exc)

    assert not is_transient(None, None, state(OSError(errno.ENOSPC, "No space left on device")))
    assert is_transient(None, None, state(OSError(errno.EIO, "I/O error")))


# --------------------------------------------------------------------------- 10. splits that collapse


def _split_table(n: int, digest: str | None = None, group: str | None = None) -> pd.DataFrame:
    df = pd.DataFrame({tables.ROW_ID: np.arange(n), tables.TEXT: [f"caption number {i}" for i in range(n)],
                       "content_digest": digest if digest is not None else [f"sha256:{i}" for i in range(n)],
                       "res_bucket": "<256"})
    if group is not None:
        df[tables.GROUP] = group
    return df


def test_empty_digests_and_blank_groups_are_no_key():
    ctx = SimpleNamespace(seed=0)
    for df in (_split_table(100, digest=""), _split_table(100, group=""), _split_table(100, group="  ")):
        res = split.run(df, split.SplitConfig(), ctx)
        assert res.stats["n_multi_row_groups"] == 0
        assert res.stats["max_ratio_deviation"] < 0.05


def test_a_split_that_collapses_fails_loudly_naming_the_group():
    ctx = SimpleNamespace(seed=0)
    df = _split_table(100, group=["big"] * 80 + [f"g{i}" for i in range(20)])
    with pytest.raises(InputError, match=r"split: achieved ratios .* group 0 holds 80 of 100 rows .*group 'big' on 80 rows.*allow_imbalance"):
        split.run(df, split.SplitConfig(), ctx)
    res = split.run(df, split.SplitConfig(allow_imbalance=True), ctx)
    assert res.stats["warnings"]


# --------------------------------------------------------------------------- 11. YAML bombs


def test_yaml_bombs_and_deep_nesting_are_one_line_errors(tmp_path):
    bomb = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i, name in enumerate("bcdefghi"):
        prev = "abcdefghi"[i]
        bomb.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    (tmp_path / "bomb.yaml").write_text("\n".join(bomb) + "\ndata: {manifest: *i}\n")
    (tmp_path / "deep.yaml").write_text("[" * 10000 + "]" * 10000)
    (tmp_path / "long.yaml").write_text("data: {manifest: m.csv}\nseed: '" + "x" * 1_000_000 + "'\n")
    for name, match in (("bomb", "expands to more than"), ("deep", "nested"), ("long", r"^seed: .*got '")):
        t = time.perf_counter()
        with pytest.raises(ConfigError, match=match) as e:
            load_config(tmp_path / f"{name}.yaml")
        assert time.perf_counter() - t < 5 and len(str(e.value)) < 600 and "\n" not in str(e.value), name


# --------------------------------------------------------------------------- low findings


def test_corrupt_checkpoint_does_not_block_training(tmp_path):
    from mmcore.trainloop import load_checkpoint

    (tmp_path / "last.pt").write_bytes(b"PK\x03\x04 torn")
    assert load_checkpoint(tmp_path / "last.pt") == {}


def test_terminal_escapes_are_shown_not_sent():
    from mmpipe.cli import _terminal_safe

    assert _terminal_safe("a\x1b]0;pwned\x07b\u202ec\nd") == "a\\x1b]0;pwned\\x07b\\u202ec\nd"


def test_not_an_image_detail_never_echoes_file_bytes(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "secret.jpg").write_bytes(b"root:$6$hash:19000:0:99999:7:::\n")
    res = _probe(tmp_path, ["images/secret.jpg"], tmp_path)
    assert res.quarantined[tables.REASON].tolist() == ["not_an_image"]
    assert "root" not in res.quarantined[tables.DETAIL].iloc[0]


def test_new_reasons_are_declared_and_in_the_readme():
    readme = (REPO / "README.md").read_text()
    for stage, reasons in (("probe", probe.REASONS), ("quality", quality.REASONS)):
        for code in ("file_too_large", "unsupported_format", "too_many_pixels"):
            assert code in reasons
        for code in reasons:
            assert f"| {stage} | `{code}` |" in readme, (stage, code)
    assert "file_changed" in quality.REASONS


def test_cli_refuses_an_out_that_is_a_file_and_a_bad_external_name(tmp_path):
    (tmp_path / "out").write_text("not a folder")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("image_path,caption\n")
    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api"}  # never reached
    r = subprocess.run([sys.executable, "-m", "mmpipe", "run", str(REPO / "configs" / "demo.yaml"), "--set",
                        f"data.manifest={manifest}", "--out", str(tmp_path / "out")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: run folder") and r.stderr.count("\n") == 1, r.stderr
    from mmcore.evaluate import check_name

    for name in ("../..", "..", "a/b", ".hidden", ""):
        with pytest.raises(InputError, match="dataset name must match"):
            check_name(name)


def test_run_folder_checks_refuse_root_home_and_the_dataset_but_allow_the_demo_layout(tmp_path):
    from mmcore.runlock import check_run_dir

    data = tmp_path / "run" / "data"
    data.mkdir(parents=True)
    check_run_dir(tmp_path / "run", data)  # `mmpipe demo`: the data lives in RUN_DIR/data
    check_run_dir(tmp_path / "elsewhere", data)
    for bad, match in (("/", "file system root"), (Path.home(), "home folder"), (data, "is the dataset folder")):
        with pytest.raises(InputError, match=match):
            check_run_dir(bad, data)
    inside = tmp_path / "run2" / "clean" / "images"  # a folder a stage writes
    inside.mkdir(parents=True)
    with pytest.raises(InputError, match="lies in clean/ of run folder"):
        check_run_dir(tmp_path / "run2", inside)


# --------------------------------------------------------------------------- end to end


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


MAX_RSS_BYTES = 3 << 30  # stated bound for the whole run's largest process (the 8 GB file alone would break it)


@pytest.mark.slow
def test_hostile_manifest_end_to_end(tmp_path, prefect_harness):
    """``mmpipe run`` on a manifest of every hostile input: it completes, each hostile row has its reason,
    memory stays under MAX_RSS_BYTES, and nothing is written outside the run folder."""
    from prefect.settings import PREFECT_API_URL

    from mmcore import synth

    data = tmp_path / "data"
    synth.generate(data, n=120, seed=3)
    planted = plant(data)
    more = {
        "png16_at_limit": ("images/png16.png", png16(9000), "quality", None),  # 81 MP of 16-bit: decoded, cheaply
        "deep_tiff": ("images/deep.tif", many_ifd_tiff(images.MAX_FRAMES + 50), "probe", None),
    }
    for name, (rel, blob, _, _) in more.items():
        (data / rel).write_bytes(blob)
    os.symlink(data / "images" / "eps.jpg", data / "images" / "link_to_eps.jpg")
    planted["symlink_to_eps"] = ("images/link_to_eps.jpg", "probe", "unsupported_format")
    m = pd.read_csv(data / "manifest.csv", dtype=str, keep_default_na=False)
    text_col = "caption" if "caption" in m.columns else m.columns[1]
    extra = [{"image_path": rel, text_col: f"a hostile file called {name} on a table"} for name, (rel, _, _) in planted.items()]
    extra += [{"image_path": rel, text_col: f"a hostile file called {name} on a table"} for name, (rel, *_) in more.items()]
    extra += [{"image_path": m["image_path"].iloc[0], text_col: "=HYPERLINK(\"http://evil\") \x1b]0;pwned\x07 a red circle"}]
    first = m.iloc[0].to_dict()  # a valid timestamp, label and domain: only the file is hostile
    extra = [{**first, **row} for row in extra]
    m = pd.concat([m, pd.DataFrame(extra)], ignore_index=True).fillna("")
    m.to_csv(data / "manifest.csv", index=False)
    before = _tree(data)

    work, tmpdir = tmp_path / "cwd", tmp_path / "tmp"
    work.mkdir()
    tmpdir.mkdir()
    bin_dir, marker = _fake_gs(tmp_path)
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "TMPDIR": str(tmpdir),
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}
    sets = ["train.steps=2", "train.batch_size=8", "train.num_workers=0", "evaluate.bootstrap=20",
            "evaluate.robustness=false", "evaluate.spotcheck_n=3", "report.thumbnails_per_reason=4",
            "split.allow_imbalance=true"]
    cmd = [sys.executable, "-m", "mmpipe", "run", str(REPO / "configs" / "demo.yaml"), "--set",
           f"data.manifest={data / 'manifest.csv'}", *(a for s in sets for a in ("--set", s)), "--out", str(work / "run")]
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - t
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    assert peak < MAX_RSS_BYTES, peak

    run = work / "run"
    q = pd.concat([tables.read_parquet(run / s / "quarantine.parquet").assign(stage=s) for s in ("probe", "quality")])
    got = dict(zip(q[tables.IMAGE], zip(q["stage"], q[tables.REASON])))
    for name, (rel, stage, reason) in planted.items():
        assert got.get(rel) == (stage, reason), (name, got.get(rel))
    # Costly but valid: passed the probe, then scored by quality's checks (a 1x1 or flat image fails one).
    assert set(tables.read_parquet(run / "probe" / "kept.parquet")[tables.IMAGE]) >= {"images/png16.png", "images/deep.tif"}
    for rel in ("images/png16.png", "images/deep.tif"):
        assert got.get(rel, ("quality", "too_small"))[1] in quality.REASONS and got.get(rel, ("", ""))[1] not in (
            "corrupt_image", "file_too_large", "file_changed"), (rel, got.get(rel))
    csv = (run / "evaluate" / "spotcheck.csv").read_text()
    assert "\n=" not in csv and ",=" not in csv
    assert not marker.exists()
    assert _tree(data) == before, "the dataset folder changed"
    assert sorted(p.name for p in work.iterdir()) == ["run"]
    assert not [p for p in tmpdir.rglob("*") if p.is_file()], list(tmpdir.rglob("*"))
    r2 = subprocess.run([sys.executable, "-m", "mmpipe", "inspect", str(run), "clean", "--rows", "200"], cwd=work,
                        env=env, capture_output=True, text=True, timeout=120)
    assert r2.returncode == 0 and "\x1b" not in r2.stdout and "\x07" not in r2.stdout
    (tmp_path / "e2e.json").write_text(json.dumps({"seconds": seconds, "peak_rss": peak}))
    print(f"hostile end-to-end: {seconds:.1f} s, peak RSS {peak / 2**20:.0f} MiB")


def test_huge_non_ascii_caption_is_too_long_before_normalisation(tmp_path):
    from mmcore import clean

    manifest = tmp_path / "m.csv"
    manifest.touch()
    ctx = StageContext(data=DataConfig(manifest=manifest), run_dir=tmp_path / "run", seed=0, workers=1, progress=False)
    huge = "ü é " * 1_000_000  # 4 M non-ASCII characters: ftfy over all of it takes minutes
    table = pd.DataFrame({tables.ROW_ID: [0, 1], "image_path": ["a.jpg", "b.jpg"], "text": [huge, "a red circle on a table"]})
    t = time.perf_counter()
    res = clean.run(table, clean.CleanConfig(), ctx)
    assert time.perf_counter() - t < 10
    assert res.quarantined[tables.REASON].tolist() == ["caption_too_long"]
    assert res.quarantined[tables.DETAIL].iloc[0].startswith("4000000 chars")


# --------------------------------------------------------------------------- 8. row-level manifest damage


def _clean_manifest(path: Path):
    """read_manifest + clean.run on one manifest file, as the clean task runs them."""
    from mmcore import clean

    data = DataConfig(manifest=path)
    ctx = StageContext(data=data, run_dir=path.parent / "run", seed=0, workers=1, progress=False)
    return clean.run(clean.read_manifest(data), clean.CleanConfig(), ctx)


GOOD_ROWS = [("b.jpg", "a blue circle on a wooden table"), ("c.jpg", "a green square on a grey mat")]


def _bad_utf8_parquet(path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = pa.array([b"a red caf\xe9 on a table", *(t.encode() for _, t in GOOD_ROWS)], pa.binary())
    text = pa.Array.from_buffers(pa.string(), len(raw), raw.buffers())  # Parquet does not validate UTF-8
    pq.write_table(pa.table({"image_path": ["a.jpg", *(p for p, _ in GOOD_ROWS)], "text": text}), path)


@pytest.mark.parametrize("name", ["manifest.csv", "manifest.tsv", "manifest.jsonl", "manifest.parquet"])
def test_undecodable_bytes_cost_their_row_not_the_manifest(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".parquet"):
        _bad_utf8_parquet(path)
    elif name.endswith(".jsonl"):
        lines = [b'{"image_path": "a.jpg", "text": "a red caf\xe9 on a table"}']
        lines += [json.dumps({"image_path": p, "text": t}).encode() for p, t in GOOD_ROWS]
        path.write_bytes(b"\n".join(lines) + b"\n")
    else:
        sep = b"\t" if name.endswith(".tsv") else b","
        rows = [b"image_path" + sep + b"text", b"a.jpg" + sep + b"a red caf\xe9 on a table"]
        rows += [p.encode() + sep + t.encode() for p, t in GOOD_ROWS]
        path.write_bytes(b"\n".join(rows) + b"\n")
    res = _clean_manifest(path)
    q = res.quarantined
    assert q[tables.REASON].tolist() == ["invalid_encoding"] and q[tables.ROW_ID].tolist() == [0]
    assert "UTF-8" in q[tables.DETAIL].iloc[0]
    assert "\ufffd" in q[tables.TEXT_RAW].iloc[0]  # the bytes shown as U+FFFD, not dropped
    assert res.kept[tables.TEXT].tolist() == [t for _, t in GOOD_ROWS]
    from mmcore import clean

    assert clean.BAD_BYTES not in res.kept.columns and clean.BAD_BYTES not in q.columns


@pytest.mark.parametrize("block", [None, 1 << 20])  # clean's block; pyarrow's default (the whole-file fallback)
def test_a_csv_row_over_pyarrows_block_is_read_then_too_long(tmp_path, monkeypatch, block):
    from mmcore import clean

    if block is not None:
        monkeypatch.setattr(clean, "_CSV_BLOCK", block)
    path = tmp_path / "manifest.csv"
    huge = "word " * 2_000_000  # 10 MB in one row: pyarrow's 1 MB default block refused the file
    body = "".join(f"{p},{t}\n" for p, t in GOOD_ROWS)
    path.write_text(f"image_path,text\n{body}a.jpg,{huge}\n" + "d.jpg,a yellow star on a white wall\n" * 3)
    t = time.perf_counter()
    res = _clean_manifest(path)
    assert time.perf_counter() - t < 10
    q = res.quarantined.set_index(tables.ROW_ID)
    assert q.loc[2, tables.REASON] == "caption_too_long"
    assert len(res.kept) == 3  # the two good rows and the first yellow star (the others are duplicates)


def test_an_excel_bom_is_not_part_of_the_first_column_name(tmp_path):
    from mmcore import clean

    path = tmp_path / "manifest.csv"
    path.write_bytes(b"\xef\xbb\xbfimage_path,text\r\n" + b"".join(f"{p},{t}\r\n".encode() for p, t in GOOD_ROWS))
    data = DataConfig(manifest=path)
    assert clean.manifest_columns(data) == ["image_path", "text"]
    clean.check_columns(data)
    assert _clean_manifest(path).kept[tables.IMAGE].tolist() == [p for p, _ in GOOD_ROWS]
    jsonl = tmp_path / "manifest.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + b"\n".join(json.dumps({"image_path": p, "text": t}).encode() for p, t in GOOD_ROWS))
    assert len(_clean_manifest(jsonl).kept) == 2


def test_duplicate_column_names_are_a_one_line_error_naming_them(tmp_path):
    from mmcore import clean

    csv_path = tmp_path / "manifest.csv"
    csv_path.write_text("image_path,text,text,id,id\na.jpg,one,two,1,2\n")
    for fn in (clean.manifest_columns, clean.read_manifest):
        with pytest.raises(InputError, match=r"duplicate column names 'id', 'text' in .*manifest\.csv"):
            fn(DataConfig(manifest=csv_path))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq_path = tmp_path / "manifest.parquet"
    pq.write_table(pa.Table.from_arrays([pa.array(["a.jpg"]), pa.array(["x"]), pa.array(["y"])],
                                        names=["image_path", "text", "text"]), pq_path)
    for fn in (clean.manifest_columns, clean.read_manifest):
        with pytest.raises(InputError, match="duplicate column names 'text'"):
            fn(DataConfig(manifest=pq_path))
    # Through the CLI: exit 2, one line, before Prefect starts.
    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api"}  # never reached
    r = subprocess.run([sys.executable, "-m", "mmpipe", "run", str(REPO / "configs" / "demo.yaml"), "--set",
                        f"data.manifest={csv_path}", "--out", str(tmp_path / "run")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: data.manifest: duplicate column names"), r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


# --------------------------------------------------------------------------- 3 and mathtext: the report


def _metrics_run(run_dir: Path, classes: list[str], confusion: np.ndarray) -> Path:
    """A run folder holding only evaluate's metrics.json with a zero-shot block."""
    from mmcore.layout import RunLayout

    metrics = {"test": {"i2t_r1": {"value": 0.5, "low": 0.4, "high": 0.6},
                        "zeroshot": {"acc1": {"value": 0.3, "low": 0.2, "high": 0.4},
                                     "classes": classes, "confusion": confusion.tolist()}}}
    tables.write_bytes(json.dumps(metrics).encode(), RunLayout(run_dir).metrics)
    return run_dir


_HEATMAP_CHILD = """
import json, resource, sys, numpy as np
from mmcore.report import page
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
html, statuses = page.render(sys.argv[1])
print(json.dumps({"base": base, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "status": statuses["metrics"], "bytes": len(html)}))
"""


def test_a_1000_class_confusion_matrix_costs_little_memory(tmp_path):
    n = 1000
    rng = np.random.default_rng(0)
    conf = rng.integers(0, 3, (n, n)) + np.diag(rng.integers(1, 60, n))
    _metrics_run(tmp_path / "run", [f"class {i}" for i in range(n)], conf)
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", _HEATMAP_CHILD, str(tmp_path / "run")], capture_output=True, text=True,
                       timeout=300, cwd=REPO)
    seconds = time.perf_counter() - t
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    grown = (out["peak"] - out["base"]) * 1024
    print(f"1,000-class confusion: report peak RSS {out['peak'] / 1024:.0f} MiB (+{grown / 2**20:.0f} MiB), {seconds:.1f} s")
    assert out["status"] == "ok"
    assert grown < 600 * 2**20  # drawn whole it took 24 GB; the heatmap draws the top 50 classes
    assert out["bytes"] < 5 * 2**20


def test_heatmap_draws_the_top_classes_and_lists_the_most_confused_pairs(tmp_path):
    from mmcore.report import plots

    n = 120
    conf = np.eye(n, dtype=int) * np.arange(1, n + 1)[:, None]  # support grows with the index
    conf[7, 3] = 5
    top = plots.top_classes(conf)
    assert len(top) == plots.HEATMAP_CLASSES and top[0] == n - 1 and set(top) == set(range(n - 50, n))
    from mmcore.report import page

    html, statuses = page.render(_metrics_run(tmp_path / "run", [f"c{i}" for i in range(n)], conf))
    assert statuses["metrics"] == "ok"
    assert f"50 of {n} classes" in html and "Most confused pairs" in html and "<td>c7</td><td>c3</td>" in html


@pytest.mark.parametrize("name", ["$x$", "costs $5", r"$\frac{$", "a $$ b", r"$\undefinedmacro$"])
def test_dollar_signs_in_class_names_and_captions_are_text_not_mathtext(tmp_path, name):
    from mmcore.report import page, plots

    classes = [name, "dog", "cat"]
    html, statuses = page.render(_metrics_run(tmp_path / "run", classes, np.eye(3, dtype=int) * 4))
    assert statuses["metrics"] == "ok", html[html.find('id="metrics"'):][:600]
    # Every chart helper that shows data text: labels, titles, legends.
    assert plots.barh({name: 3, "ok": 1}, title=name).startswith("data:image/png")
    assert plots.scatter(np.arange(4), np.arange(4), title=name, groups=np.array([name, name, "b", "b"]))
    assert plots.stacked_shares([(name, {"train": {name: 3, "x": 1}})])


def _png(path: Path, size=(40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    _photo(1, size).save(path, "PNG")
    return path


def test_report_thumbnails_decode_only_what_the_runs_probe_policy_allows(tmp_path, monkeypatch):
    from mmcore.layout import RunLayout
    from mmcore.report import page, sections
    from mmcore.report.markup import Thumbs

    root = tmp_path / "data"
    _png(root / "ok.png")
    (root / "photo.jpg").write_bytes(_save(_photo(2), "JPEG"))
    (root / "eps.jpg").write_bytes(eps_bytes())
    (root / "big.png").write_bytes(png16(300))
    bin_dir, marker = _fake_gs(tmp_path)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    # The policy comes from the run's saved config (its probe section), never from mmcore.config.
    run_dir = tmp_path / "run"
    RunLayout(run_dir).config.parent.mkdir(parents=True, exist_ok=True)
    RunLayout(run_dir).config.write_text("probe:\n  formats: [PNG]\n  max_pixels: 20000\n  max_file_bytes: 4000\n")
    policy = page._run_policy(RunLayout(run_dir))
    assert (policy.formats, policy.max_pixels, policy.max_bytes) == (("PNG",), 20000, 4000)
    RunLayout(run_dir).config.write_text("probe: !!python/object:os.system {}\n")  # not yaml.safe: defaults
    assert page._run_policy(RunLayout(run_dir)) == images.DEFAULT_POLICY

    thumbs = Thumbs(root, 96, 50_000_000, policy)
    assert thumbs("ok.png").startswith("<img")
    assert "no preview:<br>unsupported_format" in thumbs("photo.jpg")  # a JPEG, but the run accepts PNG only
    assert "no preview:<br>unsupported_format" in thumbs("eps.jpg")
    assert "no preview:<br>too_many_pixels" in Thumbs(root, 96, 50_000_000, images.DecodePolicy(("PNG",), 20000))("big.png")
    assert "no preview:<br>file_too_large" in Thumbs(root, 96, 50_000_000, images.DecodePolicy(("PNG",), max_bytes=100))("ok.png")
    assert not marker.exists()

    # A row a probe refused is never opened: its reason is the note (the file here would decode).
    opened = []
    monkeypatch.setattr(Thumbs, "_make", lambda self, rel: opened.append(rel) or "<img>")
    thumbs = Thumbs(root, 96, 50_000_000, policy)
    row = {tables.IMAGE: "ok.png", tables.REASON: "corrupt_image", tables.TEXT: "a photo"}
    assert "no preview:<br>corrupt_image" in sections._thumb(thumbs, "probe", row)
    assert "no preview:<br>file_changed" in sections._thumb(thumbs, "quality", {**row, tables.REASON: "file_changed"})
    assert sections._thumb(thumbs, "clean", {**row, tables.REASON: "caption_too_short"}) == "<img>"
    assert opened == ["ok.png"]


def test_spotcheck_section_shows_the_text_a_formula_cell_stands_for(tmp_path):
    from mmcore.layout import RunLayout
    from mmcore.report import page

    run = RunLayout(tmp_path / "run")
    rows = [{"query_id": "t000", "query_kind": "text", "query": spotcheck.spreadsheet_safe("=HYPERLINK(\"x\")"),
             "rank": r, "retrieved": f"img{r}.png", "row_id": r, "verdict": ""} for r in range(1, 6)]
    run.spotcheck_csv.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(run.spotcheck_csv, index=False)
    html, statuses = page.render(run.root)
    assert statuses["spotcheck"] == "ok"
    assert '<div class="qcap">=HYPERLINK(&quot;x&quot;)</div>' in html and "&#x27;=HYPERLINK" not in html


# --------------------------------------------------------------------------- 12. low findings


def test_a_rerun_on_other_data_with_a_shorter_until_retires_the_older_later_stages(tmp_path, synth_small):
    from mmcore import execute, graph, report, runlock
    from mmcore.config import dump_config
    from mmcore.layout import SUPERSEDED_DIR, RunLayout
    from mmcore.stale import extra_digest
    from tests.conftest import demo_config
    from tests.test_report import REAL, make_run

    run_dir, cfg = make_run(tmp_path, synth_small, "evaluate")
    layout = RunLayout(run_dir)
    planned = tuple(s.name for s in graph.plan("split"))
    assert "train" not in planned and "evaluate" not in planned
    # The same run again with a shorter --until: its later stages are still this data's, and stay.
    with runlock.hold(run_dir, cfg.data.image_root, planned) as run_id:
        assert runlock.retire_stale(cfg, planned, run_id) == []
    assert layout.metrics.is_file()

    # Other data (a third of the rows) into the same folder, up to split, as the flow does it.
    other = tmp_path / "other" / "manifest.csv"
    other.parent.mkdir()
    pd.read_csv(synth_small / "manifest.csv", dtype=str, keep_default_na=False).head(100).to_csv(other, index=False)
    cfg2 = demo_config(other, tmp_path / "run", f"data.root={synth_small}")
    assert cfg2.run_dir == cfg.run_dir
    with runlock.hold(run_dir, cfg2.data.image_root, planned) as run_id:
        moved = runlock.retire_stale(cfg2, planned, run_id)
        tables.write_bytes(dump_config(cfg2).encode(), layout.config)
        ctx = execute.context(cfg2, progress=False)
        table, digest = execute.read_source(cfg2, "clean")
        for stage in (r for r in REAL if r in planned):  # up to split, as --until split runs
            s = graph.stage(stage)
            if s.input is not None:
                table, digest = tables.load(run_dir, s.input), tables.read_json(layout.stage(s.input).stats)["kept_digest"]
            execute.run_stage(stage, cfg2, table, digest, extra_digest(stage, cfg2), ctx=ctx)
    assert set(moved) == {s.name for s in graph.plan("evaluate")} - set(planned) - {"report"}  # pseudo, train, evaluate
    for name in moved:  # moved aside, not deleted, and no longer where the report and inspect read
        assert (run_dir / SUPERSEDED_DIR / run_id / name).is_dir() and not layout.stage_dir(name).exists()
    html, statuses = report.render(run_dir, cfg2.report, cfg2.data.image_root, cfg2.run_name)
    assert statuses["training"] == statuses["metrics"] == statuses["spotcheck"] == "not-run"
    assert tables.read_json(layout.stage("clean").stats)["n_rows"] == 100


@pytest.mark.slow
def test_an_error_inside_a_task_is_one_line_without_prefects_traceback(tmp_path):
    """`mmpipe run` whose clean task fails on the manifest: stderr ends with one `error:` line, no traceback."""
    manifest = tmp_path / "manifest.csv"
    # The header check before Prefect passes (row_id is mmpipe's own column); reading the rows in the
    # clean task refuses it.
    manifest.write_text("image_path,text,scene_id,timestamp,label,domain,row_id\n"
                        "a.jpg,a red circle on a table,s1,2024-01-01,circle,flat,7\n")
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / ".prefect")}
    env.pop("PREFECT_API_URL", None)
    r = subprocess.run([sys.executable, "-m", "mmpipe", "run", str(REPO / "configs" / "demo.yaml"), "--set",
                        f"data.manifest={manifest}", "--set", f"data.root={tmp_path}", "--out", str(tmp_path / "run"),
                        "--until", "clean"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr[-3000:]
    assert lines[-1].startswith("error: data.manifest: column 'row_id' is reserved"), r.stderr[-3000:]
    assert sum(ln.startswith("error:") for ln in lines) == 1
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout


# --------------------------------------------------------------------------- 13. tar shards and their Parquet


def _headers(names, fmt: int = tarfile.GNU_FORMAT) -> bytes:
    """The headers of empty members, written directly (``TarFile.addfile`` is slow for thousands)."""
    ti = tarfile.TarInfo()
    ti.mtime = 0
    out = []
    for name in names:
        ti.name = name
        out.append(ti.tobuf(fmt))
    return b"".join(out)


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    """A whole tar of regular members, without its end-of-archive marker (the caller appends more)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime = len(data), 0
            tf.addfile(ti, io.BytesIO(data))
        end = tf.offset  # before close writes the end-of-archive blocks
    return buf.getvalue()[:end]


def _shards(root: Path, **tars: bytes) -> DataConfig:
    (root / "shards").mkdir(parents=True)
    for name, data in tars.items():
        (root / "shards" / f"{name}.tar").write_bytes(data)
    return DataConfig(format="webdataset", root=root, shards="shards/*.tar")


def _traced_peak(fn, *args):
    """``fn(*args)`` (or the exception it raised) and the peak of Python allocations while it ran."""
    tracemalloc.start()
    try:
        try:
            out = fn(*args)
        except Exception as e:  # noqa: BLE001 - returned for the caller to check
            out = e
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_tar_of_too_many_members_is_refused_in_one_line_before_its_index_grows(tmp_path, monkeypatch):
    from mmcore import clean, sources

    monkeypatch.setattr(sources, "MAX_TAR_MEMBERS", 1000)
    # 20,000 empty members in 10 MB: unbounded, their index alone is ~12 MB of Python objects.
    data = _shards(tmp_path, **{"00000": _headers(f"{i:06d}.jpg" for i in range(20_000)) + b"\0" * 1024})
    err, peak = _traced_peak(sources.read_tar_index, tmp_path / "shards" / "00000.tar")
    assert isinstance(err, InputError) and "more than 1000 members" in str(err)
    assert peak < 1 << 20, peak
    with pytest.raises(InputError, match=r"^data.shards: cannot read shards/00000.tar: more than 1000 members "
                                         r"\(a member-count bomb"):
        clean.read_manifest(data)
    # A shard that grew past the limit after ingest: each of its rows is a read_error, the index is never built.
    rows = pd.DataFrame({tables.ROW_ID: [0, 1], tables.IMAGE: ["shards/00000.tar::000001.jpg"] * 2})
    m = probe.measure(rows, probe.ProbeConfig(), sources.TarSource(tmp_path))
    assert m[probe.ERROR].tolist() == ["read_error"] * 2
    assert m[probe.DETAIL].str.contains("more than 1000 members").all()


def test_chained_extended_headers_and_sparse_maps_are_bounded_not_a_traceback(tmp_path):
    from mmcore import clean, ingest, sources

    jpg = _save(_photo(1), "JPEG")
    good = _tar([("a.jpg", jpg), ("a.txt", b"a photo of a red square")])
    # 300 GNU long-name headers in a row: tarfile recurses once per header (a RecursionError), each held
    # whole until the member's own header arrives (400 pax headers of 1 MiB: 900 MB, then the RecursionError).
    longname = tarfile.TarInfo("././@LongLink")
    longname.type, longname.size = tarfile.GNUTYPE_LONGNAME, 512
    chain = (longname.tobuf(tarfile.GNU_FORMAT) + b"x.jpg".ljust(512, b"\0")) * 300
    # A pax GNU sparse 1.0 member whose map promises more numbers than it holds (tarfile: ValueError).
    sparse10 = tarfile.TarInfo("s.jpg")
    sparse10.size = 512
    sparse10.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "s.jpg",
                            "GNU.sparse.realsize": "9999"}
    short_map = sparse10.tobuf(tarfile.PAX_FORMAT) + b"100\n1\n1\n".ljust(512, b"\0")
    # An old GNU sparse member chaining 20,000 extension blocks of 21 regions (tarfile keeps all 420,000).
    old = bytearray(_headers(["t.jpg"]))
    old[156:157], old[482] = tarfile.GNUTYPE_SPARSE, 1
    old[148:156] = b" " * 8
    old[148:156] = b"%06o\0 " % sum(old)
    block = bytearray(b"%011o\0%011o\0" % (1, 1) * 21 + bytes(8))
    block[504] = 1
    many_blocks = bytes(old) + bytes(block) * 19_999 + bytes(block[:504]) + bytes(8)
    # Global pax keywords: tarfile applies each to every later member (50,000 of them: 4 ms a member).
    global_keys = tarfile.TarInfo.create_pax_global_header({f"k{i}": "v" for i in range(1000)})
    after = _tar([("c.jpg", jpg), ("c.txt", b"a photo of a blue circle")])
    git_archive = tarfile.TarInfo.create_pax_global_header({"comment": "0" * 40})  # one global keyword: fine
    end = bytes(1024)
    data = _shards(tmp_path, **{"00000": good + chain + after + end, "00001": good + short_map + after + end,
                                "00002": good + many_blocks + after + end, "00003": good + global_keys + after + end,
                                "00004": global_keys + after + end, "00005": git_archive + after + end})
    for shard, names, why in (("00000", ["a.jpg", "a.txt"], "more than 8 extended headers in a row"),
                              ("00003", ["a.jpg", "a.txt"], "more than 64 global pax keywords"),
                              ("00004", [], "more than 64 global pax keywords"), ("00005", ["c.jpg", "c.txt"], "")):
        index, peak = _traced_peak(sources.read_tar_index, tmp_path / "shards" / f"{shard}.tar")
        assert isinstance(index, sources.TarIndex), index
        assert [m.name for m in index.members] == names, shard
        assert index.damage == (f"damaged after {len(names)} members: {why}" if why else ""), shard
        assert peak < 1 << 20, peak
    for shard in ("00001", "00002"):
        index, peak = _traced_peak(sources.read_tar_index, tmp_path / "shards" / f"{shard}.tar")
        assert isinstance(index, sources.TarIndex), index
        assert [(m.name, m.kind) for m in index.members] == [
            ("a.jpg", "file"), ("a.txt", "file"), ("s.jpg" if shard == "00001" else "t.jpg", "sparse"), ("c.jpg", "file"),
            ("c.txt", "file")], shard
        assert not index.damage and peak < 1 << 20, (shard, peak)
    # The images before the damage are rows; a sparse member is a special_member row, the members after it rows.
    table = clean.read_manifest(data)
    kept = ["00000.tar::a.jpg", "00001.tar::a.jpg", "00001.tar::c.jpg", "00002.tar::a.jpg", "00002.tar::c.jpg",
            "00003.tar::a.jpg", "00005.tar::c.jpg"]
    assert dict(zip(table[tables.IMAGE], table[ingest.REASON])) == {
        **{f"shards/{ref}": "" for ref in kept}, "shards/00001.tar::s.jpg": "special_member",
        "shards/00002.tar::t.jpg": "special_member"}
    with pytest.raises(faults.ReadError, match="is a sparse"):
        sources.TarSource(tmp_path).read("shards/00001.tar::s.jpg")


def test_the_per_shard_parquet_is_read_a_row_group_at_a_time(tmp_path, monkeypatch):
    """img2dataset's Parquet beside a shard: Arrow holds one row group at a time, not the file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mmcore import ingest, sources

    data = _shards(tmp_path, **{"00000": _tar([("000000000.jpg", _save(_photo(1), "JPEG"))]) + bytes(1024)})
    side = tmp_path / "shards" / "00000.parquet"
    n = 8 * 512
    pq.write_table(pa.table({"key": [f"{i:09d}" for i in range(n)], "status": ["success"] * n,
                             "error_message": pa.nulls(n, pa.string()),
                             "blob": [i.to_bytes(4, "big") * 1024 for i in range(n)]}),  # 16 MB: 8 row groups of 2 MB
                   side, row_group_size=512, compression="none", use_dictionary=False)
    code = f"""
import pyarrow as pa
from mmcore import ingest
table = ingest._shard_table({str(tmp_path / "shards" / "00000.tar")!r})
print(len(table[0] if isinstance(table, tuple) else table), pa.default_memory_pool().max_memory())
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    rows, peak = map(int, r.stdout.split())
    assert rows == n and peak < 6 << 20, peak  # the file's 16 MB whole: 16 MB and more
    # A row group larger than a read may hold is refused by its size in the footer, in one line.
    monkeypatch.setattr(sources, "MAX_ROW_GROUP_BYTES", 1 << 20)
    with pytest.raises(InputError, match=r"^data.shards: 00000.parquet beside 00000.tar: row group 0 holds \d+ bytes"):
        ingest.read(data)
    # A file of more rows than a shard may hold members is refused from its footer, before any is read.
    monkeypatch.setattr(sources, "MAX_ROW_GROUP_BYTES", 1 << 30)
    monkeypatch.setattr(sources, "MAX_TAR_MEMBERS", n - 1)
    with pytest.raises(InputError, match=rf"^data.shards: 00000.parquet beside 00000.tar lists {n} rows > {n - 1}"):
        ingest.read(data)
