"""Remote storage (issue 21): inputs, run folder and Prefect's result storage on a real S3 API.

moto's server mode speaks the S3 HTTP API on loopback and s3fs talks to it exactly as to AWS (the
endpoint comes from ``AWS_ENDPOINT_URL``, as for any S3-compatible store): no network, no mocks in
mmpipe's code path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from mmcore import graph, storage
from mmcore.config import load_config
from mmcore.digests import file_digest, files_fingerprint
from mmcore.errors import ConfigError, InputError
from tests.conftest import FAST, REPO

BUCKET = "mmpipe-test"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A local S3 server for this module; AWS_* point every client (this process and its children) at it."""
    pytest.importorskip("s3fs")
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}", "MMPIPE_CACHE": str(tmp_path_factory.mktemp("cache"))}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import fsspec

    fsspec.filesystem("s3").clear_instance_cache()
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir(BUCKET)
    try:
        yield fs
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        fsspec.filesystem("s3").clear_instance_cache()


@pytest.fixture(scope="module")
def s3_data(s3, synth_small) -> str:
    """The small synthetic dataset uploaded to s3://BUCKET/data (manifest, images, planted file)."""
    url = f"s3://{BUCKET}/data"
    s3.put(str(synth_small) + "/", url + "/", recursive=True)
    return url


def _cache(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_url_in_the_config_names_the_local_mirror_and_bad_urls_are_one_line_errors(s3, tmp_path, monkeypatch):
    cache = _cache(tmp_path, monkeypatch)
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"data.manifest=s3://{BUCKET}/ds/manifest.csv",
                                                       f"out=s3://{BUCKET}/runs/r1"])
    assert cfg.data.manifest == cache / "remote" / "s3" / BUCKET / "ds" / "manifest.csv"
    assert cfg.data.image_root == cache / "remote" / "s3" / BUCKET / "ds"  # the manifest's folder, as for a file
    assert storage.url_of(cfg.run_dir) == f"s3://{BUCKET}/runs/r1"
    assert storage.url_of(cfg.run_dir / "ablate" / "v-s0") == f"s3://{BUCKET}/runs/r1/ablate/v-s0"
    assert storage.url_of(tmp_path) is None
    file_cfg = load_config(REPO / "configs" / "demo.yaml", [f"data.manifest=file://{tmp_path}/m.csv"])
    assert file_cfg.data.manifest == tmp_path / "m.csv"
    with pytest.raises(ConfigError, match=r"data.manifest: cannot use nosuch://"):
        load_config(REPO / "configs" / "demo.yaml", ["data.manifest=nosuch://b/m.csv"])
    with pytest.raises(ConfigError, match=r"would leave the mirror"):
        load_config(REPO / "configs" / "demo.yaml", [f"out=s3://{BUCKET}/runs/../../etc"])


def test_the_mirror_downloads_changed_objects_only_and_never_leaves_its_root(s3, tmp_path, monkeypatch):
    _cache(tmp_path, monkeypatch)
    url = f"s3://{BUCKET}/mirror-test"
    s3.pipe({f"{url}/a.txt": b"one", f"{url}/sub/b.txt": b"two", f"s3://{BUCKET}/outside.txt": b"no"})
    s3.pipe(f"{url}/sub/../../escape.txt", b"evil")  # a key S3 allows and a path must not follow
    first = storage.mirror(url)
    local = storage.local_path(url)
    assert (first.n_objects, first.n_downloaded, first.n_unsafe) == (2, 2, 1)
    assert (local / "a.txt").read_bytes() == b"one" and (local / "sub" / "b.txt").read_bytes() == b"two"
    assert not (local.parent / "outside.txt").exists() and not (local.parent / "escape.txt").exists()
    assert not any(p.name == "escape.txt" for p in Path(storage.cache_root()).rglob("*"))
    again = storage.mirror(url)
    assert again.n_downloaded == 0  # unchanged objects are not fetched again
    s3.pipe(f"{url}/a.txt", b"changed")
    s3.rm(f"{url}/sub/b.txt")
    third = storage.mirror(url)
    assert (third.n_downloaded, third.n_removed) == (1, 1)
    assert (local / "a.txt").read_bytes() == b"changed" and not (local / "sub" / "b.txt").exists()
    with pytest.raises(InputError, match="not found"):
        storage.mirror(f"s3://{BUCKET}/no-such-prefix")


