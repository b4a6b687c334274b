"""The ``mmpipe`` command line.

Prefect and torch are imported inside the commands that need them, so ``--help`` is instant.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import sys
from importlib import resources
from pathlib import Path
from typing import Annotated, Optional

import typer

from mmcore import graph, tables
from mmcore.errors import MMPipeError
from mmcore.layout import RunLayout

# The demo's config ships inside this package, so `mmpipe demo` works from any directory.
DEMO_CONFIG = Path(str(resources.files("mmpipe") / "configs" / "demo.yaml"))

app = typer.Typer(
    name="mmpipe",
    help=(
        "Curate image-text data and train and evaluate CLIP-style models as one cached Prefect pipeline: "
        "clean -> probe -> quality -> split -> train -> evaluate -> report.\n\n"
        "Start with `mmpipe demo`, then `mmpipe inspect runs/demo`."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _one_line_errors(fn):
    """Turn mmpipe's user errors into one line on stderr and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MMPipeError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None

    return wrapper


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _terminal_safe(text: str) -> str:
    """``text`` with control characters (ANSI escapes, C1 codes, bidi overrides) shown as ``\\xNN``:
    captions and paths are scraped data and must not drive the user's terminal."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256 else f"\\u{ord(m.group()):04x}", text)


class _UserErrorsInOneLine(logging.Filter):
    """Prefect logs a failed task's or flow's exception with its traceback; for mmpipe's user errors
    (printed as one line by the CLI) the traceback is dropped, the message kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], MMPipeError):
            record.exc_info, record.exc_text = None, None
        return True


def _quiet_user_errors() -> None:
    for name in ("prefect.task_runs", "prefect.flow_runs", "prefect.task_engine", "prefect.flow_engine"):
        logging.getLogger(name).addFilter(_UserErrorsInOneLine())


