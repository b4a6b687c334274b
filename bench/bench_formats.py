"""Benchmark the input forms: probe + quality reading tar shards vs loose files, and memory reading
Parquet with image bytes larger than the memory it may use.

Run: ``.venv/bin/python bench/bench_formats.py [--n 2000] [--parquet-mb 400] [--out bench/out/formats]``

1. Speed, in one run on the same 640x480 JPEGs (``synth.render``): ``probe.measure`` (sha256 digest
   and end-marker check) and ``quality.measure`` (all scores) in one process, reading the loose
   files (``FileSource``) and the same bytes as members of uncompressed webdataset shards read in
   place (``TarSource``: one ``pread`` at the member's offset; nothing extracted). Loops interleaved,
   best of ``ROUNDS``; rates are images per second on one core. Goal: shards >= 0.9x loose files.
2. Memory: a Parquet file with a binary image column, larger than the limit set on the process,
   read end to end in a subprocess (ingest reads the non-image columns batch by batch; probe and
   quality read each row's bytes through ``ParquetSource``, one row group at a time). The subprocess
   runs under ``RLIMIT_AS`` (address space) of its start-up size plus a stated budget smaller than
   the file, and reports its peak RSS (``ru_maxrss``).

Prints a markdown report and writes it to ``bench/results/formats.md``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmcore import probe, quality, sources, synth  # noqa: E402

ROUNDS = 5
SHARD_SIZE = 500  # samples per tar shard (img2dataset's default is 10,000; smaller here so several shards are read)
ROW_GROUP = 64  # rows per Parquet row group (~ 4 MB of 640x480 JPEGs)


def make_images(out: Path, n: int) -> list[str]:
    """n 640x480 JPEG renders of random scenes (q=90), made once and reused."""
    d = out / "loose" / "images"
    d.mkdir(parents=True, exist_ok=True)
    names = [f"images/{i:05d}.jpg" for i in range(n)]
    if all((out / "loose" / p).is_file() for p in names):
        return names
    rng = np.random.default_rng(0)
    for p in names:
        synth.render(synth._random_scene(rng), 640, 480, rng).save(out / "loose" / p, "JPEG", quality=90)
    return names


def make_shards(out: Path, names: list[str]) -> list[str]:
    """The same images as ``key.jpg`` + ``key.txt`` members of uncompressed tar shards; their references."""
    d = out / "tar" / "shards"
    d.mkdir(parents=True, exist_ok=True)
    refs = []
    for s in range(0, len(names), SHARD_SIZE):
        shard = f"shards/{s // SHARD_SIZE:05d}.tar"
        with tarfile.open(out / "tar" / shard, "w") as tf:
            for i, name in enumerate(names[s : s + SHARD_SIZE], start=s):
                data = (out / "loose" / name).read_bytes()
                for member, payload in ((f"{i:09d}.jpg", data), (f"{i:09d}.txt", b"a caption")):
                    ti = tarfile.TarInfo(member)
                    ti.size, ti.mtime = len(payload), 0
                    tf.addfile(ti, io.BytesIO(payload))
                refs.append(f"{shard}{sources.SEP}{i:09d}.jpg")
    return refs


def speed(out: Path, n: int) -> tuple[list[dict], dict]:
    names = make_images(out, n)
    refs = make_shards(out, names)
    files, tars = sources.FileSource(out / "loose"), sources.TarSource(out / "tar")
    table = {"files": pd.DataFrame({"row_id": range(n), "image_path": names}),
             "tar": pd.DataFrame({"row_id": range(n), "image_path": refs})}
    src = {"files": files, "tar": tars}
    pcfg, qcfg = probe.ProbeConfig(), quality.QualityConfig()
    probed = {k: probe.measure(t, pcfg, src[k]) for k, t in table.items()}  # warm: page cache, shard indexes
    assert (probed["files"]["content_digest"] == probed["tar"]["content_digest"]).all()
    qin = {k: t.assign(**{c: probed[k][c] for c in ("orientation", "format", "width", "height", "file_size")})
           for k, t in table.items()}
    best: dict[str, float] = {}
    for _ in range(ROUNDS):
        for k in ("files", "tar"):  # interleaved: a busy moment slows both
            t0 = time.perf_counter()
            probe.measure(table[k], pcfg, src[k])
            best[f"probe {k}"] = min(best.get(f"probe {k}", 1e9), time.perf_counter() - t0)
            t0 = time.perf_counter()
            m = quality.measure(qin[k], qcfg, src[k])
            best[f"quality {k}"] = min(best.get(f"quality {k}", 1e9), time.perf_counter() - t0)
            assert (m[quality.ERROR] == "").all()
    rows = []
    for step, what in (("probe", "probe.measure (sha256 + end marker)"), ("quality", "quality.measure (all scores)")):
        for k, label in (("files", "loose files"), ("tar", "tar shards, in place")):
            s = best[f"{step} {k}"]
            rows.append({"step": f"{what}, {label}", "images/s/core": n / s, "seconds": s})
    both = {k: best[f"probe {k}"] + best[f"quality {k}"] for k in ("files", "tar")}
    rows.append({"step": "probe + quality, loose files", "images/s/core": n / both["files"], "seconds": both["files"]})
    rows.append({"step": "probe + quality, tar shards", "images/s/core": n / both["tar"], "seconds": both["tar"]})
    ratios = {"probe: tar / files": best["probe files"] / best["probe tar"],
              "quality: tar / files": best["quality files"] / best["quality tar"],
              "probe + quality: tar / files": both["files"] / both["tar"]}
    return rows, ratios


# --------------------------------------------------------------------------- memory

_CHILD = r"""
import json, os, resource, sys, time
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from mmcore import clean, probe, quality, sources
from mmcore.base import DataConfig
budget = int(sys.argv[3])
def rss(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
def statm(i):
    with open("/proc/self/statm") as f: return int(f.read().split()[i]) * os.sysconf("SC_PAGE_SIZE")
def vm(): return statm(0)
def now_rss(): return statm(1)
# Everything imported and warmed on a tiny input first, then the address space is capped.
data = DataConfig(format="parquet", root=sys.argv[2], shards="*.parquet", text_column="caption")
src = sources.of(data)
probe.measure(clean.read_manifest(data).head(2), probe.ProbeConfig(), src)
base_rss, base_vm, base_now = rss(), vm(), now_rss()
top = base_now
resource.setrlimit(resource.RLIMIT_AS, (base_vm + budget, base_vm + budget))
t0 = time.perf_counter()
table = clean.read_manifest(data)
n_ok, n = 0, len(table)
for lo in range(0, n, 256):  # as the stage's batches
    rows = table.iloc[lo:lo + 256]
    m = probe.measure(rows, probe.ProbeConfig(), src)
    q = quality.measure(rows.assign(**{c: m[c].to_numpy() for c in ("orientation", "format", "width", "height", "file_size")}),
                        quality.QualityConfig(), src)
    n_ok += int(((m[probe.ERROR] == "") & (q[quality.ERROR] == "")).sum())
    top = max(top, now_rss())
seconds, peak = time.perf_counter() - t0, rss()
# The control: the whole file at once (pyarrow.parquet.read_table) under the same cap.
import pyarrow.parquet as pq
try:
    whole = pq.read_table(Path(sys.argv[2]) / "train-00000.parquet").nbytes
    control = f"read ({whole >> 20} MB)"
except MemoryError as e:
    control = f"fails: {type(e).__name__}"
print(json.dumps({"rows": n, "ok": n_ok, "base_rss": base_rss, "peak_rss": peak, "base_vm": base_vm,
                  "base_now": base_now, "top_now": top,
                  "budget": budget, "seconds": seconds, "control": control}))
"""


def memory(out: Path, names: list[str], target_mb: int, budget_mb: int) -> dict:
    """Write a Parquet-with-bytes file of about ``target_mb`` MB and read it all under a ``budget_mb`` cap."""
    d = out / "parquet"
    d.mkdir(parents=True, exist_ok=True)
    path = d / "train-00000.parquet"
    blobs = [(out / "loose" / p).read_bytes() for p in names]
    per = sum(len(b) for b in blobs) / len(blobs)
    rows = int(target_mb * 2**20 / per)
    if not path.is_file() or pq.ParquetFile(path).metadata.num_rows != rows:
        with pq.ParquetWriter(path, pa.schema([("image", pa.binary()), ("caption", pa.string())]),
                              compression="none") as w:
            for lo in range(0, rows, ROW_GROUP):
                idx = range(lo, min(rows, lo + ROW_GROUP))
                w.write_table(pa.table({"image": pa.array([blobs[i % len(blobs)] for i in idx], pa.binary()),
                                        "caption": [f"caption {i}" for i in idx]}), row_group_size=ROW_GROUP)
    root = str(Path(__file__).resolve().parents[1])
    # Few malloc arenas and threads: each reserves address space (64 MB an arena) that RLIMIT_AS counts.
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "ARROW_DEFAULT_MEMORY_POOL": "system"}
    res = subprocess.run([sys.executable, "-c", _CHILD, root, str(d), str(budget_mb << 20)], capture_output=True,
                         text=True, check=False, env=env)
    if res.returncode != 0:
        raise SystemExit(f"memory child failed: {res.stderr.strip().splitlines()[-1] if res.stderr else res.returncode}")
    r = json.loads(res.stdout.strip().splitlines()[-1])
    r.update(file_bytes=path.stat().st_size, row_group_bytes=int(per * ROW_GROUP), row_groups=-(-rows // ROW_GROUP))
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--parquet-mb", type=int, default=400, help="size of the Parquet file read under the cap")
    ap.add_argument("--budget-mb", type=int, default=150, help="address space the reader may add (RLIMIT_AS)")
    ap.add_argument("--out", type=Path, default=Path("bench/out/formats"))
    ap.add_argument("--results", type=Path, default=Path("bench/results/formats.md"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    load = os.getloadavg()[0]
    table, ratios = speed(args.out, args.n)
    names = make_images(args.out, args.n)
    mem = memory(args.out, names, args.parquet_mb, args.budget_mb)
    mb = 2**20
    lines = [
        "# Input forms benchmark",
        "",
        f"Device: {os.cpu_count()}-core CPU, no GPU ({platform.processor() or platform.machine()}); Python "
        f"{platform.python_version()}, pyarrow {pa.__version__}, Pillow {Image.__version__}, numpy {np.__version__}. "
        f"Load average at start: {load:.1f} (a shared machine).",
        f"Images: {args.n} JPEGs 640x480 q=90 from `synth.render`; shards of {SHARD_SIZE} samples (`key.jpg` + `key.txt`, "
        f"uncompressed tar). Loops in one process, interleaved, best of {ROUNDS}. Command: "
        f"`.venv/bin/python bench/bench_formats.py --n {args.n} --parquet-mb {args.parquet_mb} --budget-mb "
        f"{args.budget_mb}`; total {time.perf_counter() - t0:.0f} s.",
        "",
        "| step | images/s/core | seconds |",
        "|---|---:|---:|",
        *[f"| {x['step']} | {x['images/s/core']:.0f} | {x['seconds']:.2f} |" for x in table],
        "",
        "| ratio (same run, same images) | value | goal |",
        "|---|---:|---:|",
        *[f"| {k} | {v:.2f}x | {'>= 0.9x' if k.startswith('probe + quality') else ''} |" for k, v in ratios.items()],
        "",
        "Content digests are equal from both sources (checked in the run). Reading a tar member costs one "
        "`open` + `pread` at the offset the shard's index (read once per process from the tar headers) gives, "
        "as a loose file costs `open` + `read`; nothing is extracted.",
        "",
        "## Memory: Parquet with image bytes larger than the memory allowed",
        "",
        f"A {mem['file_bytes'] / mb:.0f} MB Parquet file ({mem['rows']} rows, binary image column, uncompressed, "
        f"{mem['row_groups']} row groups of {ROW_GROUP} rows, about {mem['row_group_bytes'] / mb:.1f} MB each) read end to "
        f"end (ingest, then probe and quality on every row, in batches of 256 as the stages do) in a subprocess whose "
        f"address space is capped (`RLIMIT_AS`) at its warmed-up size plus {mem['budget'] / mb:.0f} MB, less than the "
        f"file.",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| file size | {mem['file_bytes'] / mb:.0f} MB |",
        f"| address space cap above start-up | {mem['budget'] / mb:.0f} MB |",
        f"| rows read and scored | {mem['ok']} of {mem['rows']} |",
        f"| RSS after imports and warm-up | {mem['base_now'] / mb:.0f} MB |",
        f"| largest RSS after a batch of 256 rows | {mem['top_now'] / mb:.0f} MB |",
        f"| peak RSS of the process (ru_maxrss, start-up included) | {mem['peak_rss'] / mb:.0f} MB |",
        f"| seconds | {mem['seconds']:.1f} |",
        f"| control: `pyarrow.parquet.read_table` of the whole file under the same cap | {mem['control']} |",
        "",
        "Memory stays bounded by batches: ingest reads only the non-image columns, batch by batch "
        "(`ParquetFile.iter_batches`); the image bytes are read one row group at a time and only the current "
        "group is held per process, so the peak grows with the row group, not with the file. A tar shard is "
        "never loaded: its index holds offsets and sizes, and a member's bytes are read when its row is.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(text)


if __name__ == "__main__":
    main()