def test_two_workers_mirroring_the_same_objects_fingerprint_them_alike(s3, s3_data, tmp_path, monkeypatch):
    """The probe's cache key reads a cheap fingerprint of the images: on a mirror it is the objects'
    size and ETag, so a second worker (its own disk: other mtimes and inodes) is a cache hit."""
    refs = ["images/" + p.name for p in sorted(storage.local_path(s3_data).glob("images/*"))][:50] or None
    prints = []
    for worker in ("w1", "w2"):
        monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / worker))
        storage.mirror(s3_data)
        root = storage.local_path(s3_data)
        refs = refs or sorted(f"images/{p.name}" for p in (root / "images").iterdir())[:50]
        prints.append(files_fingerprint(root, refs))
    assert prints[0] == prints[1]
    s3.pipe(f"{s3_data}/{refs[0]}", b"not the same image")
    storage.mirror(s3_data)
    assert files_fingerprint(storage.local_path(s3_data), refs) != prints[1]


def test_an_interrupted_upload_leaves_a_stage_that_reads_as_incomplete(s3, tmp_path, monkeypatch):
    """stats.json goes last and the old one is deleted first: a worker that dies mid-upload leaves no
    stage a reader would take as whole."""
    local = tmp_path / "stage"
    local.mkdir()
    for name in ("kept.parquet", "quarantine.parquet", "stats.json"):
        (local / name).write_bytes(name.encode())
    url = f"s3://{BUCKET}/runs/interrupted/clean"
    storage.push_files(local, url, ["kept.parquet", "quarantine.parquet"], last="stats.json")
    assert storage.read_remote(f"{url}/stats.json") == b"stats.json"
    calls = []
    real_put = storage._put

    def dying_put(fs, src, remote):
        calls.append(remote)
        if len(calls) == 2:
            raise OSError("connection reset")
        real_put(fs, src, remote)

    monkeypatch.setattr(storage, "_put", dying_put)
    with pytest.raises(OSError, match="connection reset"):
        storage.push_files(local, url, ["kept.parquet", "quarantine.parquet"], last="stats.json")
    assert storage.read_remote(f"{url}/stats.json") is None


def test_a_pushed_folder_is_exact_and_a_pull_checks_every_file(s3, tmp_path):
    """An earlier result's extra file (a model's old matching head) is removed from the bucket by the
    next upload, and from a local copy by the next pull; a file changed in the bucket is refused."""
    src, url = tmp_path / "src", f"s3://{BUCKET}/runs/exact/train"
    (src / "model").mkdir(parents=True)
    for name, data in {"kept.parquet": b"k", "stats.json": b"s", "model/weights": b"w", "model/head": b"h"}.items():
        (src / name).write_bytes(data)
    storage.push_files(src, url, ["kept.parquet", "model"], last="stats.json", exact=True)
    dst = tmp_path / "dst"
    assert storage.pull_files(url, dst, ["kept.parquet", "model"], extra=("stats.json",)) == 4
    (src / "model" / "head").unlink()
    storage.push_files(src, url, ["kept.parquet", "model"], last="stats.json", exact=True)
    assert not s3.exists(f"{url}/model/head") and s3.exists(f"{url}/model/weights")
    storage.pull_files(url, dst, ["kept.parquet", "model"], extra=("stats.json",))
    assert sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file()) == [
        "kept.parquet", "model/weights", "stats.json"]
    s3.pipe(f"{url}/model/weights", b"tampered")
    (dst / "model" / "weights").unlink()
    with pytest.raises(InputError, match="not the file the upload listed"):
        storage.pull_files(url, dst, ["kept.parquet", "model"])
    with pytest.raises(InputError, match="no files.json"):
        storage.pull_files(f"s3://{BUCKET}/runs/never-pushed/train", dst, ["model"])


