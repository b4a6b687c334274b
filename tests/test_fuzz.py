"""Manifests with random damage: never a traceback; a one-line error or a run with every row accounted for.

Hypothesis builds manifests (CSV, JSONL, Parquet) with missing and extra columns, wrong types,
nulls, huge and empty strings, control characters, and image paths that are valid PNGs, random
bytes, empty files, folders, missing, ``..`` or absolute. They go through the stages up to quality
(in process) and a few through the CLI.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmcore import clean, graph, tables
from mmcore.base import StageContext
from mmcore.errors import AccountingError, MMPipeError
from mmcore.layout import StagePaths
from tests.conftest import REPO

IN_PROCESS_EXAMPLES = 25
CLI_EXAMPLES = 3
IN_PROCESS_STAGES = graph.ORDER[: graph.ORDER.index("quality") + 1]  # cheap enough to run per example
OUTCOMES: dict[str, int] = {}

ODD_NAMES = ("images/ü n\tí.png", "images/" + "a" * 300 + ".png", "images/a\x00b.png", " images/sp.png ", "images//x.png")
IMAGE_KINDS = ("png", "png", "random_bytes", "empty", "missing", "folder", "dotdot", "absolute", "odd_name")
CAPTION = "a small red circle on the left of a blue square"

_control = st.text(alphabet=[chr(c) for c in (*range(0, 32), 127, 0x200B, 0xFEFF)], max_size=20)
_cell = st.one_of(
    st.just(CAPTION),
    st.text(max_size=40),
    st.just(""),
    st.none(),
    _control.map(lambda s: CAPTION + s),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.sampled_from(["x" * 100_000, "word " * 20_000, "\U0001f600" * 5000, "NA", "null", "NaN"]),
)


@st.composite
def manifests(draw):
    """(format, rows as dicts, image kinds by path, manifest-level damage)."""
    n = draw(st.integers(0, 8))
    rows, files = [], {}
    # Extra columns, once per manifest (row_id is reserved: a one-line error); a row may lack one.
    extras = draw(st.lists(st.sampled_from(["extra", "extra", "group", "label", "x" * 50, "", "row_id"]),
                           max_size=2, unique=True))
    for i in range(n):
        kind = draw(st.sampled_from(IMAGE_KINDS))
        path = {
            "dotdot": "../outside.png",
            "absolute": "/etc/hostname",
            "odd_name": draw(st.sampled_from(ODD_NAMES)),
        }.get(kind, f"images/{i:03d}_{kind}.png")
        files[path] = kind
        row = {"image_path": path if draw(st.integers(0, 9)) else draw(_cell), "text": draw(_cell)}
        for extra in extras:
            if draw(st.integers(0, 4)):
                row[extra] = draw(_cell)
        rows.append(row)
    drop = draw(st.sampled_from([None] * 8 + ["image_path", "text"]))
    fmt = draw(st.sampled_from(["csv", "jsonl", "parquet"]))
    garbage = draw(st.sampled_from([None] * 7 + ["bytes"]))
    garbage = draw(st.binary(max_size=200)) if garbage else None
    png = {"size": draw(st.tuples(st.integers(1, 40), st.integers(1, 40))), "bytes": draw(st.binary(max_size=300))}
    return fmt, rows, files, drop, garbage, png, extras


def _tiny_png(size: tuple[int, int]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _write(tmp: Path, example) -> Path:
    """The damaged dataset on disk; returns the manifest's path."""
    fmt, rows, files, drop, garbage, png, extras = example
    root = tmp / "data"
    (root / "images").mkdir(parents=True)
    (tmp / "outside.png").write_bytes(_tiny_png((4, 4)))
    for path, kind in files.items():
        if kind in ("dotdot", "absolute", "missing"):
            continue
        try:
            target = root / path.strip()
            if kind == "folder":
                target.mkdir(parents=True, exist_ok=True)
            else:
                data = {"png": _tiny_png(png["size"]), "random_bytes": png["bytes"], "empty": b""}.get(kind, b"x")
                target.write_bytes(data)
        except (OSError, ValueError):  # a name the file system refuses: the row points at nothing
            pass
    manifest = root / f"manifest.{fmt}"
    if garbage is not None:
        manifest.write_bytes(garbage)
        return manifest
    columns = ["image_path", "text", *extras]  # an empty manifest still has its header
    df = pd.DataFrame(rows, columns=columns).drop(columns=[drop] if drop else [])
    if fmt == "csv":
        df.to_csv(manifest, index=False)
    elif fmt == "jsonl":
        with open(manifest, "w") as f:
            for r in df.to_dict(orient="records"):
                f.write(json.dumps({k: v for k, v in r.items() if not (isinstance(v, float) and pd.isna(v))},
                                   default=str) + "\n")
    else:
        # Parquet columns have one type: a mixed column is stored as its text, as a user's tool would.
        for c in df.columns:
            kinds = {type(v) for v in df[c] if v is not None and not (isinstance(v, float) and pd.isna(v))}
            if len(kinds) > 1 or kinds == {int}:
                df[c] = df[c].map(lambda v: None if v is None else str(v))
        df.to_parquet(manifest, index=False)
    return manifest


