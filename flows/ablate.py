"""The ablation flow: curation variants at equal training steps, all tested on one fixed test set.

Reads as DataComp's protocol: fix the test set (the baseline's test split, or a given evaluation
manifest), curate every variant with that test set kept off its train and val, fix the training
steps, train each variant (x seeds) and evaluate it on the same test rows, then one table. Stages
that a variant shares with another (same inputs, config and code) come from cache: a variant that
changes only quality re-runs from quality on.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from mmcore import ablation, graph, runlock
from mmcore.config import PipelineConfig
from mmcore.layout import RunLayout
from tasks import stages
from tasks.common import StageOutput, run_cached

# The last curation stage: the one whose kept table train reads (split, then pseudo-labels).
CURATED = graph.stage("train").input


def _upstream(s: str, done: dict[str, StageOutput]) -> dict[str, StageOutput]:
    return {r: done[r] for r in graph.stage(s).reads if r in done}


def _stages(cfg: PipelineConfig, until: str) -> dict[str, StageOutput]:
    """The graph's stages up to ``until`` in ``cfg``'s run folder, without the report (the ablation's comes last)."""
    out: dict[str, StageOutput] = {}
    for s in graph.plan(until)[:-1]:
        out[s.name] = run_cached(stages.STAGE_TASKS[s.name], cfg, {r: out[r] for r in s.reads if r in out})
    return out


@flow(name="mmpipe-ablate", flow_run_name="mmpipe-ablate-{cfg.run_name}", log_prints=True, validate_parameters=False)
def ablate(
    cfg: PipelineConfig,
    variants: dict[str, PipelineConfig],
    baseline: str,
    seeds: int = 1,
    steps: int | None = None,
    test_manifest: Path | None = None,
) -> Path:
    """Curate, train (``seeds`` training seeds, the same steps) and evaluate every variant on one fixed test set.

    Args:
        cfg: the baseline's config, in the ablation's run folder (its curation defines the test set).
        variants: name -> config (validated by ``mmcore.ablation.variant_configs``).
        steps: training steps of every variant; default: derived from the baseline's train split.
        test_manifest: an evaluation manifest whose curated rows are the test set instead.
    """
    layout = RunLayout(cfg.run_dir)
    if next(iter(variants)) != baseline:
        raise ValueError(f"ablate: the baseline {baseline!r} must be the first variant (its train split sets the steps)")
    for v in variants.values():  # remote inputs (URLs) mirrored to local disk first
        stages.fetch_inputs(v)
    with runlock.hold(cfg.run_dir, cfg.data.image_root, graph.ORDER):
        stages.save_config(cfg)
        # 1. The fixed test set: the baseline's test split, or the curated evaluation manifest.
        test_cfg = ablation.test_set_config(cfg, test_manifest) if test_manifest is not None else cfg
        test = _stages(test_cfg, CURATED)
        held = stages.held_out(cfg, test["split"], test_cfg)

        # 2. Each variant (the baseline first), per training seed: curate with the test set quarantined
        # (held_out_test; train and val share the rest; shared stages come from cache), train the same
        # steps (3. equal compute: the baseline's train split sets them once), test on the fixed rows.
        runs: dict[str, list[str]] = {}
        compute: tuple[int, int] | None = None  # (steps, batch size): the baseline's, for every variant
        for name, v in variants.items():
            for k in range(seeds):
                n_steps = compute[0] if compute else steps
                curated = _stages(ablation.for_variant(v, layout.variant(name, k), held, n_steps, cfg.seed + k), CURATED)
                compute = compute or stages.ablation_compute(variants[baseline], curated[CURATED], steps)
                vk = ablation.for_variant(v, layout.variant(name, k), held, compute[0], cfg.seed + k, compute[1])
                stages.save_config(vk)
                model = run_cached(stages.STAGE_TASKS["train"], vk, _upstream("train", curated))
                run_cached(stages.STAGE_TASKS["evaluate"], ablation.for_evaluation(vk, test_cfg),
                           _upstream("evaluate", {**test, "train": model}))
                runs.setdefault(name, []).append(str(vk.run_dir))

        # 4. One table (leakage, same test rows and equal steps checked first), then the run's report.
        path = stages.ablation(cfg, runs, baseline)
        main = _stages(ablation.for_variant(cfg, cfg.run_dir, held, None, cfg.seed), CURATED) if test_manifest else test
        run_cached(stages.STAGE_TASKS["report"], cfg, {CURATED: main[CURATED]})
    return path
