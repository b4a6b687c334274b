"""Input forms besides a manifest: webdataset / img2dataset shards, Parquet with image bytes, COCO and
Karpathy captions. Small shards built with tarfile and pyarrow from the synthetic images."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmcore import clean, faults, images, ingest, probe, sources, tables
from mmcore.base import DataConfig, StageContext
from mmcore.errors import ConfigError, InputError
from tests.conftest import demo_config

N = 40  # good samples per input form
MAX_MEMBER = 200_000  # data.max_member_bytes in the webdataset tests (the synthetic images are far smaller)


# --------------------------------------------------------------------------- building inputs


@pytest.fixture(scope="module")
def samples(synth_small: Path) -> pd.DataFrame:
    """Rows of the synthetic set with no planted defect: image_path, text, scene_id, label, domain, bytes."""
    m = pd.read_csv(synth_small / "manifest.csv", dtype=str, keep_default_na=False)
    planted = set(pd.read_csv(synth_small / "planted.csv").row_id)
    ok = [i for i, p in enumerate(m.image_path) if i not in planted and (synth_small / p).is_file()
          and not (synth_small / p).is_symlink()]
    df = m.iloc[ok[:N]].reset_index(drop=True)
    df["bytes"] = [(synth_small / p).read_bytes() for p in df.image_path]
    return df


def _add(tf: tarfile.TarFile, name: str, data: bytes = b"", **kw) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime = len(data), 0
    for k, v in kw.items():
        setattr(ti, k, v)
    tf.addfile(ti, io.BytesIO(data) if data else None)


def _write_shard(path: Path, samples: pd.DataFrame, start: int, planted: bool = False) -> list[dict]:
    """A webdataset shard of ``samples`` (keys from ``start``) and img2dataset's per-shard Parquet beside it."""
    recs = []
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for j, r in enumerate(samples.itertuples()):
            key = f"{start + j:09d}"
            _add(tf, f"{key}.{Path(r.image_path).suffix[1:]}", r.bytes)
            _add(tf, f"{key}.txt", r.text.encode())
            _add(tf, f"{key}.json", json.dumps({"key": key, "caption": r.text}).encode())
            recs.append({"key": key, "status": "success", "error_message": None, "url": f"https://example.com/{key}",
                         "width": 64, "height": 64, "sha256": hashlib.sha256(r.bytes).hexdigest(), "caption": r.text,
                         "scene_id": r.scene_id, "label": r.label, "domain": r.domain})
        if planted:
            img = samples.bytes.iloc[0]
            _add(tf, "../evil.jpg", img)
            _add(tf, "/abs.jpg", img)
            _add(tf, "link.jpg", type=tarfile.SYMTYPE, linkname="/etc/passwd")
            _add(tf, "hard.jpg", type=tarfile.LNKTYPE, linkname=f"{start:09d}.jpg")
            _add(tf, "dev.jpg", type=tarfile.CHRTYPE, devmajor=1, devminor=3)
            _add(tf, "orphan.jpg", img)  # no caption
            _add(tf, "lonely.txt", b"a caption without an image")
            _add(tf, "big.jpg", b"\xff\xd8" + b"\0" * (MAX_MEMBER + 10))
            _add(tf, "big.txt", b"a large member")
            for k, err in (("fail1", "HTTP Error 404"), ("fail2", "timeout")):
                recs.append({"key": k, "status": "failed_to_download", "error_message": err,
                             "url": f"https://example.com/{k}", "width": None, "height": None, "sha256": None,
                             "caption": "a cat on a mat", "scene_id": "x", "label": "x", "domain": "x"})
    pq.write_table(pa.Table.from_pylist(recs), path.with_suffix(".parquet"))
    return recs


PLANTED = {
    "shards/00001.tar::../evil.jpg": "unsafe_member_name",
    "shards/00001.tar::/abs.jpg": "unsafe_member_name",
    "shards/00001.tar::link.jpg": "special_member",
    "shards/00001.tar::hard.jpg": "special_member",
    "shards/00001.tar::dev.jpg": "special_member",
    "shards/00001.tar::orphan.jpg": "missing_caption",
    "shards/00001.tar::big.jpg": "member_too_large",
}


