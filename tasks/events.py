"""Prefect events after every evaluation, and the automation that turns a regression into an alert.

After evaluate (its ``on_completion`` hook, so a cached evaluation reports too), ``publish_evaluation``
sends ``mmpipe.evaluate.completed`` with the headline metrics and their change from the previous
evaluation of the same resource, and ``mmpipe.evaluate.regressed`` when the watched metric fell by
more than ``alert.max_drop`` (``mmcore.alerts``). The resource is the deployment when the
run belongs to one (``mmpipe.deployment.<id>``: a nightly deployment is compared with last night),
else the run's name (``mmpipe.run.<run_name>``). The previous metrics are read back from Prefect's
own event store, so any worker sees them, whatever disk it has.

``ensure_alert`` creates (or updates) the Prefect automation that fires on the regression event.
An event or an alert never fails a run: errors are logged.
"""

from __future__ import annotations

import logging
from typing import Any

from mmcore import alerts, tables
from mmcore.layout import RunLayout

log = logging.getLogger("mmpipe.events")


def resource(run_name: str, deployment_id: str | None = None) -> dict[str, str]:
    """The Prefect resource an evaluation is about: its deployment, or its run name."""
    if deployment_id:
        return {"prefect.resource.id": f"mmpipe.deployment.{deployment_id}", "prefect.resource.name": run_name,
                "mmpipe.run-name": run_name}
    return {"prefect.resource.id": f"mmpipe.run.{run_name}", "prefect.resource.name": run_name,
            "mmpipe.run-name": run_name}


def previous_metrics(resource_id: str) -> dict[str, float] | None:
    """The headline metrics of the last ``mmpipe.evaluate.completed`` event of ``resource_id``, or None."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventOrder, EventResourceFilter

    flt = EventFilter(event=EventNameFilter(name=[alerts.COMPLETED]), resource=EventResourceFilter(id=[resource_id]),
                      order=EventOrder.DESC)
    with get_client(sync_client=True) as client:
        page = client.read_events(filter=flt, limit=1)
    if not page.events:
        return None
    metrics = page.events[0].payload.get("metrics")
    return {str(k): float(v) for k, v in metrics.items()} if isinstance(metrics, dict) else None


def publish_evaluation(run_dir: str, cfg: alerts.AlertConfig, run_name: str,
                       deployment_id: str | None = None) -> dict[str, Any] | None:
    """Send the evaluation's events; the payload sent (None without metrics or events)."""
    from prefect.events import Event

    path = RunLayout(run_dir).metrics
    if not path.is_file():
        return None
    current = alerts.headline(tables.read_json(path))
    res = resource(run_name, deployment_id)
    payload = alerts.payload(current, previous_metrics(res["prefect.resource.id"]), cfg)
    events = [Event(event=alerts.COMPLETED, resource=res, payload=payload)]
    if payload["regressed"]:
        watched = cfg.metric
        log.warning("%s fell from %.4f to %.4f (more than %.4f): sending %s", watched, payload["previous"][watched],
                    current[watched], cfg.max_drop, alerts.REGRESSED)
        events.append(Event(event=alerts.REGRESSED, resource=res, payload=payload, follows=events[0].id))
    _send(events)
    return payload


def _send(events: list) -> None:
    """Send ``events`` to the server the current settings name, now. Not ``emit_event``: its
    background worker is one per process, bound to the first server it saw, so a process that
    talks to several servers (a test session, a worker after a settings change) would send these
    to the wrong one, and they may still be queued when the hook returns."""
    from prefect.events.clients import get_events_client
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def go() -> None:
        async with get_events_client(reconnection_attempts=3) as client:
            for e in events:
                await client.emit(e)

    run_coro_as_sync(go())


def publish_events(task, task_run, state) -> None:
    """on_completion hook of evaluate: ``publish_evaluation`` for the run, never failing it."""
    from prefect.context import FlowRunContext
    from prefect.runtime import deployment

    from mmcore.config import PipelineConfig, load_config
    from tasks.common import StageOutput

    try:
        out = state.result(raise_on_failure=False)
        if not isinstance(out, StageOutput):
            return
        # The run's own config: a cache hit's output names the run folder that computed it, whose
        # config (run name, alert settings) is another run's.
        flow_run = FlowRunContext.get()
        cfg = flow_run.parameters.get("cfg") if flow_run is not None else None
        if not isinstance(cfg, PipelineConfig):
            cfg = load_config(RunLayout(out.run_dir).config)
        publish_evaluation(out.run_dir, cfg.alert, cfg.run_name, deployment.id)
    except Exception as e:  # an event is news about a run, never a reason for it to fail
        log.warning("evaluation events not sent: %s", e)


def ensure_alert(name: str, cfg: alerts.AlertConfig | None = None, deployment_id: str | None = None,
                 actions: list | None = None):
    """Create or update the automation ``name`` that fires on ``mmpipe.evaluate.regressed``.

    Args:
        deployment_id: only this deployment's regressions (default: any mmpipe resource).
        actions: Prefect automation actions (default: ``DoNothing``, which only records that it fired;
            use ``SendNotification`` with a notification block for an e-mail or a chat message).
    """
    from prefect.automations import Automation, DoNothing, EventTrigger, Posture

    match = {"prefect.resource.id": f"mmpipe.deployment.{deployment_id}" if deployment_id else "mmpipe.*"}
    cfg = cfg or alerts.AlertConfig()
    trigger = EventTrigger(expect={alerts.REGRESSED}, match=match, posture=Posture.Reactive, threshold=1, within=0)
    spec = dict(name=name, description=f"{cfg.metric} fell by more than {cfg.max_drop} from the previous evaluation",
                trigger=trigger, actions=actions or [DoNothing()])
    try:
        found = Automation.read(name=name)
    except ValueError:
        found = None
    if found is None:
        return Automation(**spec).create()
    for k, v in spec.items():
        setattr(found, k, v)
    found.update()
    return found
