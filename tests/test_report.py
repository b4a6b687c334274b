"""The report: every section from a run's artifacts, numbers equal to the stats, staleness.

The run is real up to split (``mmcore.execute.run_stage``, as the task layer runs a stage); train
and evaluate, which need torch and minutes, are written as small realistic artifacts shaped as
those stages write them. Numbers are always read back from the artifacts, never hard-coded.
"""

from __future__ import annotations

import base64
import io
import json
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mmcore import execute, graph, report, spotcheck, tables
from mmcore.config import dump_config
from mmcore.layout import RunLayout
from mmcore.provenance import code_digest
from mmcore.stale import extra_digest, format_stale, stale
from tests.conftest import demo_config

SPLITS = ("train", "val", "test")
REAL = ("clean", "probe", "quality", "decontam", "split", "pseudo")  # run for real here; train and evaluate are written


# --------------------------------------------------------------------------- building a run


def _write_status(cfg, stage: str, cached: bool) -> None:
    """What the task layer's hook records: whether this run took the stage from cache."""
    tables.write_json({"cached": cached, "task_run_id": "t-" + stage, "flow_run_id": "f-1", "finished": "2026-01-01T00:00:00Z"},
                      RunLayout(cfg.run_dir).stage(stage).status)


def _write_made_up(cfg, stage: str, inp: pd.DataFrame, input_digest: str, res: tables.StageResult) -> dict:
    """A stage's made-up result written with the digests ``execute.run_stage`` records."""
    extra = extra_digest(stage, cfg)
    if extra is not None:
        res = tables.StageResult(res.kept, res.quarantined, {**res.stats, "extra_digest": extra})
    return tables.write_stage(
        cfg.run_dir, stage, res, input_ids=inp[tables.ROW_ID].to_numpy(), input_digest=input_digest, seconds=0.25,
        config_digest=execute.config_digest(cfg, stage), code_digest=code_digest(graph.stage(stage).module),
    )


def _fake_train(df: pd.DataFrame, run_dir: Path) -> tables.StageResult:
    steps = np.arange(1, 61)
    h = pd.DataFrame({
        "step": steps, "epoch": (steps - 1) // 20, "loss": 4.0 * np.exp(-steps / 30) + 0.5,
        "lr": 1e-3 * np.minimum(steps / 10, 1) * (0.5 + 0.5 * np.cos(np.pi * steps / 60)),
        "logit_scale": 14.3 + steps * 0.05, "val_i2t_r5": np.where(steps % 20 == 0, steps / 100, np.nan),
    })
    sps = 400 + 10 * np.sin(steps)
    run = RunLayout(run_dir)
    tables.write_parquet(h, run.history)
    tables.write_json({"step": steps.tolist(), "samples_per_s": sps.tolist()}, run.timing)
    stats = {"device": "cpu", "steps": 60, "final_loss": float(h["loss"].iloc[-1]), "samples_per_s": float(sps.mean()),
             "val_i2t_r5": 0.6, "model_dir": str(run.model)}
    return tables.StageResult(df, tables.empty_quarantine(df), stats)


def _ci(rng, lo=0.0, hi=1.0):
    v = float(rng.uniform(lo, hi))
    return {"value": v, "low": max(lo, v - 0.05), "high": min(hi, v + 0.05)}


def _split_metrics(rng, labels):
    ret = {f"{d}_{m}": _ci(rng) for d in ("i2t", "t2i") for m in ("r1", "r5", "r10", "ndcg10")}
    ret.update({f"{d}_{m}": _ci(rng, 1, 20) for d in ("i2t", "t2i") for m in ("mean_rank", "median_rank")})
    zs = {k: _ci(rng) for k in ("acc1", "balanced_acc", "macro_f1")}
    zs.update(classes=labels, confusion=rng.integers(0, 9, (len(labels), len(labels))).tolist(), n_images=30)
    return {"retrieval": ret, "zeroshot": zs, "n_images": 30, "n_texts": 30}