@pytest.fixture(scope="module")
def wds_root(samples, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wds")
    (root / "shards").mkdir()
    half = len(samples) // 2
    _write_shard(root / "shards" / "00000.tar", samples.iloc[:half], 0)
    _write_shard(root / "shards" / "00001.tar", samples.iloc[half:], 10_000, planted=True)
    return root


def _wds_data(root: Path, **kw) -> DataConfig:
    return DataConfig(format="webdataset", root=root, shards="shards/{00000..00001}.tar", max_member_bytes=MAX_MEMBER,
                      group_column="scene_id", **kw)


@pytest.fixture(scope="module")
def pq_root(samples, tmp_path_factory) -> Path:
    """Two Parquet files: a binary image column, and Hugging Face's {bytes, path} struct; small row groups."""
    root = tmp_path_factory.mktemp("pq")
    half = len(samples) // 2
    for i, (part, struct) in enumerate(((samples.iloc[:half], False), (samples.iloc[half:], True))):
        img = (pa.array([{"bytes": b, "path": p} for b, p in zip(part.bytes, part.image_path)]) if struct
               else pa.array(list(part.bytes), pa.binary()))
        t = pa.table({"image": img, "caption": list(part.text), "scene_id": list(part.scene_id),
                      "label": list(part.label), "domain": list(part.domain)})
        pq.write_table(t, root / f"train-{i:05d}.parquet", row_group_size=6)
    return root


def _pq_data(root: Path) -> DataConfig:
    return DataConfig(format="parquet", root=root, shards="train-*.parquet", text_column="caption", group_column="scene_id")


# --------------------------------------------------------------------------- sources and ingest


def _probe(refs: list[str], source) -> pd.DataFrame:
    return probe.measure(pd.DataFrame({"row_id": range(len(refs)), "image_path": refs}), probe.ProbeConfig(), source)


def test_content_digest_is_the_same_from_a_file_a_tar_member_and_a_parquet_cell(samples, synth_small, wds_root, pq_root):
    n = len(samples) // 2
    files = _probe(list(samples.image_path[:n]), sources.FileSource(synth_small))
    keys = [f"shards/00000.tar::{j:09d}{Path(p).suffix}" for j, p in enumerate(samples.image_path[:n])]
    tar = _probe(keys, sources.TarSource(wds_root))
    cells = _probe([f"train-00000.parquet::{i}" for i in range(n)], sources.ParquetSource(pq_root, "image"))
    struct = _probe([f"train-00001.parquet::{i}" for i in range(n)], sources.ParquetSource(pq_root, "image"))
    want = [f"sha256:{hashlib.sha256(b).hexdigest()}" for b in samples.bytes]
    assert files.content_digest.tolist() == want[:n] == tar.content_digest.tolist() == cells.content_digest.tolist()
    assert struct.content_digest.tolist() == want[n:]
    for m in (tar, cells, struct):
        assert set(m[probe.ERROR]) == {""}
        assert m.file_size.tolist() == [len(b) for b in (samples.bytes[:n] if m is not struct else samples.bytes[n:])]
    assert (tar[["width", "height", "format"]].to_numpy() == files[["width", "height", "format"]].to_numpy()).all()


def test_a_tar_member_is_read_by_offset_and_refused_when_unsafe(wds_root, samples):
    src = sources.TarSource(wds_root, max_member_bytes=MAX_MEMBER)
    assert src.read("shards/00000.tar::000000000.txt") == samples.text[0].encode()
    f, size = src.open("shards/00000.tar::000000000.json")
    with f:
        assert json.loads(f.read())["key"] == "000000000" and size == f.seek(0, io.SEEK_END)
    with pytest.raises(images.UnsafePath):
        src.read("../outside.tar::a.jpg")
    with pytest.raises(images.UnsafePath):
        src.read("shards/00001.tar::../evil.jpg")
    for ref, reason in (("shards/00001.tar::link.jpg", "read_error"), ("shards/00001.tar::big.jpg", "file_too_large"),
                        ("shards/00001.tar::nope.jpg", "missing_file"), ("shards/nope.tar::a.jpg", "missing_file")):
        with pytest.raises(faults.ReadError) as e:
            src.read(ref)
        assert e.value.reason == reason, ref
    # The probe's reasons for the same references.
    m = _probe(["../outside.tar::a.jpg", "shards/00001.tar::dev.jpg", "no-separator.jpg"], src)
    assert m[probe.ERROR].tolist() == ["outside_root", "read_error", "outside_root"]
    # A source is a small picklable value: its per-process caches never travel.
    import pickle

    assert pickle.loads(pickle.dumps(src)).__dict__ == {"root": src.root, "max_member_bytes": MAX_MEMBER,
                                                        "_resolver": None}


def test_webdataset_ingest_pairs_members_and_gives_every_planted_member_its_reason(samples, wds_root):
    data = _wds_data(wds_root)
    table = clean.read_manifest(data)
    assert table[tables.ROW_ID].tolist() == list(range(len(table)))
    assert clean.read_manifest(data).equals(table)  # deterministic
    ctx = StageContext(data, wds_root / "never-written", workers=1)
    res = clean.run(table, clean.CleanConfig(), ctx)
    got = dict(zip(res.quarantined[tables.IMAGE], res.quarantined[tables.REASON]))
    for ref, reason in PLANTED.items():
        assert got.get(ref) == reason, ref
    q = res.quarantined.set_index(tables.REASON)
    failed = res.quarantined[res.quarantined[tables.REASON] == "download_failed"]
    assert sorted(failed["key"]) == ["fail1", "fail2"] and sorted(failed[tables.DETAIL]) == ["HTTP Error 404", "timeout"]
    assert failed["url"].tolist() == ["https://example.com/fail1", "https://example.com/fail2"]
    assert q.loc["missing_image", tables.TEXT] == "a caption without an image"
    assert len(res.kept) == len(samples) and len(res.kept) + len(res.quarantined) == len(table)
    assert res.kept.group.notna().all() and (res.kept["caption"] == res.kept[tables.TEXT_RAW]).all()
    assert not (wds_root / "never-written").exists()


def test_webdataset_caption_from_a_json_field_and_trusted_sha256(wds_root):
    data = _wds_data(wds_root, caption_field="caption", trust_sha256=True)
    table = clean.read_manifest(data)
    assert table.loc[table[tables.IMAGE] == "shards/00000.tar::000000000.jpg", tables.TEXT].iloc[0] != ""
    rows = table[table[ingest.REASON] == ""].head(3).copy()
    rows["sha256"] = ["ab" * 32, "cd" * 32, "not a digest"]  # trusted as given; an invalid one is hashed
    m = probe.measure(rows, probe.ProbeConfig(), sources.of(data), trust_sha256=True)
    assert m.content_digest.tolist()[:2] == ["sha256:" + "ab" * 32, "sha256:" + "cd" * 32]
    data_bytes = sources.of(data).read(rows[tables.IMAGE].iloc[2])
    assert m.content_digest.iloc[2] == "sha256:" + hashlib.sha256(data_bytes).hexdigest()


def test_a_truncated_shard_keeps_the_whole_members_and_a_broken_one_is_one_line(samples, tmp_path):
    root = tmp_path / "t"
    (root / "shards").mkdir(parents=True)
    _write_shard(root / "shards" / "00000.tar", samples.iloc[:6], 0)
    whole = (root / "shards" / "00000.tar").read_bytes()
    index = sources.read_tar_index(root / "shards" / "00000.tar")
    cut_at = index.members[7].offset + 10  # inside the third sample's image
    (root / "shards" / "00000.tar").write_bytes(whole[:cut_at])
    data = DataConfig(format="webdataset", root=root, shards="shards/*.tar")
    table = clean.read_manifest(data)
    reasons = dict(zip(table["key"], table[ingest.REASON]))
    assert [reasons[f"{j:09d}"] for j in range(6)] == ["", "", "truncated_shard", "truncated_shard", "truncated_shard",
                                                       "truncated_shard"]
    for bad, what in ((b"", "not an uncompressed tar"), (b"garbage" * 200, "not an uncompressed tar")):
        (root / "shards" / "00000.tar").write_bytes(bad)
        with pytest.raises(InputError, match=f"data.shards: cannot read shards/00000.tar: {what}"):
            clean.read_manifest(data)
    import gzip

    (root / "shards" / "00000.tar").write_bytes(gzip.compress(whole))
    with pytest.raises(InputError, match="not an uncompressed tar"):
        clean.read_manifest(data)
    outside = tmp_path / "outside.tar"
    outside.write_bytes(whole)
    (root / "shards" / "00000.tar").unlink()
    (root / "shards" / "00000.tar").symlink_to(outside)
    with pytest.raises(InputError, match="resolves outside data.root"):
        clean.read_manifest(data)
    with pytest.raises(InputError, match="no file matches"):
        clean.read_manifest(DataConfig(format="webdataset", root=root, shards="nothing-*.tar"))


def test_a_repeated_member_or_key_is_a_duplicate_member_row_and_the_last_copy_is_the_sample(samples, tmp_path):
    """Tar keeps a repeated name's last copy (webdataset refuses the shard): the earlier copies, a second
    member of the same key and extension, and a key the per-shard Parquet lists twice are rows, never lost."""
    img = list(samples.bytes[:5])
    (tmp_path / "shards").mkdir()
    with tarfile.open(tmp_path / "shards" / "00000.tar", "w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in (("a.jpg", img[0]), ("a.txt", b"an old caption of a"), ("b.jpg", img[1]),
                           ("b.txt", b"the caption of b"), ("a.jpg", img[2]), ("a.txt", b"the new caption of a"),
                           ("c.JPG", img[3]), ("c.jpg", img[4]), ("c.txt", b"the caption of c"),
                           ("d.txt", b"a caption without an image"), ("d.txt", b"it again"), ("a.cls", b"1"),
                           ("a.cls", b"2")):
            _add(tf, name, data)
    recs = [{"key": k, "status": st, "error_message": None if st == "success" else "timeout", "url": f"https://x/{k}{i}"}
            for i, (k, st) in enumerate((("a", "success"), ("b", "success"), ("f", "failed_to_download"),
                                         ("b", "success"), ("c", "success"), ("f", "failed_to_download")))]
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "shards" / "00000.parquet")
    data = DataConfig(format="webdataset", root=tmp_path, shards="shards/*.tar")
    table = clean.read_manifest(data)
    got = sorted(zip(table[tables.IMAGE], table[ingest.REASON], table["url"].fillna("-")))
    assert got == sorted([  # the repeated a.cls is not read, so not a row (as a single one)
        ("shards/00000.tar::a.jpg", "duplicate_member", "https://x/a0"),
        ("shards/00000.tar::a.txt", "duplicate_member", "https://x/a0"),
        ("shards/00000.tar::c.JPG", "duplicate_member", "https://x/c4"),
        ("shards/00000.tar::d.txt", "duplicate_member", "-"),
        ("", "duplicate_member", "https://x/b1"),
        ("", "duplicate_member", "https://x/f2"),
        ("shards/00000.tar::a.jpg", "", "https://x/a0"),
        ("shards/00000.tar::b.jpg", "", "https://x/b3"),
        ("shards/00000.tar::c.jpg", "", "https://x/c4"),
        ("", "missing_image", "-"),
        ("", "download_failed", "https://x/f5")])
    # Every image member is a row: the two copies of a.jpg too.
    assert table[tables.IMAGE].str.lower().str.endswith(".jpg").sum() == 5
    kept = table[table[ingest.REASON] == ""].set_index("key")
    assert kept.loc["a", tables.TEXT] == "the new caption of a" and kept.loc["c", tables.TEXT] == "the caption of c"
    assert sources.TarSource(tmp_path).read(kept.loc["a", tables.IMAGE]) == img[2]  # as tar extracts: the last copy
    dup = table[table[ingest.REASON] == "duplicate_member"].set_index(tables.IMAGE)[ingest.DETAIL]
    assert "repeated later in the shard" in dup["shards/00000.tar::a.jpg"]
    assert "'c.jpg'" in dup["shards/00000.tar::c.JPG"] and "which a later row lists again" in dup[""].iloc[0]
    res = clean.run(table, clean.CleanConfig(), StageContext(data, tmp_path / "run", workers=1))
    assert len(res.kept) + len(res.quarantined) == len(table) == 11
    assert sorted(res.kept["key"]) == ["a", "b", "c"]
    assert (res.quarantined[tables.REASON] == "duplicate_member").sum() == 6


