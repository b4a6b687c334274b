"""The external-evaluation task: a model on another dataset's curated table, cached by content."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import TASK_SOURCE, CachePolicy
from prefect.context import TaskRunContext

from mmcore import evaluate, tables
from mmcore.base import DataConfig, StageContext
from mmcore.config import PipelineConfig
from mmcore.digests import dir_digest
from mmcore.layout import METRICS_FILE, RunLayout
from mmcore.provenance import code_digest
from tasks.common import CACHE_SCHEME, StageOutput, StageOutputSerializer, guard_record, is_transient


def _model(own: PipelineConfig, model: Path | None) -> Path:
    return Path(model) if model is not None else RunLayout(own.run_dir).model


def _baseline(own: PipelineConfig) -> Path | None:
    if not own.evaluate.baseline:
        return None
    return own.evaluate.baseline_model or evaluate.train_source(own.run_dir)


def _key(ctx: TaskRunContext, params: dict[str, Any]) -> str:
    own: PipelineConfig = params["own"]
    baseline = _baseline(own)
    key = tables.text_digest(
        CACHE_SCHEME, "evaluate-external", params["name"], code_digest("mmcore.evaluate"),
        own.evaluate.model_dump_json(), params["data"].model_dump_json(), str(own.seed), str(own.run_dir),
        params["curated"].kept_digest, dir_digest(_model(own, params.get("model"))),
        dir_digest(baseline) if baseline is not None else "no baseline",
    )
    guard_record(key)  # never unpickle: only mmpipe's JSON record may be read under this key
    return key


@task(name="evaluate-external", cache_policy=CachePolicy.from_cache_key_fn(_key) + TASK_SOURCE,
      retries=2, retry_delay_seconds=1, retry_condition_fn=is_transient, persist_result=True,
      result_serializer=StageOutputSerializer())
def external_evaluate(own: PipelineConfig, data: DataConfig, curated: StageOutput, name: str,
                      model: Path | None = None) -> Path:
    """Embed and score the curated rows of another dataset with a model (default: the run's); its metrics file.

    Args:
        model: a model folder (saved by mmpipe, or any local Hugging Face CLIP) instead of the run's.
    """
    ctx = StageContext(data=data, run_dir=own.run_dir, seed=own.seed, workers=own.n_workers, progress=True,
                       run_name=own.run_name)
    encoder = None
    if model is not None:
        from mmcore.clip_model import Encoder  # torch-heavy: only when a model folder is given

        encoder = Encoder.load(model, device=evaluate.resolve_device(own.evaluate.device), where="--model")
    evaluate.run_external(tables.read_parquet(curated.paths.kept), own.evaluate, ctx, name, encoder=encoder)
    return RunLayout(own.run_dir).external(name) / METRICS_FILE