def _stage_folder(run_dir: Path, stage: str, files: dict[str, bytes]) -> dict[str, str]:
    """A stage folder of ``files`` in ``run_dir``; the digests of kept, quarantine and stats."""
    for name, data in files.items():
        (run_dir / stage / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / stage / name).write_bytes(data)
    return {n: file_digest(run_dir / stage / n) for n in ("kept.parquet", "quarantine.parquet", "stats.json")}


def test_push_stage_uploads_the_stats_last_and_only_when_they_changed(s3, tmp_path, monkeypatch):
    run, url = tmp_path / "run", f"s3://{BUCKET}/runs/push-stage"
    _stage_folder(run, "train", {"kept.parquet": b"k", "quarantine.parquet": b"q", "model/weights": b"w",
                                 "stats.json": b"s1", "status.json": b"{}"})
    files = ["kept.parquet", "quarantine.parquet", "model"]
    s3.pipe(f"{url}/train/stats.json", b"an earlier result's stats")
    calls: list[str] = []
    fs = storage.filesystem(url)[0]  # fsspec's cached instance: the one push_stage gets
    real_rm, real_put = fs.rm_file, storage._put
    monkeypatch.setattr(fs, "rm_file", lambda path: (calls.append(f"rm {path.rsplit('/', 1)[-1]}"), real_rm(path))[1])
    monkeypatch.setattr(storage, "_put", lambda fs, src, remote: (calls.append(remote.split("/train/")[1]),
                                                                  real_put(fs, src, remote))[1])
    assert storage.push_stage(run, url, "train", files) == 5
    assert calls[0] == "rm stats.json" and calls[-3:] == ["files.json", "stats.json", "status.json"]
    assert sorted(calls[1:-3]) == ["kept.parquet", "model/weights", "quarantine.parquet"]
    assert json.loads(storage.read_remote(f"{url}/train/files.json")) == {
        "kept.parquet": file_digest(run / "train" / "kept.parquet"), "model/weights": file_digest(run / "train" / "model" / "weights"),
        "quarantine.parquet": file_digest(run / "train" / "quarantine.parquet")}
    calls.clear()
    assert storage.push_stage(run, url, "train", files) == 1  # the same stats: only status.json again
    assert calls == ["status.json"]
    (run / "train" / "status.json").unlink()
    (run / "train" / "stats.json").write_bytes(b"s2")
    calls.clear()
    assert storage.push_stage(run, url, "train", files) == 4
    assert calls[0] == "rm stats.json" and calls[-1] == "stats.json"