def _fake_evaluate(df: pd.DataFrame, run_dir: Path, image_root: Path) -> tables.StageResult:
    rng = np.random.default_rng(2)
    run = RunLayout(run_dir)
    labels = sorted(df[tables.LABEL].dropna().unique().tolist())
    m = {s: _split_metrics(rng, labels) for s in ("test", "val")}
    m["test"]["per_domain"] = {d: {**_split_metrics(rng, labels), "in_training": d == "flat"} for d in ("flat", "textured")}
    m["test"]["per_domain"]["_in_vs_out"] = {"in_domain": _split_metrics(rng, labels), "out_of_domain": _split_metrics(rng, labels),
                                             "out_of_domain_values": ["textured"]}
    m["chance"] = {s: {"i2t_r1": 1 / 30, "i2t_r5": 5 / 30, "t2i_r5": 5 / 30, "acc1": 1 / len(labels)} for s in ("test", "val")}
    m["n_queries"] = {s: {"images": 30, "texts": 30} for s in ("test", "val")}
    tables.write_json(m, run.metrics)
    rows = [{"degradation": "clean", "severity": 0.0, "metric": k, **m["test"]["retrieval"][k], "relative_drop": 0.0} for k in ("i2t_r5", "t2i_r5")]
    for d, sevs in (("blur", [0.01, 0.02, 0.04]), ("jpeg", [50, 20, 8]), ("noise", [0.05, 0.1])):
        for s in sevs:
            for k in ("i2t_r5", "t2i_r5"):
                c = _ci(rng)
                rows.append({"degradation": d, "severity": float(s), "metric": k, **c, "relative_drop": 1 - c["value"] / m["test"]["retrieval"][k]["value"]})
    tables.write_parquet(pd.DataFrame(rows), run.robustness)
    test = df[df["split"] == "test"]
    sheet = spotcheck.build(rng.normal(size=(len(test), 8)), rng.normal(size=(len(test), 8)), test[tables.IMAGE].tolist(), test[tables.ROW_ID].tolist(),
                            test[tables.TEXT].tolist(), test[tables.ROW_ID].tolist(), 8, seed=0)
    tables.write_bytes(sheet.to_csv(index=False).encode(), run.spotcheck_csv)
    tables.write_parquet(pd.DataFrame({  # shaped as evaluate.ablation_table
        "scheme": ["none", "light"], "metric": ["i2t_r5", "i2t_r5"], "value": [0.4, 0.45], "low": [0.35, 0.4], "high": [0.45, 0.5],
        "diff": [0.0, 0.05], "diff_low": [0.0, 0.01], "diff_high": [0.0, 0.09], "p_value": [1.0, 0.02], "significant": [False, True],
    }), run.ablation)
    stats = {f"test_{k}": v["value"] for k, v in m["test"]["retrieval"].items()}
    return tables.StageResult(df, tables.empty_quarantine(df), stats)


def make_run(tmp: Path, data: Path, until: str = "evaluate", *overrides: str) -> tuple[Path, object]:
    """A run folder of the synthetic set in ``data``: real stages up to split, made-up later ones, up to ``until``."""
    cfg = demo_config(data / "manifest.csv", tmp / "run", *overrides)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    tables.write_bytes(dump_config(cfg).encode(), RunLayout(cfg.run_dir).config)
    extend_run(cfg, until)
    return cfg.run_dir, cfg


def extend_run(cfg, until: str = "evaluate") -> None:
    """Run or write the stages after the last one in ``cfg.run_dir`` up to ``until`` (clean as if from cache)."""
    made_up = {
        "train": lambda df: _fake_train(df, cfg.run_dir),
        "evaluate": lambda df: _fake_evaluate(df, cfg.run_dir, cfg.data.image_root),
    }
    assert set(REAL) | set(made_up) == set(graph.stage(report.STAGE).reads)
    ctx = execute.context(cfg, progress=False)
    run = RunLayout(cfg.run_dir)
    for stage in graph.ORDER[: graph.ORDER.index(until) + 1]:
        s = graph.stage(stage)
        if s.input is None:
            table, digest = execute.read_source(cfg, stage)
        else:  # the kept table of its graph input: evaluate reads split's, not train's
            table, digest = tables.load(cfg.run_dir, s.input), tables.read_json(run.stage(s.input).stats)["kept_digest"]
        if run.stage(stage).stats.is_file():
            continue
        if stage in REAL:
            execute.run_stage(stage, cfg, table, digest, extra_digest(stage, cfg), ctx=ctx)
        else:
            _write_made_up(cfg, stage, table, digest, made_up[stage](table))
        _write_status(cfg, stage, cached=stage == "clean")


