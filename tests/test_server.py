"""End to end on a real ``prefect server start``: pool, cron deployment, worker, runs, artifacts.

Everything runs in subprocesses the way a user starts them (own process group each, a
temporary PREFECT_HOME, a free port on 127.0.0.1) and is stopped in ``finally``; the
fixtures then check that no process they started is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from mmcore import tables
from mmcore.errors import ConfigError
from tests.conftest import wait_until

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "demo.yaml"
CRON = "0 3 * * *"
POOL = "mmpipe-test"
N_ROWS = 300  # synth_small
N_LOAD = 8
_WALL: dict[str, float] = {}  # seconds per scenario, printed by the load test (run with -s to see)


@dataclass(frozen=True)
class Server:
    url: str
    env: dict[str, str]
    home: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.is_file() else "(no log)"


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start ``python -m prefect ARGS`` with this venv's Python, in its own process group."""
    with open(log, "ab") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "prefect", *args], cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def _stop(proc: subprocess.Popen) -> list[psutil.Process]:
    """Stop a process group; returns the processes still alive afterwards (should be none).

    SIGINT first, as Ctrl-C would (a worker ignores SIGTERM while it retries a lost
    connection), then SIGKILL for whatever is left in the group (flow-run processes).
    """
    tracked: list[psutil.Process] = []
    with suppress(psutil.NoSuchProcess):
        tracked = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    _signal_group(proc, signal.SIGINT)
    with suppress(subprocess.TimeoutExpired):
        proc.wait(20)
    _signal_group(proc, signal.SIGKILL)
    proc.wait(10)
    _, alive = psutil.wait_procs(tracked, timeout=10)
    return [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]


def _pg_bin(name: str) -> str | None:
    """A PostgreSQL server program: on PATH, or in Debian's versioned folder (not on PATH there)."""
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parts[-3]))
    return str(versions[-1]) if versions else None