def test_per_shard_parquet_list_and_struct_columns_are_joined_and_digested(samples, tmp_path):
    """img2dataset's --save_additional_columns may carry lists and structs: joined as they are, hashed as JSON."""
    (tmp_path / "shards").mkdir()
    recs = _write_shard(tmp_path / "shards" / "00000.tar", samples.iloc[:3], 0)
    side = pa.Table.from_pylist(recs).append_column("tags", pa.array([["a", "b"], None, []]))
    pq.write_table(side.append_column("meta", pa.array([{"w": 1}, {"w": 2}, None])), tmp_path / "shards" / "00000.parquet")
    data = DataConfig(format="webdataset", root=tmp_path, shards="shards/*.tar")
    table = clean.read_manifest(data)
    assert table["tags"].tolist()[:2] == [["a", "b"], None] and table["meta"].iloc[1] == {"w": 2}
    digest = ingest.input_digest(data, table)
    assert digest == ingest.input_digest(data) and digest != ingest.input_digest(data, table.assign(tags=None))


def test_parquet_ingest_reads_no_image_bytes_and_the_source_one_row_group_at_a_time(pq_root, samples):
    data = _pq_data(pq_root)
    table = clean.read_manifest(data)
    assert tables.TEXT in table and "image" not in table and len(table) == len(samples)
    assert table[tables.IMAGE].iloc[-1] == f"train-00001.parquet::{len(samples) - len(samples) // 2 - 1}"
    assert clean.manifest_columns(data)[:2] == [tables.IMAGE, tables.TEXT]
    src = sources.of(data)
    src.read("train-00000.parquet::0")
    group = sources._LOCAL.row_group
    assert src.read("train-00000.parquet::5") == samples.bytes[5] and sources._LOCAL.row_group is group  # same row group
    assert src.read("train-00000.parquet::6") == samples.bytes[6] and sources._LOCAL.row_group is not group
    with pytest.raises(faults.ReadError, match="no row 999"):
        src.read("train-00000.parquet::999")
    with pytest.raises(InputError, match="data.text_column: column 'text' not in"):
        clean.read_manifest(DataConfig(format="parquet", root=pq_root, shards="train-*.parquet"))