def _one_line(e: BaseException) -> None:
    assert isinstance(e, MMPipeError) and not isinstance(e, AccountingError), repr(e)
    assert str(e) and "\n" not in str(e), repr(e)


def _run_in_process(manifest: Path, run_dir: Path) -> str:
    """Run the stages in process; returns the outcome ('completed' or 'error:<stage>')."""
    from mmcore.config import build_config

    cfg = build_config({"data": {"manifest": str(manifest)}, "out": str(run_dir), "workers": 1})
    ctx = StageContext(data=cfg.data, run_dir=cfg.run_dir, seed=cfg.seed, workers=1, progress=False)
    try:
        clean.check_columns(cfg.data)  # what the CLI checks before a run
        table = clean.read_manifest(cfg.data)
    except Exception as e:
        _one_line(e)
        return "error:schema"
    n_manifest = len(table)
    for stage in IN_PROCESS_STAGES:
        mod = importlib.import_module(graph.STAGES[stage].module)
        try:
            res = mod.run(table, cfg.section(stage), ctx)
        except Exception as e:
            _one_line(e)
            assert stage == "clean", f"{stage} raised on bad rows instead of quarantining them: {e}"
            return f"error:{stage}"
        ids = table[tables.ROW_ID].to_numpy()
        tables.check_accounting(stage, ids, res.kept, res.quarantined)
        stats = tables.write_stage(run_dir, stage, res, input_ids=ids, input_digest="", seconds=0.0)
        assert stats["n_kept"] + stats["n_quarantined"] == stats["n_rows"] == len(table)
        table = tables.load(run_dir, stage)
    assert n_manifest >= len(table)
    return "completed"


@settings(max_examples=IN_PROCESS_EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large])
@given(example=manifests())
def test_damaged_manifests_give_a_one_line_error_or_a_fully_accounted_run(tmp_path_factory, example):
    tmp = tmp_path_factory.mktemp("fuzz")
    outcome = _run_in_process(_write(tmp, example), tmp / "run")
    OUTCOMES[outcome] = OUTCOMES.get(outcome, 0) + 1
    _record_outcomes()


def _record_outcomes() -> None:
    path = os.environ.get("MMPIPE_RELIABILITY_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"test": "fuzz", "outcomes": OUTCOMES}) + "\n")


@pytest.fixture(scope="module")
def api_url(prefect_harness) -> str:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


@pytest.mark.slow
@settings(max_examples=CLI_EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large])
@given(example=manifests())
def test_damaged_manifests_through_the_cli_never_print_a_traceback(tmp_path_factory, api_url, example):
    tmp = tmp_path_factory.mktemp("fuzzcli")
    manifest = _write(tmp, example)
    env = {**os.environ, "PREFECT_API_URL": api_url}
    r = subprocess.run(
        [sys.executable, "-m", "mmpipe", "run", str(REPO / "configs" / "demo.yaml"), "--until", "quality",
         "--out", str(tmp / "run"), "--set", f"data.manifest={manifest}", *(
             a for c in ("group", "time", "label", "domain") for a in ("--set", f"data.{c}_column=null"))],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=300,
    )
    assert "Traceback" not in r.stderr + r.stdout, r.stderr[-3000:]
    if r.returncode == 0:
        for stage in (s.name for s in graph.plan("quality")):  # every stage the run ran
            stats = tables.read_json(StagePaths.of(tmp / "run", stage).stats)
            assert stats["n_kept"] + stats["n_quarantined"] == stats["n_rows"], stage
        outcome = "completed"
    else:
        assert r.returncode == 2 and r.stderr.startswith("error: "), (r.returncode, r.stderr[-3000:])
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        outcome = "error"
    OUTCOMES[f"cli:{outcome}"] = OUTCOMES.get(f"cli:{outcome}", 0) + 1
    _record_outcomes()