def _setup_prefect_env() -> None:
    # Keep Prefect's database, results and cache records out of the user's home unless they
    # chose a place (PREFECT_HOME or a server via PREFECT_API_URL).
    os.environ.setdefault("PREFECT_HOME", str(Path.cwd() / ".prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    # mmcore's own warnings (read retries) go to Prefect's console and to the run's logs.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "mmcore,mmpipe")  # read retries, events, torchrun output
    # The temporary server can take longer than Prefect's 20 s to start on a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)


@app.command()
@_one_line_errors
def synth(
    out: Annotated[Path, typer.Argument(help="Folder to write images/, manifest.csv and planted.csv into.")],
    n: Annotated[int, typer.Option("--n", min=120, help="Number of image-caption rows.")] = 3000,
    seed: Annotated[int, typer.Option(help="Random seed; the same n and seed give the same bytes.")] = 0,
    mismatch_rate: Annotated[
        float, typer.Option(min=0, max=0.5, help="Share of rows given the caption of another scene (alignment noise).")
    ] = 0.0,
    foreign_rate: Annotated[
        float, typer.Option(min=0, max=0.5, help="Share of rows given a French, German or Spanish caption.")
    ] = 0.0,
    uncaptioned_rate: Annotated[
        float, typer.Option(min=0, max=0.5, help="Share of rows whose caption is emptied (work for the pseudo stage).")
    ] = 0.0,
) -> None:
    """Generate the built-in synthetic dataset (shapes with compositional captions, ~10% planted defects)."""
    from mmcore import synth as synth_mod

    m = synth_mod.generate(out, n=n, seed=seed, mismatch_rate=mismatch_rate, foreign_rate=foreign_rate,
                            uncaptioned_rate=uncaptioned_rate)
    typer.echo(f"wrote {len(m)} rows to {out / 'manifest.csv'} (images in {out / 'images'}, defects in planted.csv)")


def _run(cfg, until: str, runner: str = "local", address: str | None = None, workers: int | None = None) -> None:
    from mmcore import clean, storage
    from mmcore.config import check_paths

    if runner not in ("local", "dask"):
        raise MMPipeError(f"--runner: expected 'local' or 'dask', got {runner!r}")
    for line in (m.line() for m in storage.sync_inputs(cfg.data)):  # remote inputs: their local mirror first
        typer.echo(f"mirror: {line}")
    clean.check_columns(cfg.data)  # a missing column is a one-line error before Prefect starts
    check_paths(cfg)  # so is a configured file or folder that does not exist
    _setup_prefect_env()
    from flows.pipeline import with_runner
    from flows.server import temporary_server

    _quiet_user_errors()
    with temporary_server():  # stopped with this process, even if it is killed
        with_runner(runner, address, workers)(cfg, until=until)
    typer.echo("")
    _print_overview(cfg.run_dir)
    typer.echo(f"\nartifacts: {cfg.run_dir}" + (f" (uploaded to {url})" if (url := storage.url_of(cfg.run_dir)) else ""))
    run = RunLayout(cfg.run_dir)
    if run.metrics.is_file() and "evaluate" in [s.name for s in graph.plan(until)]:
        from mmcore import evaluate as evaluate_mod

        rob = tables.read_parquet(run.robustness) if run.robustness.is_file() else None
        typer.echo("\n" + evaluate_mod.summary_markdown(tables.read_json(run.metrics), rob))
        typer.echo(f"spot-check: {run.spotcheck_html} (fill {run.spotcheck_csv.name}, then `mmpipe verdicts`)")
    html = run.report
    if html.is_file():
        typer.echo(f"report:    {html}")


@app.command()
@_one_line_errors
def run(
    config: Annotated[Path, typer.Argument(help="Pipeline config (YAML); see configs/demo.yaml.")],
    set_: Annotated[
        Optional[list[str]], typer.Option("--set", help="Override a config key, e.g. --set clean.min_words=3 (repeatable).")
    ] = None,
    until: Annotated[str, typer.Option(help=f"Last stage to run: {', '.join(graph.ORDER)}.")] = "report",
    out: Annotated[Optional[str], typer.Option(help="Run folder (overrides the config's `out`): a path, or a URL "
                                              "(s3://bucket/runs/NAME) the run uploads each stage to.")] = None,
    preset: Annotated[
        Optional[list[str]],
        typer.Option(help="Layer a named config preset (mmcore/data/presets/NAME.yaml, e.g. datacomp_basic) on the "
                     "config, before --set (repeatable)."),
    ] = None,
    runner: Annotated[
        str, typer.Option(help="Where tasks run: 'local' (threads and process pools) or 'dask' (a Dask cluster).")
    ] = "local",
    address: Annotated[
        Optional[str], typer.Option(help="With --runner dask: an existing scheduler, e.g. tcp://10.0.0.5:8786.")
    ] = None,
    workers: Annotated[
        Optional[int], typer.Option(min=1, help="With --runner dask and no --address: LocalCluster worker processes.")
    ] = None,
) -> None:
    """Run the pipeline flow; stages whose inputs, config and code are unchanged come from cache.

    With --runner dask the image work of probe and quality (and training shards) runs as batches on a
    Dask cluster; artifacts are byte-identical to the local runner's. Image paths must resolve on
    every worker (shared storage).
    """
    from mmcore.config import load_config

    if until not in graph.STAGES:
        raise MMPipeError(f"--until: unknown stage {until!r}; expected one of {', '.join(graph.ORDER)}")
    from mmcore import runlock

    overrides = list(set_ or []) + ([f"out={out}"] if out is not None else [])
    cfg = load_config(config, overrides, list(preset or []))
    runlock.check_run_dir(cfg.run_dir, cfg.data.image_root)  # a file, /, the dataset: one line, before Prefect
    _run(cfg, until, runner, address, workers)


@app.command()
@_one_line_errors
def demo(
    out: Annotated[Path, typer.Option(help="Run folder; the synthetic data goes to OUT/data.")] = Path("runs/demo"),
    n: Annotated[int, typer.Option("--n", min=120, help="Synthetic rows.")] = 3000,
    seed: Annotated[int, typer.Option(help="Seed for the data and the run.")] = 0,
    until: Annotated[str, typer.Option(help="Last stage to run.")] = "report",
) -> None:
    """Generate the synthetic dataset and run every stage on it with the demo config (configs/demo.yaml), on CPU."""
    from mmcore import synth as synth_mod
    from mmcore.config import load_config

    data = out / "data"
    marker = data / "synth.json"
    want = {"n": n, "seed": seed, "version": synth_mod.VERSION}
    # Regenerate only when asked for other data: new files would change the probe's fingerprint.
    if not marker.is_file() or json.loads(marker.read_text()) != want:
        typer.echo(f"generating {n} synthetic rows in {data} ...")
        synth_mod.generate(data, n=n, seed=seed)
        tables.write_json(want, marker)
    # The synthetic "benchmark" (a reference set with copies planted in the pool): decontam finds them.
    benchmark = data / synth_mod.BENCH_DIR / "manifest.csv"
    cfg = load_config(DEMO_CONFIG, [f"data.manifest={data / 'manifest.csv'}", f"out={out}", f"seed={seed}",
                                    f"decontam.reference_sets.benchmark.manifest={benchmark}"])
    _run(cfg, until)


def _stage_rows(run_dir: Path) -> list[dict]:
    rows = []
    for stage in graph.ORDER:
        p = tables.StagePaths.of(run_dir, stage)
        if not p.stats.is_file():
            rows.append({"stage": stage, "status": "not run"})
            continue
        st = tables.read_json(p.stats)
        status = tables.read_json(p.status) if p.status.is_file() else {}
        top = sorted(st.get("reasons", {}).items(), key=lambda kv: -kv[1])[:3]
        rows.append({
            "stage": stage,
            "status": "cached" if status.get("cached") else "ran",
            "rows_in": st["n_rows"],
            "kept": st["n_kept"],
            "quarantined": st["n_quarantined"],
            "top_reasons": ", ".join(f"{r} {n}" for r, n in top),
            "seconds": st["seconds"],
        })
    return rows


def _print_overview(run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"mmpipe run {run_dir}")
    for col in ("stage", "status", "rows_in", "kept", "quarantined", "top_reasons", "seconds"):
        t.add_column(col, justify="right" if col in ("rows_in", "kept", "quarantined", "seconds") else "left")
    for r in _stage_rows(run_dir):
        t.add_row(*(str(r.get(c, "")) for c in ("stage", "status", "rows_in", "kept", "quarantined", "top_reasons", "seconds")))
    Console(width=140).print(t)


@app.command()
@_one_line_errors
def inspect(
    run_dir: Annotated[Path, typer.Argument(help="A run folder (the config's `out`).")],
    stage: Annotated[Optional[str], typer.Argument(help="Show one stage: its stats, kept head and quarantine.")] = None,
    rows: Annotated[int, typer.Option(help="Rows of kept and quarantine to show.")] = 5,
    stale: Annotated[
        bool,
        typer.Option(
            "--stale",
            help="Say which stages are out of date with respect to a config (STAGE is then read as the "
            "config path; default: the run's own config.yaml) and the current inputs, without running anything.",
        ),
    ] = False,
) -> None:
    """Per-stage table (rows in, kept, quarantined, top reasons, cache hit, seconds), or one stage in detail."""
    if not run_dir.is_dir():
        raise MMPipeError(f"run folder not found: {run_dir}")
    if stale:
        from mmcore.config import load_config
        from mmcore.stale import format_stale
        from mmcore.stale import stale as stale_rows

        _echo(format_stale(stale_rows(run_dir, load_config(stage) if stage else None)))
        return
    if stage is None:
        _print_overview(run_dir)
        return
    import pandas as pd

    p = tables.StagePaths.of(run_dir, graph.stage(stage).name)
    if not p.stats.is_file():
        raise MMPipeError(f"stage {stage!r} has not run in {run_dir} (no {p.stats})")
    stats = tables.read_json(p.stats)
    _echo(f"{stage}: {stats['n_rows']} rows in, {stats['n_kept']} kept, {stats['n_quarantined']} quarantined")
    for reason, n in sorted(stats.get("reasons", {}).items(), key=lambda kv: -kv[1]):
        _echo(f"  {reason:<24} {n}")
    describe = _describer(stage)
    kept = tables.read_parquet(p.kept)
    if describe is not None:
        _echo(describe(kept, stats))
    with pd.option_context("display.width", 160, "display.max_columns", 12, "display.max_colwidth", 40):
        _echo(f"\nkept ({len(kept)} rows), first {rows}:\n{kept.head(rows).to_string()}")
        q = tables.read_parquet(p.quarantine)
        cols = [c for c in (tables.ROW_ID, tables.IMAGE, tables.TEXT, tables.REASON, tables.DETAIL) if c in q.columns]
        _echo(f"\nquarantine ({len(q)} rows), first {rows}:\n{q[cols].head(rows).to_string()}")


def _echo(text: str = "") -> None:
    typer.echo(_terminal_safe(text))


def _describer(stage: str):
    import importlib

    mod = importlib.import_module(graph.stage(stage).module)
    return getattr(mod, "describe", None)


@app.command()
@_one_line_errors
def report(run_dir: Annotated[Path, typer.Argument(help="A run folder.")]) -> None:
    """Rebuild RUN_DIR/report/report.html from the run's artifacts (self-contained; opens offline)."""
    from mmcore import report as report_mod
    from mmcore import sources
    from mmcore.config import load_config

    # The report reads no config: its section, the image root and the run's name come from here.
    path, cfg, error = RunLayout(run_dir).config, None, ""
    if path.is_file():
        try:
            cfg = load_config(path)
        except MMPipeError as e:  # a config from an older mmpipe: build with the defaults and say why on the page
            error = str(e)
    if cfg is None:
        out = report_mod.build(run_dir, config_error=error)
        typer.echo(f"report: no readable {path.name} in {run_dir}: default report settings, no thumbnails", err=True)
    else:
        out = report_mod.build(run_dir, cfg.report, sources.of(cfg.data), cfg.run_name)
    typer.echo(f"report: {out}")


@app.command("export")
@_one_line_errors
def export_(
    run_dir: Annotated[Path, typer.Argument(help="A run folder (the config's `out`) whose curation stages have run.")],
    out: Annotated[Path, typer.Option(help="Folder to write into: new, empty, or an earlier export (replaced). Not in "
                                           "the dataset folder, not a stage folder of the run.")],
    format_: Annotated[str, typer.Option("--format", help="webdataset: img2dataset-layout NNNNN.tar shards (key.<ext> "
                                         "with the original bytes, key.txt, key.json) + NNNNN.parquet + sizes.json; "
                                         "csv: open_clip's tab-separated filepath/title file; retry: url and caption "
                                         "of every download_failed row, as img2dataset input (retry.parquet).")] = "webdataset",
    stage: Annotated[Optional[str], typer.Option(help="Stage whose kept rows are exported; default the last curation "
                                                 "stage that ran (split, else quality, probe, clean).")] = None,
    split: Annotated[Optional[str], typer.Option(help="Only the rows of this split (train, val, test); needs split.")] = None,
    shard_size: Annotated[int, typer.Option(min=1, metavar="N", help="webdataset: rows per shard (img2dataset's default).")] = 10_000,
    reencode: Annotated[Optional[int], typer.Option(min=16, metavar="SIZE", help="Re-encode every image as JPEG (quality 95) with its "
                                                    "shorter side at most SIZE px; default: the original bytes.")] = None,
) -> None:
    """Export a run's curated rows for training with open_clip, or its failed downloads for img2dataset.

    Image bytes are the originals (checked against the probe's content digest); the same run gives
    byte-identical files. A row whose image cannot be read now is skipped with a reason and listed
    in OUT/export.json. Prints the summary and an open_clip_train command line.
    """
    from mmcore import export as export_mod

    spec = export_mod.spec(format=format_, out=out, stage=stage, split=split, shard_size=shard_size, reencode=reencode)
    summary = export_mod.export(run_dir, spec)
    _echo(export_mod.summary_markdown(summary).rstrip())
    if summary.n_skipped:
        from mmcore.layout import ExportLayout

        typer.echo(f"warning: {summary.n_skipped} row(s) skipped; see skipped_rows in {ExportLayout(summary.out).summary}",
                   err=True)


@app.command()
@_one_line_errors
def evaluate(
    path: Annotated[Path, typer.Argument(
        help="A run folder with a trained model (train/model), or a model folder: one saved by mmpipe or "
        "any local Hugging Face CLIP folder (save_pretrained of the model and its processor).")],
    data: Annotated[Path, typer.Option(help="Config of the dataset to evaluate on (its data section is used).")],
    name: Annotated[Optional[str], typer.Option(help="Name for the results; default: that config's run_name.")] = None,
    out: Annotated[Optional[Path], typer.Option(
        help="With a model folder: the folder for the results; default runs/<name>-<model folder name>.")] = None,
) -> None:
    """Evaluate a model on a dataset, after the clean, probe and quality stages (cached).

    With a run folder: the run's model, curated and scored with the run's settings, written to
    RUN_DIR/evaluate/external/NAME/metrics.json beside the run's own metrics; with the run's
    evaluate.baseline on, the model it was fine-tuned from is scored on the same rows.
    With a model folder (e.g. a pretrained CLIP before fine-tuning): the dataset config's settings,
    written to OUT/evaluate/external/NAME/metrics.json.
    """
    from mmcore import clean
    from mmcore import evaluate as evaluate_mod
    from mmcore.config import check_paths, load_config

    other = load_config(data)
    name = evaluate_mod.check_name(name or other.run_name)  # before anything is written
    run = RunLayout(path.resolve())
    model: Path | None = None
    if run.config.is_file():
        if not run.model.is_dir():
            raise MMPipeError(f"evaluate: no trained model at {run.model}; run the train stage first")
    elif path.is_dir():
        from mmcore import clip_model

        clip_model.check(path, None, "evaluate")  # not a CLIP-family folder: a one-line error, nothing written
        model = path.resolve()
        run = RunLayout((out or Path("runs") / f"{name}-{path.resolve().name}").resolve())
    else:
        raise MMPipeError(f"evaluate: {path} is neither a run folder (no {run.config.name}) nor a model folder")
    clean.check_columns(other.data)
    check_paths(other)
    _setup_prefect_env()
    from flows.pipeline import evaluate_external
    from flows.server import temporary_server

    with temporary_server():
        path = evaluate_external(run.root, other, name, model)
    typer.echo(evaluate_mod.summary_markdown(tables.read_json(path)))
    typer.echo(f"metrics: {path}")


@app.command()
@_one_line_errors
def verdicts(
    run_dir: Annotated[Path, typer.Argument(help="The run whose spot-check sheet was filled.")],
    filled: Annotated[Path, typer.Argument(help="evaluate/spotcheck.csv with the verdict column filled (1/0, yes/no).")],
) -> None:
    """Human-judged precision@1 and @5 with 95% CIs from a filled spot-check sheet."""
    from mmcore import evaluate as evaluate_mod

    out = evaluate_mod.verdicts(run_dir, filled)
    typer.echo(json.dumps(out, indent=2))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@_one_line_errors
def train(
    ctx: typer.Context,
    run_dir: Annotated[Path, typer.Argument(help="A run folder whose split stage has run (reads config.yaml, split/).")],
) -> None:
    """Train (or resume) the model of a run outside the flow; extra args are train.key=value overrides.

    On several GPUs: torchrun --nproc_per_node=N -m mmpipe train RUN_DIR [train.key=value ...]
    """
    from mmpipe import trainer

    raise typer.Exit(trainer.main([str(run_dir), *ctx.args]))


@app.command()
@_one_line_errors
def ablate(
    config: Annotated[Path, typer.Argument(help="Pipeline config (YAML): the baseline's, before its variant overrides.")],
    variants: Annotated[
        Optional[Path],
        typer.Option(help="Variants file (YAML): baseline, test_manifest, steps, variants {name: {dotted.key: value, "
                     "presets: [...]}}; see mmcore/ablation.py."),
    ] = None,
    schemes: Annotated[
        Optional[str],
        typer.Option(help="Comma-separated augmentation schemes, as variants {s: {train.augment: s}}; 'none' is the "
                     "baseline. Default (without --variants): every registered scheme."),
    ] = None,
    seeds: Annotated[int, typer.Option(min=1, help="Training seeds per variant (curation is shared; paired over the same test queries).")] = 1,
    steps: Annotated[
        Optional[int], typer.Option(min=1, help="Training steps of every variant (default: the variants file's, else derived "
                                    "from the baseline's train.epochs on its train split).")
    ] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Config override for every variant (repeatable).")] = None,
    preset: Annotated[Optional[list[str]], typer.Option(help="Config preset for every variant (repeatable).")] = None,
    out: Annotated[Optional[str], typer.Option(help="Run folder (overrides the config's `out`): a path, or a URL "
                                              "(s3://bucket/runs/NAME) each variant's stages are uploaded under.")] = None,
) -> None:
    """Compare curation variants as DataComp does: one fixed test set, the same training steps, only the
    curation varies; metrics with CIs and the paired bootstrap difference against the baseline.

    Every variant's config is validated before anything runs. Shared stages run once (cached).
    """
    from mmcore import ablation, clean, storage
    from mmcore.augment import SCHEMES
    from mmcore.config import check_paths

    if variants is not None and schemes is not None:
        raise MMPipeError("ablate: give --variants or --schemes, not both")
    if variants is not None:
        spec, source = ablation.load_spec(variants), str(variants)
    else:
        # Registration order puts 'none', the baseline, first.
        names = list(SCHEMES.names()) if schemes is None else [s.strip() for s in schemes.split(",") if s.strip()]
        if not names:
            raise MMPipeError(f"--schemes: empty list; expected some of {', '.join(sorted(SCHEMES))}")
        SCHEMES.check(names, where="--schemes")
        spec, source = ablation.AblationSpec.from_schemes(names), "--schemes"
    overrides = list(set_ or []) + ([f"out={out}"] if out is not None else [])
    configs = ablation.variant_configs(config, spec, overrides, list(preset or []), source)
    for v in configs.values():
        for line in (m.line() for m in storage.sync_inputs(v.data)):  # remote inputs: their local mirror first
            typer.echo(f"mirror: {line}")
        clean.check_columns(v.data)
        check_paths(v)
    if spec.test_manifest is not None and not spec.test_manifest.is_file():
        raise MMPipeError(f"ablate: test_manifest not found: {spec.test_manifest} ({source})")
    cfg = configs[spec.baseline_name]
    _setup_prefect_env()
    import pandas as pd

    from flows.ablate import ablate as ablate_flow
    from flows.server import temporary_server

    with temporary_server():
        path = ablate_flow(cfg, configs, spec.baseline_name, seeds, steps or spec.steps, spec.test_manifest)
    t = tables.read_parquet(path)
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_colwidth", 60):
        typer.echo(ablation.summary(t).to_string(index=False))
    typer.echo(f"\nablation: {path} (every metric, CIs, paired differences, curation)\nreport:   {RunLayout(cfg.run_dir).report}")


@app.command()
@_one_line_errors
def deploy(
    config: Annotated[Path, typer.Argument(help="Pipeline config (YAML); read again at the start of every run.")],
    cron: Annotated[str, typer.Option(help="Schedule in UTC, e.g. '0 3 * * *' (03:00 every day).")],
    pool: Annotated[str, typer.Option(help="Work pool, any type (created with --pool-type if missing).")] = "mmpipe",
    name: Annotated[Optional[str], typer.Option(help="Deployment name; default: the config's run_name.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Config override, e.g. --set out=runs/nightly.")] = None,
    until: Annotated[str, typer.Option(help="Last stage to run.")] = "report",
    pool_type: Annotated[str, typer.Option(help="Type of a pool that does not exist yet: process, docker, kubernetes...")] = "process",
    git: Annotated[Optional[str], typer.Option(help="Git URL: every run starts in a fresh clone (CONFIG is a path in the repository).")] = None,
    branch: Annotated[str, typer.Option(help="Branch to clone with --git.")] = "main",
    image: Annotated[Optional[str], typer.Option(help="Container image for docker/kubernetes pools (see Dockerfile).")] = None,
    alert_drop: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="Also create an automation that fires when test R@5 falls "
                                                         "by more than this from the previous run (0.05 = 5 points).")] = None,
    typed: Annotated[bool, typer.Option("--typed", help="The config as typed parameters: the Prefect UI shows a validated "
                                        "form of every setting (read from CONFIG once, now).")] = False,
) -> None:
    """Register a cron deployment of the pipeline on the Prefect server at PREFECT_API_URL."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from deployments.deploy import deploy as deploy_
    from mmcore.alerts import AlertConfig

    alert = AlertConfig(max_drop=alert_drop) if alert_drop is not None else None
    full = deploy_(config, cron, pool=pool, name=name, overrides=list(set_ or []), until=until, pool_type=pool_type,
                   git=git, branch=branch, image=image, alert=alert, typed=typed)
    typer.echo(
        f"deployed {full} (pool {pool!r}, cron {cron!r} UTC)\n"
        f"  worker:  .venv/bin/prefect worker start --pool {pool}\n"
        f"  run now: .venv/bin/prefect deployment run {full}"
    )


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