def test_parquet_text_with_invalid_utf8_is_a_row_reason_not_an_error(samples, tmp_path):
    bad = pa.array([b"a red circle on a gray background", b"a blue \xff\xfe square"], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"image": pa.array(list(samples.bytes[:2]), pa.binary()), "caption": bad}),
                   tmp_path / "x.parquet")
    data = DataConfig(format="parquet", root=tmp_path, shards="x.parquet", text_column="caption")
    res = clean.run(clean.read_manifest(data), clean.CleanConfig(), StageContext(data, tmp_path / "run", workers=1))
    assert res.quarantined[tables.REASON].tolist() == ["invalid_encoding"] and len(res.kept) == 1


@pytest.mark.parametrize("overrides, match", [
    ({"format": "webdataset", "shards": "*.tar"}, "needs data.root"),
    ({"format": "webdataset", "root": "."}, "needs data.shards"),
    ({"format": "webdataset", "root": ".", "shards": "*.tar", "manifest": "m.csv"}, "not data.manifest"),
    ({"format": "manifest", "manifest": "m.csv", "shards": "*.tar"}, "data.shards is for"),
    ({"format": "coco"}, "needs data.manifest"),
    ({"format": "parquet", "root": ".", "shards": "*.parquet", "trust_sha256": True}, "trust_sha256 is for"),
    ({"format": "karpathy", "manifest": "k.json", "group_column": "x"}, "groups by image id"),
    ({"format": "tfrecord", "manifest": "m.csv"}, "data.format"),
])
def test_a_wrong_data_section_is_one_line(overrides, match):
    from mmcore.config import build_config

    with pytest.raises(ConfigError, match=match) as e:
        build_config({"data": overrides})
    assert "\n" not in str(e.value)