def test_pull_stage_brings_a_pushed_stage_to_another_worker_and_checks_its_digests(s3, tmp_path, monkeypatch):
    url = f"s3://{BUCKET}/runs/pull-stage"
    digests = _stage_folder(tmp_path / "worker1", "clean", {"kept.parquet": b"k", "quarantine.parquet": b"q",
                                                           "stats.json": b"s"})
    files = ["kept.parquet", "quarantine.parquet"]
    storage.push_stage(tmp_path / "worker1", url, "clean", files)
    _cache(tmp_path, monkeypatch)  # worker 2: its own disk
    assert storage.pull_stage(url, "clean", files, {**digests, "stats.json": "sha256:other"}) is None
    here = storage.pull_stage(url, "clean", files, digests)
    assert here == storage.local_path(url) and storage.files_match(here / "clean", digests)
    assert (here / "clean" / "stats.json").read_bytes() == b"s"
    (here / "clean" / "kept.parquet").write_bytes(b"changed here")
    assert not storage.files_match(here / "clean", digests)
    assert storage.pull_stage(url, "clean", files, digests) == here  # brought back from the bucket
    s3.rm(f"{url}/clean/files.json")
    assert storage.pull_stage(url, "clean", files, digests) is None  # not a complete upload
    assert storage.pull_stage(f"s3://{BUCKET}/runs/../../evil", "clean", files, digests) is None
    assert storage.pull_stage(f"S3://{BUCKET}/runs/pull-stage/", "clean", files, digests) is None  # not as checked
    assert not storage.files_match(tmp_path / "nowhere", digests)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_remove_unless_deletes_what_its_check_refuses_and_reads_nothing_else(s3, tmp_path, where):
    base = str(tmp_path / "records") if where == "local" else f"s3://{BUCKET}/records"
    if where == "local":
        (tmp_path / "records").mkdir()
    fs, _ = storage.filesystem(base)
    seen: list[bytes] = []
    check = lambda blob: seen.append(blob) or blob.startswith(b"{")  # noqa: E731
    for key, blob in (("good", b'{"ok": 1}'), ("bad", b"\x80\x04pickle")):
        fs.pipe_file(storage.filesystem(storage.join(base, key))[1], blob)
    assert not storage.remove_unless(storage.join(base, "good"), check)
    assert storage.remove_unless(storage.join(base, "bad"), check)
    assert not storage.remove_unless(storage.join(base, "missing"), check)
    assert seen == [b'{"ok": 1}', b"\x80\x04pickle"]
    assert storage.read_remote(storage.join(base, "good")) == b'{"ok": 1}'
    assert storage.read_remote(storage.join(base, "bad")) is None
    assert storage.remove_unless(storage.join(base, "good"), check, max_bytes=2) is False and seen[-1] == b'{"'


def test_results_base_is_a_checked_url_or_an_absolute_path(s3, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.results_base(f"s3://{BUCKET}/prefect-results/") == f"s3://{BUCKET}/prefect-results"
    assert storage.results_base("results") == str(tmp_path / "results")
    assert storage.results_base(f"file://{tmp_path}/r") == str(tmp_path / "r")
    with pytest.raises(ConfigError, match=r"storage.results: cannot use nosuch://"):
        storage.results_base("nosuch://b/r")


def test_a_cache_record_naming_a_location_outside_the_cache_is_never_followed(s3, tmp_path, monkeypatch):
    from tasks.common import StageOutput, localize

    _cache(tmp_path, monkeypatch)
    planted = StageOutput(stage="clean", run_dir=str(tmp_path / "gone"), kept_digest="x", quarantine_digest="x",
                          n_kept=1, n_quarantined=0, stats_digest="x", location="s3://../../../../tmp/evil")
    assert localize(planted) is None
    assert not (tmp_path / "tmp" / "evil").exists() and not Path("/tmp/evil/clean").exists()


def test_remote_settings_are_checked_at_load_and_travel_as_urls(s3, tmp_path, monkeypatch):
    from mmcore.config import portable

    _cache(tmp_path, monkeypatch)
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"data.manifest=s3://{BUCKET}/manifest.csv", f"out=s3://{BUCKET}"])
    assert storage.url_of(cfg.data.image_root) == f"s3://{BUCKET}" and storage.url_of(cfg.run_dir) == f"s3://{BUCKET}"
    tree = portable(cfg)  # what config.yaml and a typed deployment's parameters hold: no machine's cache path
    assert tree["out"] == f"s3://{BUCKET}" and tree["data"]["manifest"] == f"s3://{BUCKET}/manifest.csv"
    with pytest.raises(ConfigError, match=r"storage.results: cannot use nosuch://"):
        load_config(REPO / "configs" / "demo.yaml", ["data.manifest=m.csv", "storage.results=nosuch://b/r"])
    with pytest.raises(ConfigError, match=r"storage.public_url: .*expected an http\(s\) URL"):
        load_config(REPO / "configs" / "demo.yaml", ["data.manifest=m.csv", "storage.public_url=s3://b/r"])
    with pytest.raises(InputError, match=r"s3://no-such-bucket-here/x") as e:  # the provider's error, one line
        storage.mirror("s3://no-such-bucket-here/x")
    assert "\n" not in str(e.value)