def build(run_dir: Path, cfg) -> Path:
    """The report as ``mmpipe report`` builds it: with the run config's report section, image root and name."""
    return report.build(run_dir, cfg.report, cfg.data.image_root, cfg.run_name)


# --------------------------------------------------------------------------- reading the page back


class Page(HTMLParser):
    """The parts of the report tests check: sections, keyed numbers, images, external references."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.sections: dict[str, str] = {}
        self.keys: dict[str, tuple[str, str]] = {}
        self.imgs: list[dict] = []
        self.noimg = 0
        self.external: list[str] = []
        self._open: list[list] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.sections[a["id"]] = a.get("data-status")
        if tag == "img":
            self.imgs.append(a)
        if "noimg" in (a.get("class") or "").split():
            self.noimg += 1
        for attr in ("src", "href"):
            v = a.get(attr) or ""
            if v and not v.startswith(("data:", "#")):
                self.external.append(f"{tag} {attr}={v[:60]}")
        if tag in ("link", "iframe", "object", "embed") or (tag == "script" and a.get("src")):
            self.external.append(tag)
        for entry in self._open:
            entry[1] += 1
        if "data-key" in a:
            self._open.append([a["data-key"], 1, a.get("data-value"), []])

    def handle_endtag(self, tag):
        for entry in list(self._open):
            entry[1] -= 1
            if entry[1] == 0:
                self._open.remove(entry)
                assert entry[0] not in self.keys or self.keys[entry[0]][0] == entry[2], f"{entry[0]} shown twice, differently"
                self.keys[entry[0]] = (entry[2], "".join(entry[3]).strip())

    def handle_data(self, data):
        for entry in self._open:
            entry[3].append(data)

    def value(self, key: str):
        return json.loads(self.keys[key][0])

    def text(self, key: str) -> str:
        return self.keys[key][1]


def parse(path: Path) -> Page:
    return Page(path.read_text())


def parse_text(text: str) -> Page:
    return Page(text)


def as_number(text: str) -> float:
    return float(text.replace(",", ""))


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, synth_small):
    run_dir, cfg = make_run(tmp_path_factory.mktemp("report"), synth_small)
    t0 = time.perf_counter()
    path = build(run_dir, cfg)
    return run_dir, cfg, path, time.perf_counter() - t0


# --------------------------------------------------------------------------- tests


def test_every_section_is_rendered_and_self_contained(full_run):
    run_dir, _, path, _ = full_run
    assert path == run_dir / "report" / "report.html"
    page = parse(path)
    assert page.sections == {s: "ok" for s in report.SECTIONS}
    assert page.external == [], page.external
    assert "http://" not in path.read_text() and "https://" not in path.read_text()


def test_every_image_is_a_data_uri_that_decodes(full_run):
    page = parse(full_run[2])
    assert len(page.imgs) > 30
    for img in page.imgs:
        head, _, b64 = img["src"].partition(",")
        assert head in ("data:image/png;base64", "data:image/jpeg;base64"), head
        with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
            im.load()
            assert im.width > 0 and im.height > 0


def test_funnel_numbers_equal_stage_stats(full_run):
    run_dir, _, path, _ = full_run
    page = parse(path)
    for stage in ("clean", "probe", "quality", "split", "train", "evaluate"):
        st = tables.read_json(tables.StagePaths.of(run_dir, stage).stats)
        for k in ("n_rows", "n_kept", "n_quarantined", "seconds"):
            assert page.value(f"{stage}.{k}") == st[k], (stage, k)
            assert as_number(page.text(f"{stage}.{k}")) == pytest.approx(st[k]), (stage, k)
        for reason, n in st["reasons"].items():
            assert page.value(f"{stage}.reasons.{reason}") == n
            assert as_number(page.text(f"{stage}.reasons.{reason}")) == n
    assert page.value("clean.cached") is True and page.value("probe.cached") is False
    assert page.value("run.cache_hits") == 1


def test_quarantined_images_show_thumbnails_or_a_note_never_a_broken_image(full_run):
    run_dir, _, path, _ = full_run
    page = parse(path)
    probe_reasons = tables.read_json(tables.StagePaths.of(run_dir, "probe").stats)["reasons"]
    # Planted missing, outside-root and corrupt files cannot be shown: each gets a note.
    assert {"missing_file", "outside_root", "corrupt_image"} <= set(probe_reasons)
    assert page.noimg >= 3
    text = path.read_text()
    assert "no preview:<br>file not found" in text and "outside the dataset root" in text
    # Quality quarantines real images: they are shown with their captions.
    q = tables.load(run_dir, "quality", quarantine=True)
    assert len(q) and all(f"row {r}</span>" in text for r in q[tables.ROW_ID].head(2))


def test_split_training_and_metrics_equal_their_artifacts(full_run):
    run_dir, _, path, _ = full_run
    page = parse(path)
    st = tables.read_json(run_dir / "split" / "stats.json")
    for s, info in st["splits"].items():
        for k, v in info.items():
            assert page.value(f"split.splits.{s}.{k}") == v
    for dim, per in st["distributions"].items():
        for s, counts in per.items():
            for value, n in counts.items():
                assert page.value(f"split.distributions.{dim}.{s}.{value}") == n
    for k, v in st["leakage"].items():
        assert page.value(f"split.leakage.{k}") == v
    tr = tables.read_json(run_dir / "train" / "stats.json")
    for k in ("device", "steps", "final_loss", "samples_per_s"):
        assert page.value(f"train.{k}") == tr[k]

    m = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    n_checked = 0
    for split in ("test", "val"):
        for group in ("retrieval", "zeroshot"):
            for metric, leaf in m[split][group].items():
                if isinstance(leaf, dict):
                    key = f"evaluate.{split}.{group}.{metric}"
                    assert page.value(key) == leaf["value"], key
                    d = 1 if abs(leaf["value"]) >= 10 else 3
                    assert page.text(key) == f"{leaf['value']:.{d}f} [{leaf['low']:.{d}f}, {leaf['high']:.{d}f}]"
                    n_checked += 1
    for domain, body in m["test"]["per_domain"].items():
        if not domain.startswith("_"):
            assert page.value(f"evaluate.test.per_domain.{domain}.retrieval.i2t_r5") == body["retrieval"]["i2t_r5"]["value"]
    rob = pd.read_parquet(run_dir / "evaluate" / "robustness.parquet")
    for r in rob.itertuples():
        assert page.value(f"evaluate.robustness.{r.degradation}@{r.severity:g}.{r.metric}") == pytest.approx(r.value)
    assert n_checked >= 20
    for r in pd.read_parquet(run_dir / "evaluate" / "ablation.parquet").itertuples():
        assert page.value(f"evaluate.ablation.{r.scheme}.{r.metric}") == r.value
        assert page.text(f"evaluate.ablation.{r.scheme}.{r.metric}.diff") == f"{r.diff:.3f} [{r.diff_low:.3f}, {r.diff_high:.3f}]"


def test_spotcheck_gallery_shows_queries_with_their_top5(full_run):
    run_dir, cfg, path, _ = full_run
    sheet = pd.read_csv(run_dir / "evaluate" / "spotcheck.csv")
    text = path.read_text()
    shown = [q for q in sheet["query_id"].unique() if f">{q} · " in text]
    assert len(shown) == min(cfg.report.spotcheck_queries, sheet["query_id"].nunique())
    assert any(q.startswith("i") for q in shown) and any(q.startswith("t") for q in shown)
    assert text.count('<div class="rank">#') == 5 * len(shown)


def test_missing_stages_show_as_not_run(tmp_path, synth_small):
    run_dir, cfg = make_run(tmp_path, synth_small, until="clean")
    page = parse(build(run_dir, cfg))
    assert page.sections == {"funnel": "ok", "provenance": "ok", **{s: "not-run" for s in ("scores", "decontam", "split", "pseudo", "training", "metrics", "spotcheck")}}
    assert "Not run: <code>train</code>" in (run_dir / "report" / "report.html").read_text()
    md = report.summary_markdown(run_dir)
    assert "| probe | | | | *not run* |" in md and "evaluate has not run" in md


def test_an_empty_run_folder_still_gives_a_page_and_a_missing_one_is_an_error(tmp_path):
    from mmcore.errors import InputError

    page = parse(report.build(tmp_path))
    assert set(page.sections.values()) == {"not-run"}
    with pytest.raises(InputError, match="report: run folder not found: .*nope"):
        report.build(tmp_path / "nope")


def test_a_malformed_artifact_costs_one_section_not_the_report(tmp_path, synth_small):
    run_dir, _ = make_run(tmp_path, synth_small, until="clean")
    # Odd shapes are skipped; an unreadable file is an error of its section only.
    tables.write_json({"test": {"retrieval": "not a dict"}, "chance": []}, run_dir / "evaluate" / "metrics.json")
    tables.write_bytes(b"not parquet", run_dir / "evaluate" / "robustness.parquet")
    page, statuses = report.render(run_dir)
    assert statuses == {**{s: "not-run" for s in report.SECTIONS}, "funnel": "ok", "provenance": "ok", "metrics": "error"}
    assert 'id="metrics" data-status="error"' in page and "cannot read Parquet" in page


def test_stats_of_the_wrong_shape_cost_the_sections_reading_those_figures(tmp_path, synth_small):
    run_dir, cfg = make_run(tmp_path, synth_small, until="split")
    path = RunLayout(run_dir).stage("split").stats
    tables.write_json({**tables.read_json(path), "leakage": "none"}, path)
    page, statuses = report.render(run_dir, cfg.report, cfg.data.image_root, cfg.run_name)
    # The funnel and provenance read the common counters only; the split section reads the leakage counts.
    assert statuses["split"] == "error" and statuses["funnel"] == statuses["scores"] == statuses["provenance"] == "ok"
    assert "split/stats.json: leakage: Input should be a valid dictionary, got &#x27;none&#x27;" in page
    assert parse_text(page).value("split.n_kept") == tables.read_json(path)["n_kept"]


def test_run_passes_rows_through_and_gives_the_bytes_build_gives(tmp_path, synth_small):
    run_dir, cfg = make_run(tmp_path, synth_small, until="quality")
    built = build(run_dir, cfg).read_bytes()
    assert f"<title>mmpipe report: {cfg.run_name}</title>" in built.decode()
    table = tables.load(run_dir, "quality")
    res = report.run(table, cfg.report, execute.context(cfg))
    assert res.kept is table and res.quarantined.empty and {"reason", "detail"} <= set(res.quarantined.columns)
    assert res.stats["report_path"] == str(run_dir / "report" / "report.html")
    assert res.stats["sections"] == {"funnel": "ok", "scores": "ok", "provenance": "ok",
                                     **{s: "not-run" for s in ("decontam", "split", "pseudo", "training", "metrics", "spotcheck")}}
    # No timestamp in the page and no metadata in the PNGs: the same run gives the same bytes.
    assert (run_dir / "report" / "report.html").read_bytes() == built


def test_editing_any_report_module_changes_the_report_code_digest_only(monkeypatch, tmp_path):
    """Provenance follows the report's imports into every module of its package, and no earlier stage's
    imports reach the report: a report edit re-runs the report and takes every other stage from cache."""
    from mmcore import provenance

    package = Path(report.__file__).parent
    modules = sorted(f"mmcore.report.{p.stem}" for p in package.glob("*.py") if p.stem != "__init__") + ["mmcore.report"]
    assert {"mmcore.report.page", "mmcore.report.sections", "mmcore.report.stats", "mmcore.report.plots"} <= set(modules)
    digest = provenance.code_digest.__wrapped__  # uncached: the source lookup is patched below
    real = provenance._source
    before = {s.name: digest(s.module) for s in graph.STAGES.values()}
    for module in modules:
        edited = tmp_path / f"{module}.py"
        edited.write_text(real(module).read_text() + "\n# edited\n")
        monkeypatch.setattr(provenance, "_source", lambda name, m=module, e=edited: e if name == m else real(name))
        after = {s.name: digest(s.module) for s in graph.STAGES.values()}
        assert [s for s in graph.ORDER if after[s] != before[s]] == [report.STAGE], module
    monkeypatch.setattr(provenance, "_source", real)


def test_the_report_package_imports_no_config_and_nothing_above_mmcore():
    import ast

    for path in Path(report.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert name != "mmcore.config" and name.split(".")[0] not in ("flows", "tasks", "mmpipe", "prefect"), (path.name, name)


def test_report_config_is_validated():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="thumbnails_per_reason"):
        report.ReportConfig(thumbnails_per_reason=-1)
    with pytest.raises(ValidationError, match="extra"):
        report.ReportConfig(thumbs=3)


def test_summary_markdown_has_funnel_and_headline_metrics(full_run):
    run_dir, _, _, _ = full_run
    md = report.summary_markdown(run_dir)
    m = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    r5 = m["test"]["retrieval"]["i2t_r5"]
    assert f"| i2t_r5 | {r5['value']:.3f} [{r5['low']:.3f}, {r5['high']:.3f}] |" in md
    q = tables.read_json(run_dir / "quality" / "stats.json")
    assert f"| quality | {q['n_rows']:,} | {q['n_kept']:,} | {q['n_quarantined']:,} |" in md
    assert "Report: `" in md


# --------------------------------------------------------------------------- staleness


def test_a_just_written_run_is_fresh(full_run):
    run_dir, cfg, _, _ = full_run
    rows = stale(run_dir, cfg)
    assert [r["stage"] for r in rows] == list(graph.ORDER)
    assert {r["stage"]: r["status"] for r in rows} == {**{s: "fresh" for s in graph.ORDER[:-1]}, "report": "not run"}
    text = format_stale(rows).splitlines()
    assert text[0].split() == ["clean", "fresh"] and text[-1].split()[:3] == ["report", "not", "run"]


def test_a_config_change_makes_that_stage_and_all_later_ones_stale(full_run):
    run_dir, cfg, _, _ = full_run
    changed = demo_config(cfg.data.manifest, run_dir, "quality.phash_radius=5")
    assert changed.quality != cfg.quality
    by = {r["stage"]: r for r in stale(run_dir, changed)}
    i = graph.ORDER.index("quality")
    assert all(by[s]["status"] == "fresh" for s in graph.ORDER[:i])
    assert by["quality"]["status"] == "stale" and "config section 'quality' changed" in by["quality"]["why"]
    # Every later stage names each stage it reads that is stale (evaluate: split and train, not quality).
    for s in graph.ORDER[i + 1 : -1]:
        assert by[s]["status"] == "stale", s
        for r in graph.stage(s).reads:
            assert (f"upstream stage '{r}' is stale" in by[s]["why"]) == (graph.ORDER.index(r) >= i), (s, r, by[s]["why"])
    assert by["evaluate"]["why"].count("upstream stage") == 2
    assert by["report"]["status"] == "not run"


def test_the_report_stage_is_stale_with_a_stale_stage_it_reads_not_with_one_that_did_not_run(tmp_path, synth_small):
    run_dir, cfg = make_run(tmp_path, synth_small, until="quality")
    table, digest = tables.load(run_dir, "quality"), tables.read_json(RunLayout(run_dir).stage("quality").stats)["kept_digest"]
    execute.run_stage("report", cfg, table, digest, extra_digest("report", cfg))
    by = {r["stage"]: r for r in stale(run_dir, cfg)}
    assert [by[s]["status"] for s in ("split", "train", "evaluate")] == ["not run"] * 3
    assert by["report"]["status"] == "fresh", by["report"]["why"]  # split, train, evaluate did not run

    changed = demo_config(cfg.data.manifest, run_dir, "probe.max_pixels=1000001")
    by = {r["stage"]: r for r in stale(run_dir, changed)}
    assert by["report"]["status"] == "stale"
    assert "upstream stage 'probe' is stale" in by["report"]["why"] and "upstream stage 'quality' is stale" in by["report"]["why"]
    assert "upstream stage 'clean'" not in by["report"]["why"] and "split" not in by["report"]["why"]


def test_a_changed_manifest_or_rewritten_artifact_is_stale(tmp_path, synth_small):
    import shutil

    data = shutil.copytree(synth_small, tmp_path / "data")  # the manifest is edited below
    run_dir, cfg = make_run(tmp_path, data, until="probe")
    by = {r["stage"]: r for r in stale(run_dir, cfg)}
    assert by["clean"]["status"] == by["probe"]["status"] == "fresh" and by["quality"]["status"] == "not run"

    # The probe's images, recorded as extra_digest: an edited image makes the probe stale.
    st = tables.read_json(run_dir / "probe" / "stats.json")
    assert st["extra_digest"] == extra_digest("probe", cfg)
    image = data / tables.load(run_dir, "clean")[tables.IMAGE].iloc[0]
    image.write_bytes(image.read_bytes() + b"\0")
    assert "files it reads besides its input (image files) changed" in stale(run_dir, cfg)[1]["why"]
    tables.write_json({k: v for k, v in st.items() if k != "extra_digest"}, run_dir / "probe" / "stats.json")

    # The probe's input record no longer matches clean's output (clean re-ran since).
    st = tables.read_json(run_dir / "probe" / "stats.json")
    tables.write_json({**st, "input_digest": "sha256:other"}, run_dir / "probe" / "stats.json")
    by = {r["stage"]: r for r in stale(run_dir, cfg)}
    assert by["clean"]["status"] == "fresh" and "input changed: clean was re-run since" in by["probe"]["why"]

    # A kept file overwritten by hand.
    tables.write_parquet(tables.load(run_dir, "clean").head(3), run_dir / "clean" / "kept.parquet")
    assert "kept.parquet changed since the stage wrote it" in stale(run_dir, cfg)[0]["why"]

    # The manifest edited: clean and everything after it.
    with open(cfg.data.manifest, "a") as f:
        f.write("images/00000.jpg,a new caption here,s0,2024-01-01T00:00:00Z,circle,flat\n")
    rows = stale(run_dir, cfg)
    assert "manifest" in rows[0]["why"] and rows[1]["status"] == "stale" and "upstream stage 'clean' is stale" in rows[1]["why"]


def test_an_edited_synonym_table_makes_train_and_later_stages_stale(tmp_path, synth_small):
    from mmcore.augment import DEFAULT_SYNONYMS

    synonyms = tmp_path / "synonyms.yaml"
    synonyms.write_bytes(DEFAULT_SYNONYMS.read_bytes())
    run_dir, cfg = make_run(tmp_path, synth_small, "evaluate", f"train.synonyms={synonyms}")
    fresh = {r["stage"]: r["status"] for r in stale(run_dir, cfg)}
    assert fresh == {**{s: "fresh" for s in graph.ORDER[:-1]}, "report": "not run"}

    with open(synonyms, "a") as f:
        f.write("square: [box]\n")
    by = {r["stage"]: r for r in stale(run_dir, cfg)}
    assert all(by[s]["status"] == "fresh" for s in ("clean", "probe", "quality", "split"))
    assert by["train"]["status"] == "stale" and "(model presets, synonyms, base model or tokenizer) changed" in by["train"]["why"]
    assert by["evaluate"]["status"] == "stale" and "upstream stage 'train' is stale" in by["evaluate"]["why"]


def test_a_code_change_is_stale(tmp_path, synth_small):
    run_dir, cfg = make_run(tmp_path, synth_small, until="clean")
    st = tables.read_json(run_dir / "clean" / "stats.json")
    tables.write_json({**st, "code_digest": "sha256:old"}, run_dir / "clean" / "stats.json")
    assert "code of mmcore.clean" in stale(run_dir, cfg)[0]["why"]
    seeded = demo_config(cfg.data.manifest, run_dir, "seed=3")
    assert "seed changed (0 -> 3)" in stale(run_dir, seeded)[0]["why"]
    assert stale(run_dir)[0]["why"].startswith("code of mmcore.clean")  # against the run's own config.yaml


def test_stale_errors_are_one_line(tmp_path):
    from mmcore.errors import InputError

    with pytest.raises(InputError, match="run folder not found: .*nope"):
        stale(tmp_path / "nope")
    with pytest.raises(InputError, match=r"no readable config.yaml in .*; pass the config"):
        stale(tmp_path)