def _coco(samples: pd.DataFrame, path: Path) -> Path:
    imgs = [{"id": 100 + i, "file_name": p} for i, p in enumerate(samples.image_path)]
    anns = [{"id": 1000 + 2 * i + k, "image_id": 100 + i, "caption": t if k == 0 else f"a picture: {t}"}
            for i, t in enumerate(samples.text) for k in range(2)]
    path.write_text(json.dumps({"images": imgs, "annotations": anns}))
    return path


def _karpathy(samples: pd.DataFrame, path: Path) -> Path:
    # Flickr30k's layout: no filepath; the root is the image folder. Several captions per image.
    splits = ["train", "restval", "val", "test"]
    doc = {"dataset": "flickr30k", "images": [
        {"imgid": i, "filename": Path(p).name, "split": splits[i % 4],
         "sentences": [{"raw": t, "sentid": 2 * i}, {"raw": f"a picture: {t}", "sentid": 2 * i + 1}]}
        for i, (p, t) in enumerate(zip(samples.image_path, samples.text))]}
    path.write_text(json.dumps(doc))
    return path


def test_coco_and_karpathy_give_one_row_per_caption_grouped_by_image(samples, synth_small, tmp_path):
    coco = clean.read_manifest(DataConfig(format="coco", manifest=_coco(samples, tmp_path / "c.json"), root=synth_small))
    assert len(coco) == 2 * len(samples) and coco[tables.GROUP].nunique() == len(samples)
    assert coco[tables.IMAGE].iloc[0] == samples.image_path[0]
    k = clean.read_manifest(DataConfig(format="karpathy", manifest=_karpathy(samples, tmp_path / "k.json"),
                                       root=synth_small / "images"))
    assert set(k[tables.GIVEN_SPLIT]) == {"train", "val", "test"} and len(k) == 2 * len(samples)
    assert (k.groupby(tables.GROUP)[tables.GIVEN_SPLIT].nunique() == 1).all()
    (tmp_path / "bad.json").write_text('{"images": [{"filename": "a.jpg", "split": "dev", "sentences": []}]}')
    with pytest.raises(InputError, match="split 'dev'"):
        clean.read_manifest(DataConfig(format="karpathy", manifest=tmp_path / "bad.json"))
    (tmp_path / "bad.json").write_text("[1, 2")
    with pytest.raises(InputError, match="cannot parse"):
        clean.read_manifest(DataConfig(format="coco", manifest=tmp_path / "bad.json"))


