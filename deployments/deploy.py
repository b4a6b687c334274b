"""Deploy the pipeline to a Prefect server: ``flows/pipeline.py:from_config`` on a cron, on any work pool.

The deployment stores the config *path* (made absolute) and the overrides, not the config:
``from_config`` reads the YAML when each run starts, so edits apply to the next run. Runs
start in the repository root (the source is this checkout, pulled by no one: a local
directory), so relative paths inside the YAML resolve there, as with ``mmpipe run`` from it.
A worker started with this project's ``.venv/bin/prefect worker start --pool NAME`` runs them
with the venv's Python, so ``mmcore``, ``tasks`` and ``flows`` import.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import ValidationError

from mmcore.alerts import AlertConfig
from mmcore.config import load_config, parse_override, path_keys, portable
from mmcore.errors import ConfigError
from mmcore.graph import ORDER as STAGES

REPO = Path(__file__).resolve().parents[1]
ENTRYPOINT = "flows/pipeline.py:from_config"
FLOW_NAME = "mmpipe-from-config"
TYPED_ENTRYPOINT = "flows/pipeline.py:curate"  # the config as typed parameters (a form in the UI)
TYPED_FLOW_NAME = "mmpipe-curate"
# Override keys holding paths: a relative one is made absolute against the directory deploy()
# runs in, as `mmpipe run` would read it, not against the worker's directory.
PATH_KEYS = path_keys()


def check_cron(cron: str) -> str:
    """The cron string if Prefect's scheduler accepts it, else a one-line ConfigError."""
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=cron)
    except ValidationError as e:
        msg = str(e.errors()[0]["msg"]).removeprefix("Value error, ").split(":")[0].lower()
        raise ConfigError(f"--cron {cron!r}: {msg}; expected 5 fields like '0 3 * * *' (minute hour day month weekday)") from None
    return cron


def _absolute_overrides(overrides: list[str] | tuple[str, ...]) -> list[str]:
    out = []
    for item in overrides:
        key, value = parse_override(item)
        if key in PATH_KEYS and isinstance(value, str) and value and not os.path.isabs(value):
            item = f"{key}={os.path.abspath(value)}"
        out.append(item)
    return out


def _api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        # Without a server the client would deploy into a throwaway in-process one: no scheduler, no worker.
        raise ConfigError(
            "PREFECT_API_URL is not set: start a server (prefect server start) and "
            "export PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    return url


def ensure_pool(pool: str, pool_type: str = "process") -> bool:
    """Create the work pool ``pool`` of ``pool_type`` if missing; True if it was created.

    An existing pool is used whatever its type (process, docker, kubernetes, a cloud's): its
    workers run the deployment. A missing one is created with its type's default job template
    (Prefect's worker metadata; the type's worker package must be known to Prefect).
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.utilities.asyncutils import run_coro_as_sync
    from prefect.workers.utilities import get_default_base_job_template_for_infrastructure_type

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
            return False
        except ObjectNotFound:
            pass
        template = run_coro_as_sync(get_default_base_job_template_for_infrastructure_type(pool_type))
        if template is None:
            raise ConfigError(f"--pool-type {pool_type!r}: no job template known for this work pool type; create the "
                              f"pool first (prefect work-pool create {pool} --type {pool_type})")
        client.create_work_pool(WorkPoolCreate(name=pool, type=pool_type, base_job_template=template))
    return True


def _git_config(config: Path, git: str) -> str:
    """The config's path inside the repository (runs of a git deployment start in a fresh clone)."""
    try:
        return config.relative_to(REPO).as_posix()
    except ValueError:
        raise ConfigError(f"--git: the config must be a file of this repository (runs read it from the clone of "
                          f"{git}), got {config}") from None


def deploy(
    config: Path,
    cron: str,
    pool: str = "mmpipe",
    name: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    until: str = "report",
    *,
    pool_type: str = "process",
    git: str | None = None,
    branch: str = "main",
    image: str | None = None,
    alert: AlertConfig | None = None,
    typed: bool = False,
) -> str:
    """Register (or update) a cron deployment of the pipeline; returns ``"FLOW/<name>"`` (``mmpipe-from-config``,
    or ``mmpipe-curate`` when typed).

    Args:
        config: pipeline YAML; validated now, read again by every run.
        cron: five-field cron in UTC, e.g. ``"0 3 * * *"``.
        pool: work pool of any type; created with ``pool_type`` if missing.
        name: deployment name; default the config's ``run_name``.
        overrides: ``key.sub=value`` items applied on top of the YAML at each run.
        git: a git URL: each run starts in a fresh clone of ``branch`` (Prefect's git pull step),
            so workers need no checkout of their own; without it, runs start in this checkout.
        image: container image for docker and kubernetes pools (the ``image`` job variable): one
            built from this repository's Dockerfile.
        alert: also create the automation ``"<deployment> regression"`` that fires when this
            deployment's evaluation regresses (``tasks.events.ensure_alert``), and set the runs'
            ``alert`` settings to it (they decide what a regression is); the automation's action
            records the alert; add a notification in the UI (or ``ensure_alert(actions=...)``).
        typed: deploy ``flows/pipeline.py:curate`` with the resolved config as its typed ``cfg``
            parameter: the Prefect UI shows a validated form of every setting (edit a run's
            thresholds there); the YAML is read once, now. Default: ``from_config``, which reads
            the YAML at every run.
    """
    config = Path(os.path.abspath(config))
    overrides = _absolute_overrides(list(overrides))
    if alert is not None:  # the runs decide what a regression is: they get the threshold the automation says
        overrides += [f"alert.metric={alert.metric}", f"alert.max_drop={alert.max_drop}"]
    cfg = load_config(config, overrides)  # a bad config fails here, in one line, not at 3 a.m.
    if until not in STAGES:
        raise ConfigError(f"until: unknown stage {until!r}; expected one of {', '.join(STAGES)}")
    check_cron(cron)
    config_param = _git_config(config, git) if git else str(config)
    name = name or cfg.run_name
    _api_url()
    ensure_pool(pool, pool_type)

    from prefect.runner.storage import GitRepository
    from prefect.schedules import Cron

    from flows.pipeline import curate, from_config

    storage = GitRepository(url=git, branch=branch, pull_interval=None) if git else str(REPO)
    entrypoint = TYPED_ENTRYPOINT if typed else ENTRYPOINT
    flow_obj = curate if typed else from_config
    try:
        source = flow_obj.from_source(source=storage, entrypoint=entrypoint)
    except Exception as e:  # a clone that failed (bad URL, branch): one line, not git's traceback
        raise ConfigError(f"--git {git!r} (branch {branch!r}): cannot load {entrypoint}: {str(e).splitlines()[0]}") from None
    if typed:
        parameters = {"cfg": portable(cfg), "until": until}  # remote locations as URLs, not this machine's copies
    else:
        parameters = {"config": config_param, "overrides": overrides, "until": until}
    deployment_id = source.deploy(
        name=name,
        work_pool_name=pool,
        schedules=[Cron(cron, timezone="UTC")],
        parameters=parameters,
        job_variables={"image": image} if image else None,
        description=f"mmpipe on {config.name} until {until}, cron {cron!r} (UTC)",
        tags=["mmpipe"],
        build=False,
        push=False,
        print_next_steps=False,
        ignore_warnings=True,
    )
    if alert is not None:
        from tasks.events import ensure_alert

        ensure_alert(f"{TYPED_FLOW_NAME if typed else FLOW_NAME}/{name} regression", alert, deployment_id=str(deployment_id))
    return f"{TYPED_FLOW_NAME if typed else FLOW_NAME}/{name}"