@contextmanager
def postgres_cluster() -> Iterator[str]:
    """A PostgreSQL cluster of our own on a free loopback port in a temporary folder; its asyncpg URL.

    ``initdb`` refuses to run as root, so as root the cluster belongs to the ``postgres`` user
    (``runuser``), in a folder that user owns. Stopped (``pg_ctl stop -m fast``) and removed after.
    """
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.fail("PostgreSQL is not installed (initdb, pg_ctl): apt-get install postgresql")
    folder = Path(tempfile.mkdtemp(prefix="mmpipe-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.chown(folder, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = folder / "data", _free_port()

    def run(*args: str) -> None:
        done = subprocess.run([*as_user, *args], capture_output=True, text=True, timeout=120)
        if done.returncode:
            pytest.fail(f"{' '.join(args[:2])} failed ({done.returncode}):\n{done.stdout}{done.stderr}")

    try:
        run(initdb, "-D", str(data), "-U", "prefect", "--auth=trust", "-E", "UTF8", "--no-sync")
        opts = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c max_connections=200 -c fsync=off"
        run(pg_ctl, "-D", str(data), "-o", opts, "-l", str(folder / "postgres.log"), "-w", "-t", "60", "start")
        try:
            run(_pg_bin("createdb") or "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "prefect", "prefect")
            yield f"postgresql+asyncpg://prefect@127.0.0.1:{port}/prefect"
        finally:
            subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"], capture_output=True, timeout=60)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(request, tmp_path_factory):
    """``prefect server start`` on a free loopback port with its own PREFECT_HOME, on SQLite (the
    default) and on a PostgreSQL cluster the fixture starts itself."""
    with contextlib.ExitStack() as stack:
        db = stack.enter_context(postgres_cluster()) if request.param == "postgresql" else None
        yield from _server(tmp_path_factory, db)


def _server(tmp_path_factory, database_url: str | None):
    home = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_LOCAL_STORAGE_PATH": str(home / "storage"),
        "PREFECT_API_URL": url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",  # default 60 s
        "PREFECT_WORKER_QUERY_SECONDS": "2",  # default 10 s; each poll is a write
        # SQLite answers a burst of writes with 503 "database is locked": fewer writers (no
        # "Late" marking of runs a busy machine starts 15 s late) and more client retries.
        "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "false",
        "PREFECT_CLIENT_MAX_RETRIES": "8",
        "PREFECT_LOGGING_LEVEL": "INFO",
        "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL": "0.5",  # default 5 s: events readable sooner
    }
    if database_url is not None:  # PostgreSQL takes concurrent writers: none of SQLite's mitigations
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
        env["PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED"] = "true"
        env.pop("PREFECT_CLIENT_MAX_RETRIES")
    log = home / "server.log"
    proc = _start(["server", "start", "--host", "127.0.0.1", "--port", str(port)], env, log)
    try:
        _wait_healthy(url, proc, log)
        yield Server(url=url, env=env, home=home)
    finally:
        left = _stop(proc)
    assert not left, f"server processes left: {left}"


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 150) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"prefect server exited with {proc.returncode}:\n{_tail(log)}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"prefect server not healthy after {timeout} s:\n{_tail(log)}")


@contextmanager
def _api(server: Server):
    """Point this process's Prefect client at the test server (over any session harness)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: server.url}):
        yield


@dataclass(frozen=True)
class Deployment:
    name: str
    run_dir: Path


@pytest.fixture(scope="module")
def deployment(server, synth_small, tmp_path_factory) -> Deployment:
    """The pool and the cron deployment of the pipeline (until clean, so any stage list is fast)."""
    from deployments.deploy import deploy, ensure_pool

    out = tmp_path_factory.mktemp("deployed") / "run"
    with _api(server):
        assert ensure_pool(POOL) is True
        assert ensure_pool(POOL) is False
        name = deploy(
            CONFIG, CRON, pool=POOL, name="e2e", until="clean",
            overrides=[f"data.manifest={synth_small / 'manifest.csv'}", f"out={out}"],
        )
    assert name == "mmpipe-from-config/e2e"
    return Deployment(name, out)


@pytest.fixture(scope="module")
def worker(server, deployment):
    """``prefect worker start --pool POOL`` from the repo root: flow runs get this venv's Python."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    log = server.home / "worker.log"
    proc = _start(["worker", "start", "--pool", POOL], server.env, log)
    try:
        yield log
    finally:
        left = _stop(proc)
    assert not left, f"worker processes left: {left}"
    new = {p.pid for p in psutil.Process().children(recursive=True)} - before
    assert not new, f"child processes left: {new}"


def _flow_run_ids_under(client, flow_run_id) -> list:
    """The run and its subflow runs (stage artifacts belong to the inner ``mmpipe`` flow run)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    subs = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id]))
    )
    return [flow_run_id, *(r.id for r in subs)]


def _summary(client, flow_run_id) -> dict:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    arts = client.read_artifacts(
        artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["clean-summary"]),
            flow_run_id=ArtifactFilterFlowRunId(any_=_flow_run_ids_under(client, flow_run_id)),
        )
    )
    assert len(arts) == 1 and arts[0].type == "table", arts
    rows = json.loads(arts[0].data) if isinstance(arts[0].data, str) else arts[0].data
    return {r["metric"]: r["value"] for r in rows}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cron_deployment_runs_on_a_worker_and_publishes_artifacts(server, deployment, worker):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.deployments import run_deployment

    with _api(server), get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(deployment.name)
        assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in dep.schedules] == [(CRON, "UTC", True)]
        assert dep.work_pool_name == POOL and dep.entrypoint == "flows/pipeline.py:from_config"
        assert dep.parameters["config"] == str(CONFIG) and dep.parameters["until"] == "clean"
        assert dep.parameters["overrides"][-1] == f"out={deployment.run_dir}"

        # The server's scheduler turns the cron into future runs at 03:00 UTC.
        deadline = time.monotonic() + 60
        scheduled = []
        while not scheduled and time.monotonic() < deadline:
            scheduled = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))),
            )
            time.sleep(1)
        assert scheduled, "the scheduler made no runs from the cron"
        assert {(r.expected_start_time.hour, r.expected_start_time.minute) for r in scheduled} == {(3, 0)}

        t0 = time.perf_counter()
        run = run_deployment(deployment.name, timeout=240, poll_interval=1)
        _WALL["1 run"] = time.perf_counter() - t0
        assert run.state.is_completed(), f"{run.state}\n{_tail(worker)}"
        summary = _summary(client, run.id)

    stats = tables.read_json(tables.StagePaths.of(deployment.run_dir, "clean").stats)
    assert summary["n_rows"] == N_ROWS == summary["n_kept"] + summary["n_quarantined"]
    assert (summary["n_kept"], summary["n_quarantined"]) == (stats["n_kept"], stats["n_quarantined"])


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_eight_runs_started_at_once_all_complete(server, deployment, worker, synth_small, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    base = [f"data.manifest={synth_small / 'manifest.csv'}"]
    outs = [tmp_path / f"run{i}" for i in range(N_LOAD)]
    with _api(server), get_client(sync_client=True) as client:
        t0 = time.perf_counter()
        runs = [
            run_deployment(deployment.name, parameters={"overrides": [*base, f"out={o}"]}, timeout=0) for o in outs
        ]
        pending = {r.id for r in runs}
        deadline = time.monotonic() + 360
        while pending and time.monotonic() < deadline:
            pending = {i for i in pending if not client.read_flow_run(i).state.is_final()}
            time.sleep(1)
        wall = time.perf_counter() - t0
        states = [client.read_flow_run(r.id).state for r in runs]
        assert all(s.is_completed() for s in states), f"{[s.name for s in states]}\n{_tail(worker)}"
        summaries = [_summary(client, r.id) for r in runs]
    one = _WALL.get("1 run", float("nan"))
    print(f"\ndeployment runs until clean, {N_ROWS} rows: 1 run {one:.1f} s, {N_LOAD} at once {wall:.1f} s wall")
    assert all(s["n_rows"] == N_ROWS for s in summaries)
    if "PREFECT_API_DATABASE_CONNECTION_URL" in server.env:  # PostgreSQL: no retries needed, none logged
        assert "database is locked" not in (server.home / "server.log").read_text(errors="replace")
    # Cache keys hold no path: a run may take another folder's result of the same inputs, copied into
    # its own folder. Every folder has its own, complete, identical artifacts either way.
    kept = {tables.file_digest(tables.StagePaths.of(o, "clean").kept) for o in outs}
    assert len(kept) == 1 and all(tables.StagePaths.of(o, "clean").status.is_file() for o in outs)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_typed_deployment_shows_every_setting_and_validates_a_run_s_values(server, deployment, worker, synth_small,
                                                                             tmp_path):
    """``deploy(typed=True)``: the flow's parameter is the config model, so the UI gets a form with
    every section and bound, a run may change a threshold, and a bad value is refused before it runs."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    from deployments.deploy import deploy
    from mmcore import clean as clean_stage
    from mmcore import execute
    from mmcore.config import load_config

    out = tmp_path / "typed"
    sets = [f"data.manifest={synth_small / 'manifest.csv'}", f"out={out}"]
    with _api(server):
        name = deploy(CONFIG, CRON, pool=POOL, name="typed", until="clean", overrides=sets, typed=True)
        assert name == "mmpipe-curate/typed"
        with get_client(sync_client=True) as client:
            dep = client.read_deployment_by_name(name)
        schema = dep.parameter_openapi_schema
        clean = schema["definitions"]["CleanConfig"]["properties"]["min_chars"]
        assert clean["minimum"] == 0 and clean["description"]
        assert set(schema["properties"]["until"]["enum"]) >= {"clean", "split", "report"}
        assert {"QualityConfig", "SplitConfig", "TrainConfig", "EvaluateConfig"} <= set(schema["definitions"])

        cfg = load_config(CONFIG, [*sets, "clean.min_chars=40"]).model_dump(mode="json")
        run = run_deployment(name, parameters={"cfg": cfg}, timeout=240, poll_interval=1)
        assert run.state.is_completed(), f"{run.state}\n{_tail(worker)}"
        stats = tables.read_json(tables.StagePaths.of(out, "clean").stats)
        # The run's value, not the deployment's: as many kept as clean keeps with min_chars=40, fewer than with 5.
        kept = {}
        for value in (40, 5):
            c = load_config(CONFIG, [*sets, f"clean.min_chars={value}"])
            kept[value] = len(clean_stage.run(execute.read_source(c, "clean")[0], c.clean, execute.context(c, False)).kept)
        assert stats["n_rows"] == N_ROWS and stats["n_kept"] == kept[40] < kept[5]

        bad = load_config(CONFIG, sets).model_dump(mode="json")
        bad["clean"]["min_chars"] = -1
        with pytest.raises(Exception, match="min_chars|validat"):
            run_deployment(name, parameters={"cfg": bad}, timeout=60, poll_interval=1)


def _evaluated(run_dir: Path, r5: float) -> Path:
    """A run folder whose evaluate stage measured test i2t R@5 = ``r5`` (the other metrics fixed)."""
    from mmcore.layout import RunLayout

    block = {"retrieval": {"i2t_r1": {"value": 0.2, "low": 0.1, "high": 0.3}, "i2t_r5": {"value": r5, "low": r5 - 0.05,
             "high": r5 + 0.05}, "t2i_r5": {"value": 0.45}}, "zeroshot": {"acc1": {"value": 0.6}}}
    tables.write_json({"test": block, "chance": {"test": {"i2t_r5": 0.01}}}, RunLayout(run_dir).metrics)
    return run_dir


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_regression_fires_the_alert_automation_and_a_small_change_does_not(server, tmp_path):
    """Three nightly evaluations of one deployment: 0.50, then 0.47 (-3 points: no alert), then 0.40
    (-7 points, more than alert.max_drop = 5): the automation fires once, on the third."""
    from uuid import uuid4

    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    from mmcore import alerts
    from tasks import events

    deployment_id = str(uuid4())  # the resource the events are about; the automation watches only it
    cfg = alerts.AlertConfig(metric="test/i2t_r5", max_drop=0.05)
    fired_events = ("prefect.automation.triggered", "prefect.automation.action.triggered")

    with _api(server), get_client(sync_client=True) as client:
        automation = events.ensure_alert(f"mmpipe-regression-{deployment_id[:8]}", cfg, deployment_id=deployment_id)
        assert events.ensure_alert(automation.name, cfg, deployment_id=deployment_id).id == automation.id  # updated

        def fired() -> list:
            flt = EventFilter(event=EventNameFilter(name=list(fired_events)),
                              resource=EventResourceFilter(id=[f"prefect.automation.{automation.id}"]))
            return client.read_events(filter=flt, limit=50).events

        resource_id = events.resource("nightly", deployment_id)["prefect.resource.id"]
        sent = []
        for i, r5 in enumerate((0.50, 0.47, 0.40)):
            run = _evaluated(tmp_path / f"night{i}", r5)
            sent.append(events.publish_evaluation(str(run), cfg, "nightly", deployment_id))
            # The next night's comparison reads this one back from the server's event store.
            wait_until(lambda: events.previous_metrics(resource_id) == sent[-1]["metrics"], "the evaluation event")
            if i < 2:
                time.sleep(2)  # the triggers service has seen the event: no alert may have fired
                assert fired() == [], f"the automation fired after night {i}: {sent[-1]}"

        assert [p["regressed"] for p in sent] == [False, False, True]
        assert sent[0]["change"] == {} and sent[0]["previous"] == {}
        assert sent[1]["change"]["test/i2t_r5"] == pytest.approx(-0.03)
        assert sent[2]["change"]["test/i2t_r5"] == pytest.approx(-0.07)
        assert sent[2]["previous"]["test/i2t_r5"] == pytest.approx(0.47)
        got = wait_until(fired, "the automation to fire")
        assert {e.event for e in got} <= set(fired_events)
        time.sleep(1)
        assert len([e for e in fired() if e.event == "prefect.automation.action.triggered"]) == 1


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_git_deployment_runs_from_a_fresh_clone_and_any_pool_type_is_accepted(server, synth_small, tmp_path):
    """``deploy(git=URL)``: the worker clones the repository for each run (Prefect's git_clone pull
    step) and runs the config from the clone; a docker pool is created with its own job template
    and the deployment carries the image."""
    from prefect.automations import Automation
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    from deployments.deploy import deploy, ensure_pool
    from mmcore import alerts

    if "PREFECT_API_DATABASE_CONNECTION_URL" in server.env:
        pytest.skip("independent of the server's database: runs once, on the SQLite server")
    if not (REPO / ".git").exists():
        pytest.skip("needs the repository's git history (a clone)")
    bare = tmp_path / "mmpipe.git"  # the team's remote, here a bare clone of this checkout's HEAD
    subprocess.run(["git", "clone", "-q", "--bare", str(REPO), str(bare)], check=True, timeout=120)
    branch = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--abbrev-ref", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    out = tmp_path / "run"
    pool = "mmpipe-git"
    with _api(server):
        name = deploy(CONFIG, CRON, pool=pool, name="from-git", until="clean", git=f"file://{bare}", branch=branch,
                      overrides=[f"data.manifest={synth_small / 'manifest.csv'}", f"out={out}"])
        assert ensure_pool("mmpipe-docker", "docker") is True
        docker = deploy(CONFIG, CRON, pool="mmpipe-docker", name="in-docker", until="clean", git=f"file://{bare}",
                        branch=branch, image="mmpipe:0.1.0", alert=alerts.AlertConfig(max_drop=0.1))
        with get_client(sync_client=True) as client:
            dep = client.read_deployment_by_name(name)
            assert dep.parameters["config"] == "configs/demo.yaml"  # read from the clone, not this checkout
            assert any("git_clone" in str(step) for step in dep.pull_steps), dep.pull_steps
            in_docker = client.read_deployment_by_name(docker)
            assert client.read_work_pool("mmpipe-docker").type == "docker"
            assert in_docker.job_variables == {"image": "mmpipe:0.1.0"}
        # --alert-drop: the regression automation watches that deployment only.
        automation = Automation.read(name=f"{docker} regression")
        assert automation.trigger.match.root == {"prefect.resource.id": f"mmpipe.deployment.{in_docker.id}"}
        assert automation.trigger.expect == {alerts.REGRESSED} and "0.1" in automation.description
        # ... and the runs send the regression event at that threshold, not the default one.
        assert in_docker.parameters["overrides"][-2:] == ["alert.metric=test/i2t_r5", "alert.max_drop=0.1"]
        # The same from the repository's prefect.yaml, as `prefect deploy` reads it.
        ensure_pool("mmpipe")
        env = {**server.env, "MMPIPE_GIT_URL": f"file://{bare}", "MMPIPE_MANIFEST": str(synth_small / "manifest.csv"),
               "MMPIPE_OUT": str(tmp_path / "nightly")}
        done = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--name", "nightly"], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        with get_client(sync_client=True) as client:
            nightly = client.read_deployment_by_name("mmpipe-from-config/nightly")
        assert nightly.pull_steps[0]["prefect.deployments.steps.git_clone"]["repository"] == f"file://{bare}"
        assert nightly.parameters["overrides"] == [f"data.manifest={synth_small / 'manifest.csv'}", f"out={tmp_path / 'nightly'}"]
        assert [(s.schedule.cron, s.schedule.timezone) for s in nightly.schedules] == [(CRON, "UTC")]
        log = server.home / "worker-git.log"
        worker = _start(["worker", "start", "--pool", pool], server.env, log)
        try:
            run = run_deployment(name, timeout=240, poll_interval=1)
            assert run.state.is_completed(), f"{run.state}\n{_tail(log)}"
        finally:
            left = _stop(worker)
    assert not left, f"worker processes left: {left}"
    stats = tables.read_json(tables.StagePaths.of(out, "clean").stats)
    assert stats["n_kept"] + stats["n_quarantined"] == N_ROWS


def test_deploy_rejects_bad_config_and_cron_in_one_line(tmp_path):
    from deployments.deploy import deploy

    with pytest.raises(ConfigError, match=r"^config file not found: .*nope\.yaml$"):
        deploy(tmp_path / "nope.yaml", CRON)
    with pytest.raises(ConfigError, match=r"unknown config key 'clean.min_char'"):
        deploy(CONFIG, CRON, overrides=["clean.min_char=3"])
    with pytest.raises(ConfigError, match=r"^--cron '61 3 \* \* \*': invalid cron string; expected 5 fields"):
        deploy(CONFIG, "61 3 * * *")
    with pytest.raises(ConfigError, match=r"^until: unknown stage 'cleanup'; expected one of clean, "):
        deploy(CONFIG, CRON, until="cleanup")


def test_deploy_without_a_server_says_how_to_start_one():
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from deployments.deploy import deploy

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        with pytest.raises(ConfigError, match=r"^PREFECT_API_URL is not set: start a server"):
            deploy(CONFIG, CRON)


def test_relative_path_overrides_are_made_absolute_where_deploy_runs(tmp_path, monkeypatch):
    from deployments.deploy import _absolute_overrides

    monkeypatch.chdir(tmp_path)
    got = _absolute_overrides(["out=runs/x", "data.manifest=/abs/m.csv", "clean.min_chars=3", "data.root=img"])
    assert got == [f"out={tmp_path / 'runs/x'}", "data.manifest=/abs/m.csv", "clean.min_chars=3", f"data.root={tmp_path / 'img'}"]
    # Every path field of the config, nested sections too, not a hand-kept list.
    paths = ["quality.alignment_model=clip", "train.model_path=m", "train.tokenizer_path=t.json", "train.synonyms=s.yaml"]
    assert _absolute_overrides(paths) == [f"{k}={tmp_path / v}" for k, v in (p.split("=") for p in paths)]
