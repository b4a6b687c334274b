"""Breaking things on purpose: kills mid-run, injected read faults, bad configs, untrusted files.

The runs go through the stages of ``mmcore.graph`` (all of them, or up to the one a test needs).
Subprocess runs talk to the session's Prefect test server (``PREFECT_API_URL``), so a
CLI run does not pay for starting its own server and a kill leaves no server behind; their cache
records go to the session's ``PREFECT_LOCAL_STORAGE_PATH`` like the in-process runs'.

Set ``MMPIPE_RELIABILITY_LOG=FILE`` to append what was tried (kill points, faults, outcomes) as
JSON lines; ``bench/results/reliability.md`` records a run of it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mmcore import faults, graph, tables
from mmcore.layout import RunLayout, StagePaths
from tests.conftest import FAST, REPO, demo_config

CLI_TIMEOUT = 300  # seconds for one CLI run; a busy 2-core CI box needs headroom
KILL_SEED = 20261124
N_KILLS = 3
FAULT_RATE = 0.1
# Stages worth killing in, most interesting first; the first N_KILLS are killed in.
KILL_STAGES = ("train", "probe", "quality", "split", "evaluate")
# Overrides on top of conftest's FAST that keep a full run small (train long enough to checkpoint mid-way).
SMALL = (
    "train.steps=6", "train.batch_size=16", "train.num_workers=0", "train.checkpoint_every=2",
    "evaluate.bootstrap=50", "evaluate.robustness=false", "evaluate.spotcheck_n=5",
    "report.thumbnails_per_reason=1", "report.spotcheck_queries=2",
)
# The stages that read image files through ``mmcore.faults``, in the order they run.
IMAGE_READERS = ("probe", "quality")


def _record(kind: str, **fields) -> None:
    path = os.environ.get("MMPIPE_RELIABILITY_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"test": kind, **fields}, default=str) + "\n")


# --------------------------------------------------------------------------- the reader


def _files(root: Path, n: int) -> dict[Path, bytes]:
    (root / "files").mkdir(parents=True)
    out = {}
    for i in range(n):
        p = root / "files" / f"{i:05d}.bin"
        p.write_bytes(os.urandom(64) + bytes([i % 256]))
        out[p] = p.read_bytes()
    return out


def test_injected_faults_are_retried_logged_and_reproducible(tmp_path, monkeypatch, caplog):
    files = _files(tmp_path, 300)
    monkeypatch.setenv(faults.RATE_ENV, str(FAULT_RATE))
    monkeypatch.setenv(faults.SEED_ENV, "7")
    runs = []
    for _ in range(2):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mmcore.io"):
            assert all(faults.read_bytes(p, backoff=0) == b for p, b in files.items())
        runs.append([r.getMessage() for r in caplog.records if r.name == "mmcore.io"])
    assert runs[0] == runs[1]  # the same faults on the same attempts: a run is reproducible
    assert 300 * FAULT_RATE * 0.5 < len(runs[0]) < 300 * FAULT_RATE * 2, len(runs[0])
    assert all(m.startswith("retry ") and m.endswith(": injected fault") for m in runs[0])
    assert any(m.startswith("retry 2/5 reading files/") for m in runs[0])
    _record("reader", files=len(files), rate=FAULT_RATE, retries=len(runs[0]), lost=0)


def test_permanent_errors_raise_read_error_with_a_reason(tmp_path, monkeypatch, caplog):
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "fifo")
    ok = tmp_path / "ok.png"
    ok.write_bytes(b"fine")
    cases = {"missing.png": "missing_file", "dir": "read_error", "fifo": "read_error"}
    for name, reason in cases.items():
        for read in (faults.read_bytes, faults.open_binary):
            with pytest.raises(faults.ReadError) as e:
                read(tmp_path / name, backoff=0)  # a FIFO must fail at once, not block
            assert e.value.reason == reason and faults.reason_of(e.value) == reason
            assert reason in str(e.value) and "\n" not in str(e.value)
    with faults.open_binary(ok) as f:
        assert f.read() == b"fine"
    if os.geteuid() != 0:  # root reads anything: permissions cannot be tested as root
        locked = tmp_path / "locked.png"
        locked.write_bytes(b"x")
        locked.chmod(0)
        with pytest.raises(faults.ReadError, match="permission_denied"):
            faults.read_bytes(locked)
    monkeypatch.setenv(faults.PERMANENT_ENV, "nothing.png,ok.png")
    with caplog.at_level(logging.WARNING, logger="mmcore.io"), pytest.raises(faults.ReadError) as e:
        faults.read_bytes(ok, attempts=3, backoff=0)
    assert e.value.reason == "read_error" and "after 3 attempts" in str(e.value)
    assert [r.getMessage() for r in caplog.records][-1] == "retry 3/3 reading " + "/".join(ok.parts[-2:]) + (
        ": injected permanent fault"
    )
    # ReadError crosses worker processes with its reason.
    back = pickle.loads(pickle.dumps(e.value))
    assert isinstance(back, faults.ReadError) and back.reason == "read_error"
    assert set(faults.REASONS) == {"missing_file", "permission_denied", "read_error", "file_too_large"}


# --------------------------------------------------------------------------- CLI runs


@pytest.fixture(scope="module")
def api_url(prefect_harness) -> str:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def _env(api_url: str, results: Path | None = None, **extra: str) -> dict[str, str]:
    """The environment of a CLI run. ``results``: its own Prefect result storage, so its cache holds only
    what runs of this test computed (cache keys hold no path: another test's run of the same inputs
    would otherwise answer for it, and an injected fault would never fire)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMPIPE_FAULT")}
    if results is not None:
        env["PREFECT_LOCAL_STORAGE_PATH"] = str(results)
    env.update(PREFECT_API_URL=api_url, PREFECT_LOGGING_EXTRA_LOGGERS="mmcore", PYTHONUNBUFFERED="1",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120", **extra)
    return env


def _cmd(manifest: Path, out: Path) -> list[str]:
    """The CLI command of a run with exactly the config ``demo_config(manifest, out, *SMALL)`` builds."""
    sets = [f"data.manifest={manifest}", *FAST, *SMALL]
    return [sys.executable, "-m", "mmpipe", "run", str(REPO / "configs" / "demo.yaml"),
            *(a for s in sets for a in ("--set", s)), "--out", str(out)]


def _run_cli(manifest: Path, out: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    r = subprocess.run(_cmd(manifest, out), cwd=out.parent, env=env, capture_output=True, text=True,
                       timeout=CLI_TIMEOUT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _parquets(run_dir: Path) -> dict[str, bytes]:
    """Every Parquet artifact of a run and train's Arrow shards (temporary ``.*.tmp`` files are not artifacts)."""
    files = [*run_dir.rglob("*.parquet"), *run_dir.rglob("*.arrow")]
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(files) if not p.name.startswith(".")}


def _differences(run_dir: Path, want: dict[str, bytes]) -> list[str]:
    """Parquet artifacts of ``run_dir`` that are not byte-identical to ``want`` (or only on one side)."""
    got = _parquets(run_dir)
    return sorted(set(got) ^ set(want)) + [n for n in sorted(set(got) & set(want)) if got[n] != want[n]]


def _tmp_files(run_dir: Path) -> set[str]:
    return {str(p.relative_to(run_dir)) for p in run_dir.rglob(".*.tmp")}


def _check_digests(run_dir: Path) -> None:
    """Every stage's stats name the bytes its Parquet files hold: nothing half-written."""
    for stage in graph.ORDER:
        p = StagePaths.of(run_dir, stage)
        stats = tables.read_json(p.stats)
        assert tables.file_digest(p.kept) == stats["kept_digest"], stage
        assert tables.file_digest(p.quarantine) == stats["quarantine_digest"], stage


@pytest.fixture(scope="module")
def reference(synth_small, tmp_path_factory, prefect_harness) -> Path:
    """An uninterrupted, fault-free run of the same config: what every broken run must end up equal to.

    Through the CLI in its own process, like the runs it is compared with: an in-process run after
    other tests in this process can differ from it in the last bit of a float (issue note), which
    is not what these tests are about.
    """
    from prefect.settings import PREFECT_API_URL

    out = tmp_path_factory.mktemp("reference") / "run"
    _run_cli(synth_small / "manifest.csv", out, _env(PREFECT_API_URL.value(), out.parent / "results"))
    _check_digests(out)
    return out


def _group_alive(pgid: int) -> list[str]:
    """Processes (not zombies) left in a process group."""
    left = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            left.append(stat.parent.name)
    return left


def _kill_points(reference: Path) -> list[tuple[str, float]]:
    """(stage, seconds into it) for each kill: seeded, spread over ``KILL_STAGES``."""
    rng = random.Random(KILL_SEED)
    points = []
    for i in range(N_KILLS):
        stage = KILL_STAGES[i % len(KILL_STAGES)]
        took = tables.read_json(StagePaths.of(reference, stage).stats)["seconds"]
        # Early in the stage (a busy machine runs it slower than the reference did); after a mid-way
        # mark, within a second of it.
        delay = rng.uniform(0, 1) if stage in MIDWAY else rng.uniform(0.05, 0.5) * max(took, 0.2)
        points.append((stage, round(delay, 3)))
    return points


# A file whose appearance means a stage is well under way (train: its first checkpoint), so the
# kill lands mid-stage and the re-run must resume from it.
MIDWAY = {"train": lambda run: run.checkpoint}


def _started(run_dir: Path, stage: str) -> Path:
    """The file whose appearance means ``stage`` has started (or is mid-way, see ``MIDWAY``): the
    flow runs the stages one after another, so a stage starts when the one before it is done."""
    run = RunLayout(run_dir)
    if stage in MIDWAY:
        return MIDWAY[stage](run)
    i = graph.ORDER.index(stage)
    return run.config if i == 0 else run.stage(graph.ORDER[i - 1]).status


def _checkpoint_history(run_dir: Path) -> list[float] | None:
    """``samples_per_s`` of the steps saved in train's last checkpoint (None without one)."""
    path = RunLayout(run_dir).checkpoint
    if not path.is_file():
        return None
    import torch

    hist = torch.load(path, map_location="cpu", weights_only=True).get("history", [])
    return [float(h["samples_per_s"]) for h in hist if isinstance(h, dict) and "samples_per_s" in h] or None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads process groups from /proc (Linux)")
def test_sigkill_mid_stage_then_rerun_completes_from_cache_with_identical_artifacts(
    synth_small, reference, api_url, tmp_path
):
    manifest = synth_small / "manifest.csv"
    want = _parquets(reference)
    for n, (stage, delay) in enumerate(_kill_points(reference)):
        env = _env(api_url, tmp_path / f"results{n}")
        run_dir = tmp_path / f"kill{n}" / "run"
        run_dir.parent.mkdir()
        proc = subprocess.Popen(_cmd(manifest, run_dir), cwd=run_dir.parent, env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            trigger, done, t0 = _started(run_dir, stage), StagePaths.of(run_dir, stage).status, time.monotonic()
            while not trigger.exists() and proc.poll() is None and time.monotonic() - t0 < CLI_TIMEOUT:
                time.sleep(0.01)
            # Kill ``delay`` seconds into the stage, or as it finishes if it is faster than that.
            t1 = time.monotonic()
            while time.monotonic() - t1 < delay and not done.exists() and proc.poll() is None:
                time.sleep(0.01)
        finally:
            with contextlib.suppress(ProcessLookupError):  # it may have finished first
                os.killpg(proc.pid, signal.SIGKILL)  # the CLI, its workers and anything else it started
            proc.wait()
        deadline = time.monotonic() + 10
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _group_alive(proc.pid), "processes left behind after killing the run"
        finished = [s for s in graph.ORDER if StagePaths.of(run_dir, s).status.is_file()]
        ckpt = _checkpoint_history(run_dir) if stage == "train" and "train" not in finished else None
        # What a kill in the middle of an atomic write leaves: a torn temporary file. Never read.
        torn = StagePaths.of(run_dir, stage).dir / f".{tables.KEPT_FILE}.torn.tmp"
        torn.parent.mkdir(parents=True, exist_ok=True)
        torn.write_bytes(b"PAR1 half a file")
        left = _tmp_files(run_dir)

        _run_cli(manifest, run_dir, env)
        status = {s: tables.read_json(StagePaths.of(run_dir, s).status)["cached"] for s in graph.ORDER}
        assert all(status[s] for s in finished), (stage, delay, status)
        assert not _differences(run_dir, want), (stage, delay, _differences(run_dir, want))
        _check_digests(run_dir)
        assert _tmp_files(run_dir) <= left  # the re-run leaves no temporary file of its own
        if ckpt:
            # Train resumed: the steps before the checkpoint keep the killed run's own timings.
            timing = tables.read_json(RunLayout(run_dir).timing)["samples_per_s"]
            assert timing[: len(ckpt)] == [round(x, 3) for x in ckpt], "train started over instead of resuming"
        _record("crash", stage=stage, delay_s=delay, finished_before_kill=finished, cached_on_rerun=status,
                identical=True, torn_tmp_files=sorted(left), train_resumed_after_steps=len(ckpt or []))


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="the watchdog needs /proc (Linux)")
def test_a_sigkilled_run_does_not_leave_prefects_temporary_server_behind(tmp_path):
    """Only the run's own process is killed (as the out-of-memory killer would): its temporary
    server, a separate process Prefect would stop at exit, is stopped by the watchdog instead."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}  # no server: a temporary one
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    code = ("from flows.server import start_temporary_server; import time; "
            "print(start_temporary_server().server_process.pid, flush=True); time.sleep(300)")
    run = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    try:
        server = int(run.stdout.readline())
        assert Path(f"/proc/{server}").exists()
    finally:
        os.kill(run.pid, signal.SIGKILL)
        run.wait()
    deadline = time.monotonic() + 20
    while Path(f"/proc/{server}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not Path(f"/proc/{server}").exists(), "the temporary server outlived the killed run"


@pytest.mark.slow
def test_ten_percent_read_faults_lose_nothing_and_retries_reach_prefect_logs(synth_small, reference, api_url, tmp_path):
    out = tmp_path / "run"
    r = _run_cli(synth_small / "manifest.csv", out,
                 _env(api_url, tmp_path / "results", **{faults.RATE_ENV: str(FAULT_RATE), faults.SEED_ENV: "1"}))
    assert not _differences(out, _parquets(reference))
    printed = (r.stdout + r.stderr).count("injected fault")
    assert printed > 0, "no retry was logged"
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterName

    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(name=LogFilterName(any_=["mmcore.io"])), limit=200)
    mine = [lg for lg in logs if "injected fault" in lg.message]
    assert mine and all(lg.task_run_id is not None for lg in mine), "retries are not in Prefect's task logs"
    _record("faults", rate=FAULT_RATE, stages=IMAGE_READERS, retries_printed=printed, retries_in_prefect=len(mine),
            identical=True)


def test_a_permanently_unreadable_file_quarantines_its_row_not_the_run(synth_small, prefect_harness, tmp_path,
                                                                       monkeypatch):
    from flows.pipeline import pipeline

    reader = IMAGE_READERS[0]  # the first stage that opens the image files
    kept = tables.read_parquet(StagePaths.of(_run_clean(synth_small, tmp_path / "clean"), "clean").kept)
    victim = kept[tables.IMAGE].iloc[3]
    row = int(kept[tables.ROW_ID].iloc[3])
    monkeypatch.setenv(faults.PERMANENT_ENV, victim)
    run_dir = tmp_path / "run"
    # workers=1: the stage reads in this process, which sees the variable set above (the injected
    # fault is in the cache key: no normal run of the same inputs answers for this one, nor the reverse).
    pipeline(demo_config(synth_small / "manifest.csv", run_dir, "workers=1", *SMALL), until=reader)
    q = tables.load(run_dir, reader, quarantine=True)
    hit = q[q[tables.ROW_ID] == row]
    assert len(hit) == 1 and hit[tables.REASON].iloc[0] == "read_error", hit
    stats = tables.read_json(StagePaths.of(run_dir, reader).stats)
    assert stats["n_kept"] + stats["n_quarantined"] == stats["n_rows"]
    _record("permanent_fault", stage=reader, file=victim, quarantined_as="read_error")


def _run_clean(synth_small: Path, run_dir: Path) -> Path:
    from flows.pipeline import pipeline

    pipeline(demo_config(synth_small / "manifest.csv", run_dir), until="clean")
    return run_dir


def test_a_corrupted_or_truncated_artifact_is_never_used_its_stage_runs_again(synth_small, prefect_harness, tmp_path):
    from flows.pipeline import pipeline

    stages = graph.ORDER[:2]
    run_dir = tmp_path / "run"
    # Settings no other test uses (clean and probe): this folder's own files are the only cached copy, so a damaged
    # one cannot be replaced from another folder's run and the stage must run again.
    cfg = demo_config(synth_small / "manifest.csv", run_dir, *SMALL, "clean.max_chars=998", "probe.batch_size=97")
    pipeline(cfg, until=stages[-1])
    want = _parquets(run_dir)
    first = StagePaths.of(run_dir, stages[0]).kept
    first.write_bytes(first.read_bytes()[: first.stat().st_size // 2])  # torn by a crash outside our writer
    last = StagePaths.of(run_dir, stages[-1]).quarantine
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit, same size: only the digest can tell
    last.write_bytes(bytes(data))
    pipeline(cfg, until=stages[-1])
    assert _parquets(run_dir) == want
    assert not any(tables.read_json(StagePaths.of(run_dir, s).status)["cached"] for s in (stages[0], stages[-1]))
    _record("corrupt_artifact", truncated=str(first.relative_to(run_dir)), bit_flipped=str(last.relative_to(run_dir)),
            restored=True)


# --------------------------------------------------------------------------- bad configs


BAD_CONFIGS = [
    pytest.param("clean:\n  min_chars: lots\n", [], r"clean.min_chars: input should be a valid integer", id="wrong-type"),
    pytest.param("clean:\n  min_char: 3\n", [], r"unknown config key 'clean.min_char'", id="unknown-key"),
    pytest.param("", ["clean.min_letter_fraction=1.5"],
                 r"clean.min_letter_fraction: input should be less than or equal to 1", id="out-of-range-threshold"),
    pytest.param("", ["seed=-1"], r"seed: input should be greater than or equal to 0", id="negative-seed"),
    pytest.param("clean: 5\n", [], r"clean: input should be a valid dictionary", id="section-not-a-mapping"),
    pytest.param("split:\n  ratios: {train: 0.5, val: 0.2, test: 0.2}\n", [], r"split.ratios must sum to 1",
                 id="ratios-sum"),
    pytest.param("", ["data.manifest=missing.csv"], r"data.manifest: file not found", id="missing-manifest"),
    pytest.param("", ["data.root=no_such_folder"], r"data.root: not found", id="missing-image-root"),
    pytest.param("", ["train.model_path=no_such_model"], r"train.model_path: not found", id="missing-model-folder"),
]


def _snapshot(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime for p in root.rglob("*")}


@pytest.mark.parametrize("text, sets, match", BAD_CONFIGS)
def test_broken_config_is_one_line_nonzero_and_writes_nothing(tmp_path, monkeypatch, prefect_harness, text, sets, match):
    from typer.testing import CliRunner

    from mmpipe.cli import app

    (tmp_path / "images").mkdir()
    (tmp_path / "m.csv").write_text("image_path,text\nimages/a.png,a red circle on the left\n")
    (tmp_path / "c.yaml").write_text("data:\n  manifest: m.csv\nout: run\n" + text)
    monkeypatch.chdir(tmp_path)
    before = _snapshot(tmp_path)
    # In-process, the real command and arguments (test_config_cli runs the process exit codes).
    r = CliRunner().invoke(app, ["run", "c.yaml", *(a for s in sets for a in ("--set", s))])
    assert r.exit_code == 2, (r.exit_code, r.output[-2000:], r.exception)
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("error: ") and re.search(match, r.stderr), r.stderr
    assert _snapshot(tmp_path) == before  # no run folder, no Prefect home, nothing touched


# --------------------------------------------------------------------------- untrusted files


class _Payload:
    """Unpickling this runs a shell command that writes a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _bomb(path: Path, marker: Path, like_checkpoint: bool = True) -> Path:
    import torch

    obj = {"model": {"w": torch.zeros(2)}, "step": 3, "evil": _Payload(marker)} if like_checkpoint else _Payload(marker)
    torch.save(obj, path)
    return path


def test_a_pickle_bomb_checkpoint_is_refused_without_running_its_code(tmp_path):
    import torch

    marker = tmp_path / "pwned"
    ckpt = _bomb(tmp_path / "last.pt", marker)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(ckpt, map_location="cpu", weights_only=True)
    assert not marker.exists()
    from mmcore.trainloop import load_checkpoint

    # Refused, not run: training starts over instead of failing on every re-run (hardening #23).
    assert load_checkpoint(ckpt) == {}
    assert not marker.exists(), "loading a checkpoint executed pickled code"


def test_a_model_folder_with_pickled_weights_is_refused_without_running_its_code(tmp_path):
    """A model folder whose weights are a pickle (``pytorch_model.bin``), not safetensors."""
    from transformers import CLIPConfig, CLIPModel

    model, marker = tmp_path / "model", tmp_path / "pwned"
    tiny = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    CLIPConfig(text_config=dict(tiny, vocab_size=50, bos_token_id=0, eos_token_id=1, pad_token_id=1),
               vision_config=dict(tiny, image_size=16, patch_size=8), projection_dim=8).save_pretrained(model)
    _bomb(model / "pytorch_model.bin", marker, like_checkpoint=False)
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        CLIPModel.from_pretrained(model, local_files_only=True)  # what the project's loaders call
    assert not marker.exists()
    from mmcore.clip_model import Encoder

    (model / "tokenizer.json").write_text("{}")
    (model / "preprocess.json").write_text(json.dumps({"image_size": 16, "mean": [0, 0, 0], "std": [1, 1, 1],
                                                       "context_length": 16}))
    with pytest.raises(Exception):
        Encoder.load(model)
    assert not marker.exists(), "loading a model folder executed pickled code"


def test_no_loader_in_mmcore_unpickles_files():
    """Every torch.load passes weights_only=True; nothing calls pickle/joblib/pandas unpickling."""
    for py in sorted((REPO / "mmcore").glob("*.py")):
        src = py.read_text()
        for call in re.finditer(r"torch\.load\(([^)]*)\)", src):
            assert "weights_only=True" in call.group(1), f"{py.name}: {call.group(0)}"
        for bad in ("pickle.load", "pickle.Unpickler", "joblib.load", "read_pickle", "dill.load", "weights_only=False"):
            assert bad not in src, f"{py.name} uses {bad}"


def _healthy_images(synth_dir: Path, n: int) -> list[str]:
    """Paths of ``n`` synthetic images that carry no planted defect."""
    import pandas as pd

    from mmcore import synth

    m = pd.read_csv(synth_dir / "manifest.csv", keep_default_na=False)
    bad = set(m.loc[synth.planted(synth_dir)[tables.ROW_ID], "image_path"])
    ok = [p for p in m["image_path"] if p not in bad and (synth_dir / p).is_file() and not (synth_dir / p).is_symlink()]
    return sorted(set(ok))[:n]


class _FifoWatch:
    """Polls FIFOs: opening one's write end without blocking succeeds only while a reader has it open."""

    def __init__(self, fifos: list[Path]):
        self.fifos, self.opened, self._stop = fifos, set(), threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            for f in self.fifos:
                try:
                    fd = os.open(f, os.O_WRONLY | os.O_NONBLOCK)
                except OSError as e:
                    assert e.errno == errno.ENXIO  # no reader: nobody opened it
                    continue
                self.opened.add(f.name)  # somebody opened it; close so the reader gets EOF, not a hang
                os.close(fd)
            time.sleep(0.02)

    def __enter__(self) -> _FifoWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def test_paths_outside_the_dataset_root_are_never_opened_and_nothing_is_written_outside_the_run(
    synth_small, prefect_harness, tmp_path
):
    from mmcore import images

    data, outside = tmp_path / "data", tmp_path / "outside"
    (data / "images").mkdir(parents=True)
    outside.mkdir()
    good = _healthy_images(synth_small, 3)
    for name in good:
        (data / name).write_bytes((synth_small / name).read_bytes())
    for name in ("secret.png", "abs.png", "linked.png"):
        os.mkfifo(outside / name)
    os.symlink(outside / "linked.png", data / "images" / "link.png")
    # A FIFO inside the root: reading it must fail as a row, not hang the run.
    os.mkfifo(data / "images" / "pipe.png")
    evil = ["../outside/secret.png", "images/../../outside/secret.png", str(outside / "abs.png"), "images/link.png"]
    paths = good + evil + ["images/pipe.png"]
    caption = "a small red circle on the left of the picture number"
    lines = ["image_path,text"] + [f"{p},{caption} {i}" for i, p in enumerate(paths)]
    (data / "manifest.csv").write_text("\n".join(lines) + "\n")

    for p in evil:
        with pytest.raises(images.UnsafePath, match="outside the dataset root"):
            images.resolve_path(data, p)

    from flows.pipeline import pipeline
    from mmcore.config import load_config

    run_dir = tmp_path / "run"
    before = _snapshot(tmp_path)
    watched = [outside / n for n in ("secret.png", "abs.png", "linked.png")] + [data / "images" / "pipe.png"]
    with _FifoWatch(watched) as watch:
        pipeline(load_config(None, [f"data.manifest={data / 'manifest.csv'}", f"out={run_dir}", *SMALL]),
                 until="quality")
    outside_opened = sorted(watch.opened - {"pipe.png"})
    assert not outside_opened, f"opened outside the dataset root: {outside_opened}"
    after = _snapshot(tmp_path)
    changed = {p for p in after if before.get(p) != after[p]}
    assert changed and all(p == "run" or p.startswith("run/") for p in changed), sorted(changed)
    for stage in graph.ORDER[: graph.ORDER.index("quality") + 1]:
        stats = tables.read_json(StagePaths.of(run_dir, stage).stats)
        assert stats["n_kept"] + stats["n_quarantined"] == stats["n_rows"], stage
    q = tables.load(run_dir, "probe", quarantine=True).set_index(tables.IMAGE)[tables.REASON]
    reasons = q.to_dict()
    assert all(reasons.get(p) == "outside_root" for p in evil), reasons
    _record("untrusted", unsafe_paths=len(evil), opened_outside=outside_opened, written_outside_run=[],
            quarantined=reasons)
    # probe reads through faults.open_binary, which refuses a FIFO at once instead of blocking on it.
    assert reasons.get("images/pipe.png") == "read_error", reasons