def test_the_input_digest_is_content_not_place(wds_root, tmp_path):
    import shutil

    shutil.copytree(wds_root, tmp_path / "copy")
    a, b = _wds_data(wds_root), _wds_data(tmp_path / "copy")
    assert ingest.input_digest(a) == ingest.input_digest(b)
    assert str(wds_root) not in json.dumps(clean.read_manifest(a).astype(str).to_dict())
    assert sources.of(a).fingerprint(["shards/00000.tar::x.jpg"]) != sources.of(b).fingerprint(["shards/00001.tar::x.jpg"])


# --------------------------------------------------------------------------- whole runs


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _pipeline_run(data_overrides: list[str], run_dir: Path, *extra: str):
    from flows.pipeline import pipeline

    nulls = [f"data.{k}=null" for k in ("manifest", "time_column", "label_column", "domain_column", "group_column")]
    # The micro model: these runs check the input forms end to end, test_train checks training.
    cfg = demo_config(Path("unused.csv"), run_dir, *nulls, *data_overrides, "workers=1", "train.preset=micro",
                      "train.vocab_size=400", *extra)
    pipeline(cfg)
    return cfg


def _check_run(run_dir: Path, n_input: int) -> dict[str, dict]:
    stats = {}
    for s in ("clean", "probe", "quality", "split", "train", "evaluate", "report"):
        st = tables.read_json(tables.StagePaths.of(run_dir, s).stats)
        assert st["n_kept"] + st["n_quarantined"] == st["n_rows"], s
        stats[s] = st
    assert stats["clean"]["n_rows"] == n_input
    assert (run_dir / "report" / "report.html").is_file()
    return stats