def _mmpipe(args: list[str], home: Path, cache: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_LOCAL_STORAGE_PATH": str(home / "storage"),
           storage.CACHE_ENV: str(cache)}
    return subprocess.run([sys.executable, "-m", "mmpipe", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)


def _statuses(s3, run_url: str) -> dict[str, bool]:
    out = {}
    for stage in graph.ORDER:
        blob = storage.read_remote(f"{run_url}/{stage}/status.json")
        if blob is not None:
            out[stage] = json.loads(blob)["cached"]
    return out


@pytest.mark.slow
def test_pipeline_on_s3_runs_twice_and_the_second_run_is_cached_also_on_a_fresh_worker(s3, s3_data, tmp_path):
    """Acceptance (issue 21): manifest, images and run folder on the S3 server, Prefect's records in
    the bucket. Run 2 (same worker) and run 3 (a fresh PREFECT_HOME and a fresh local cache: another
    worker) take every stage from cache; run 3 pulls the files from the bucket."""
    run_url = f"s3://{BUCKET}/runs/acceptance"
    args = ["run", str(REPO / "configs" / "demo.yaml"), "--out", run_url,
            "--set", f"data.manifest={s3_data}/manifest.csv",
            "--set", "decontam.reference_sets={}",
            "--set", f"storage.results=s3://{BUCKET}/prefect-results",
            *[a for kv in FAST for a in ("--set", kv)]]
    worker1 = (tmp_path / "home1", tmp_path / "cache1")
    first = _mmpipe(args, *worker1, cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert f"uploaded to {run_url}" in first.stdout
    ran = _statuses(s3, run_url)
    assert set(ran) == set(graph.ORDER)
    assert not any(ran.values())
    for stage in ran:  # each stage's files are in the bucket, its stats written last
        assert s3.exists(f"{run_url}/{stage}/kept.parquet") and s3.exists(f"{run_url}/{stage}/stats.json")
    assert s3.exists(f"{run_url}/train/model/config.json") and s3.exists(f"{run_url}/report/report.html")
    assert s3.exists(f"{run_url}/config.yaml")
    records = s3.ls(f"{BUCKET}/prefect-results")
    assert len(records) >= 8  # the cache records are in the bucket, not in PREFECT_HOME
    assert not (tmp_path / "home1" / "storage").exists() or not any((tmp_path / "home1" / "storage").iterdir())

    second = _mmpipe(args, *worker1, cwd=tmp_path)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    status = _statuses(s3, run_url)
    # The report shows which stages came from cache: it renders again once those badges change (as
    # on local disk, tests/test_flow.py); every stage that computes something is a hit.
    assert all(v for k, v in status.items() if k != "report"), status

    worker2 = (tmp_path / "home2", tmp_path / "cache2")  # nothing of worker 1 on its disk
    third = _mmpipe(args, *worker2, cwd=tmp_path)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    status = _statuses(s3, run_url)
    assert all(status.values()), status  # the report too: its badges did not change
    local2 = storage.local_path(run_url).relative_to(storage.cache_root())
    pulled = worker2[1] / local2
    assert (pulled / "report" / "report.html").is_file() and (pulled / "evaluate" / "metrics.json").is_file()
    m1 = json.loads(storage.read_remote(f"{run_url}/evaluate/metrics.json"))
    assert json.loads((pulled / "evaluate" / "metrics.json").read_text()) == m1

    # The report artifact's link is served by the bucket itself (a signed URL), or by public_url.
    link = storage.report_link(run_url, "report/report.html", storage.StorageConfig())
    with urllib.request.urlopen(link, timeout=30) as r:
        assert r.read() == storage.read_remote(f"{run_url}/report/report.html", max_bytes=1 << 30)
    public = storage.StorageConfig(public_url="https://reports.example.org/runs/acceptance")
    assert storage.report_link(run_url, "report/report.html", public) == \
        "https://reports.example.org/runs/acceptance/report/report.html"
    # The run summary artifact carries the headline plots inline.
    from mmcore.report import headline_plots

    md = headline_plots(pulled)
    assert md.count("](data:image/png;base64,") == 2, md[:300]
