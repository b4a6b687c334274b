"""Deploy the pipeline to a Prefect server: ``flows/pipeline.py:from_config`` on a cron, on a process pool.

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

from mmcore.config import load_config, parse_override, path_keys
from mmcore.errors import ConfigError
from mmcore.graph import ORDER as STAGES

REPO = Path(__file__).resolve().parents[1]
ENTRYPOINT = "flows/pipeline.py:from_config"
FLOW_NAME = "mmpipe-from-config"
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


def ensure_pool(pool: str) -> bool:
    """Create the ``process`` work pool ``pool`` if missing; True if it was created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            existing = client.read_work_pool(pool)
        except ObjectNotFound:
            template = ProcessWorker.get_default_base_job_template()
            client.create_work_pool(WorkPoolCreate(name=pool, type="process", base_job_template=template))
            return True
    if existing.type != "process":
        raise ConfigError(f"--pool {pool!r}: work pool exists with type {existing.type!r}, expected 'process'")
    return False


def deploy(
    config: Path,
    cron: str,
    pool: str = "mmpipe",
    name: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    until: str = "report",
) -> str:
    """Register (or update) a cron deployment of the pipeline; returns ``"mmpipe-from-config/<name>"``.

    Args:
        config: pipeline YAML; validated now, read again by every run.
        cron: five-field cron in UTC, e.g. ``"0 3 * * *"``.
        pool: process work pool, created if missing.
        name: deployment name; default the config's ``run_name``.
        overrides: ``key.sub=value`` items applied on top of the YAML at each run.
    """
    config = Path(os.path.abspath(config))
    overrides = _absolute_overrides(list(overrides))
    cfg = load_config(config, overrides)  # a bad config fails here, in one line, not at 3 a.m.
    if until not in STAGES:
        raise ConfigError(f"until: unknown stage {until!r}; expected one of {', '.join(STAGES)}")
    check_cron(cron)
    name = name or cfg.run_name
    _api_url()
    ensure_pool(pool)

    from prefect.schedules import Cron

    from flows.pipeline import from_config

    source = from_config.from_source(source=str(REPO), entrypoint=ENTRYPOINT)
    source.deploy(
        name=name,
        work_pool_name=pool,
        schedules=[Cron(cron, timezone="UTC")],
        parameters={"config": str(config), "overrides": overrides, "until": until},
        description=f"mmpipe on {config.name} until {until}, cron {cron!r} (UTC)",
        tags=["mmpipe"],
        build=False,
        push=False,
        print_next_steps=False,
        ignore_warnings=True,
    )
    return f"{FLOW_NAME}/{name}"