@pytest.fixture(scope="module")
def wds_run(prefect_harness, wds_root, tmp_path_factory):
    before = _files(wds_root)
    run_dir = tmp_path_factory.mktemp("wds-run") / "run"
    cfg = _pipeline_run(["data.format=webdataset", f"data.root={wds_root}", "data.shards=shards/{00000..00001}.tar",
                         f"data.max_member_bytes={MAX_MEMBER}", "data.group_column=scene_id",
                         "data.label_column=label"], run_dir)
    return cfg, before


@pytest.mark.slow
def test_webdataset_runs_to_the_report_reading_the_shards_in_place(wds_run, wds_root, samples):
    cfg, before = wds_run
    stats = _check_run(cfg.run_dir, len(clean.read_manifest(cfg.data)))
    assert _files(wds_root) == before  # nothing extracted, nothing written under the root
    for reason in set(PLANTED.values()) | {"download_failed", "missing_image"}:
        assert stats["clean"]["reasons"].get(reason), reason
    probe_kept = tables.read_parquet(tables.StagePaths.of(cfg.run_dir, "probe").kept)
    assert (probe_kept["content_digest"] == "sha256:" + probe_kept["sha256"]).all()  # the bytes img2dataset saw
    assert "<img" in (cfg.run_dir / "report" / "report.html").read_text()  # thumbnails from tar members
    # Cached and fresh like a manifest run: the same shards give the same keys, and nothing is stale.
    from flows.pipeline import pipeline
    from mmcore import stale

    first = tables.StagePaths.of(cfg.run_dir, "clean").kept.read_bytes()
    pipeline(cfg, until="clean")
    assert tables.read_json(tables.StagePaths.of(cfg.run_dir, "clean").status)["cached"]
    assert tables.StagePaths.of(cfg.run_dir, "clean").kept.read_bytes() == first
    assert {r["status"] for r in stale.stale(cfg.run_dir, cfg) if r["stage"] != "report"} <= {"fresh", "not run"}


@pytest.mark.slow
def test_parquet_with_bytes_runs_to_the_report(prefect_harness, pq_root, samples, tmp_path):
    cfg = _pipeline_run(["data.format=parquet", f"data.root={pq_root}", "data.shards=train-*.parquet", "data.image_column=image",
                         "data.text_column=caption", "data.group_column=scene_id"], tmp_path / "run")
    stats = _check_run(cfg.run_dir, len(samples))
    assert stats["probe"]["n_quarantined"] == 0


@pytest.mark.slow
def test_coco_captions_run_to_the_report_with_an_image_s_captions_in_one_split(prefect_harness, samples, synth_small,
                                                                               tmp_path):
    cfg = _pipeline_run(["data.format=coco", f"data.manifest={_coco(samples, tmp_path / 'captions_x.json')}",
                         f"data.root={synth_small}"], tmp_path / "run")
    _check_run(cfg.run_dir, 2 * len(samples))
    split = tables.read_parquet(tables.StagePaths.of(cfg.run_dir, "split").kept)
    assert (split.groupby(tables.GROUP)["split"].nunique() == 1).all()


@pytest.mark.slow
def test_karpathy_runs_to_the_report_with_its_own_split(prefect_harness, samples, synth_small, tmp_path):
    cfg = _pipeline_run(["data.format=karpathy", f"data.manifest={_karpathy(samples, tmp_path / 'dataset_flickr30k.json')}",
                         f"data.root={synth_small / 'images'}", "split.mode=given"], tmp_path / "run")
    _check_run(cfg.run_dir, 2 * len(samples))
    split = tables.read_parquet(tables.StagePaths.of(cfg.run_dir, "split").kept)
    assert (split["split"] == split[tables.GIVEN_SPLIT]).all() and set(split["split"]) == {"train", "val", "test"}
    assert np.isin(split[tables.GIVEN_SPLIT], ["train", "val", "test"]).all()
