"""Pseudo-labels (issue 20): uncaptioned rows through the safety stages, a real teacher, train rows only.

One synthetic pool with emptied captions is curated once (clean keeps the uncaptioned rows), a tiny
teacher is trained on it for a few steps, and the tests run the pseudo stage on that split with
different settings. Also: degradation-aware captions and the report's pseudo and matching sections.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mmcore import augment, execute, pseudo, synth, tables
from mmcore.errors import ConfigError, LeakageError
from mmcore.tables import PSEUDO_LABEL, PSEUDO_WEIGHT, ROW_ID, TEXT
from tests.conftest import demo_config

CURATION = ("clean", "probe", "quality", "decontam", "split")


def _run(cfg, stage: str, table: pd.DataFrame | None = None) -> tables.StageResult:
    """One stage in-process (no Prefect), its artifacts written like the task's."""
    from mmcore.stale import extra_digest

    if table is None:
        table, digest = execute.read_source(cfg, stage)
    else:
        digest = tables.json_digest(len(table))
    execute.run_stage(stage, cfg, table, digest, extra_digest(stage, cfg))
    paths = tables.StagePaths.of(cfg.run_dir, stage)
    return tables.StageResult(tables.read_parquet(paths.kept), tables.read_parquet(paths.quarantine),
                              tables.read_json(paths.stats))


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """(data folder, config, split's kept table, teacher model folder): curated once, a 4-step teacher."""
    data = tmp_path_factory.mktemp("pseudo") / "data"
    synth.generate(data, n=300, seed=0, uncaptioned_rate=0.1)
    run = data.parent / "run"
    cfg = demo_config(data / "manifest.csv", run, "clean.keep_uncaptioned=true", "train.steps=4",
                      "decontam.reference_sets={}")
    table = None
    for s in CURATION:
        table = _run(cfg, s, table).kept
    _run(cfg, "pseudo", table)  # off: the teacher trains on the captioned rows
    _run(cfg, "train", tables.read_parquet(tables.StagePaths.of(run, "pseudo").kept))
    return data, cfg, table, run / "train" / "model"


def _with(cfg, **pseudo_settings):
    return cfg.model_copy(update={"pseudo": cfg.pseudo.model_copy(update=pseudo_settings)})


def test_synth_plants_uncaptioned_rows_and_leaves_everything_else_as_it_was(pool, synth_small):
    data, *_ = pool
    planted = synth.planted(data)
    gone = planted[planted["defect"] == "uncaptioned"]
    assert len(gone) == 30 and (gone["stage"] == "clean").all() and (gone["reason"] == "empty_caption").all()
    m = pd.read_csv(data / "manifest.csv", keep_default_na=False)
    base = pd.read_csv(synth_small / "manifest.csv", keep_default_na=False)  # same n and seed, rate 0
    ids = gone[ROW_ID].to_numpy()
    assert (m.loc[ids, "text"] == "").all() and (base.loc[ids, "text"].to_numpy() == gone["expected_text"].to_numpy()).all()
    others = m.index.difference(ids)
    pd.testing.assert_frame_equal(m.loc[others], base.loc[others])


def test_clean_keeps_uncaptioned_rows_only_when_asked(pool):
    data, cfg, *_ = pool
    kept = tables.read_parquet(tables.StagePaths.of(cfg.run_dir, "clean").kept)
    stats = tables.read_json(tables.StagePaths.of(cfg.run_dir, "clean").stats)
    empty = synth.planted(data).query("defect in ['empty_caption', 'whitespace_caption', 'uncaptioned']")[ROW_ID]
    assert set(kept.loc[kept[TEXT] == "", ROW_ID]) == set(empty)
    assert stats["n_uncaptioned_kept"] == len(empty) and "empty_caption" not in stats["reasons"]
    off = cfg.model_copy(update={"clean": cfg.clean.model_copy(update={"keep_uncaptioned": False})})
    res = _run(off.model_copy(update={"out": cfg.run_dir.parent / "off"}), "clean")
    assert (res.kept[TEXT] != "").all()
    assert set(res.quarantined.loc[res.quarantined["reason"] == "empty_caption", ROW_ID]) == set(empty)


def test_uncaptioned_rows_pass_quality_alignment_and_reach_split(pool):
    data, cfg, split_kept, teacher = pool
    assert (split_kept[TEXT] == "").sum() > 0  # through probe, quality, decontam and split
    probe_kept = tables.read_parquet(tables.StagePaths.of(cfg.run_dir, "probe").kept)
    q = cfg.model_copy(update={"out": cfg.run_dir.parent / "q", "quality": cfg.quality.model_copy(
        update={"alignment_model": teacher, "alignment_keep_fraction": 0.5})})
    res = _run(q, "quality", probe_kept)
    kept_empty = res.kept[res.kept[TEXT] == ""]
    assert len(kept_empty) and kept_empty["clip_score"].isna().all()
    # Half the scored rows fail alignment, and not one without a caption (no score: never flagged).
    low = res.quarantined[res.quarantined["reason"] == "low_alignment"]
    assert len(low) and (low[TEXT] != "").all()


def test_off_passes_captioned_rows_through_and_quarantines_the_rest(pool):
    _, cfg, table, _ = pool
    res = pseudo.run(table, cfg.pseudo, execute.context(cfg, progress=False))
    assert len(res.kept) + len(res.quarantined) == len(table)
    pd.testing.assert_frame_equal(res.kept, table[table[TEXT] != ""])
    assert set(res.quarantined["reason"]) == {"no_caption"} and res.stats["n_pseudo"] == 0


def test_pseudo_labels_train_rows_only_and_marks_them_everywhere(pool):
    _, cfg, table, teacher = pool
    on = _with(cfg, enabled=True, model_path=teacher, min_margin=0.0, weight=0.25)
    res = pseudo.run(table, on.pseudo, execute.context(on, progress=False))
    assert len(res.kept) + len(res.quarantined) == len(table)
    assert set(res.kept[ROW_ID]).isdisjoint(res.quarantined[ROW_ID])
    empty = table[TEXT] == ""
    labelled = res.kept[res.kept[PSEUDO_LABEL]]
    # Every uncaptioned train row got a caption from the bank (margin 0 always passes); none in val or test.
    assert set(labelled[ROW_ID]) == set(table.loc[empty & (table["split"] == "train"), ROW_ID])
    assert (labelled["split"] == "train").all() and (labelled[TEXT] != "").all()
    assert set(labelled[TEXT]) <= set(table.loc[(table["split"] == "train") & ~empty, TEXT])
    assert (labelled[PSEUDO_WEIGHT] == 0.25).all() and (labelled[pseudo.ORIGINAL] == "").all()
    assert (labelled[pseudo.MARGIN] >= 0).all() and labelled[pseudo.TEACHER].str.startswith("sha256:").all()
    real = res.kept[~res.kept[PSEUDO_LABEL]]
    assert (real[PSEUDO_WEIGHT] == 1.0).all() and (real[TEXT] != "").all()
    q = res.quarantined
    assert set(q[ROW_ID]) == set(table.loc[empty & (table["split"] != "train"), ROW_ID])
    assert set(q["reason"]) == {"no_caption"}
    st = res.stats
    assert st["n_pseudo"] == st["n_pseudo_uncaptioned"] == len(labelled) and st["n_pseudo_relabelled"] == 0
    assert sum(st["margin_hist"]["counts"]) == st["n_candidates"] == len(labelled)
    # Deterministic: the same teacher and rows give the same table.
    again = pseudo.run(table, on.pseudo, execute.context(on, progress=False))
    pd.testing.assert_frame_equal(res.kept, again.kept)


def test_a_margin_too_high_quarantines_uncaptioned_train_rows_and_relabels_nothing(pool):
    _, cfg, table, teacher = pool
    on = _with(cfg, enabled=True, model_path=teacher, min_margin=2.0, relabel_below=0.99)
    res = pseudo.run(table, on.pseudo, execute.context(on, progress=False))
    assert not res.kept[PSEUDO_LABEL].any()
    assert (res.quarantined.loc[res.quarantined["split"] == "train", "reason"] == "low_margin").all()
    assert res.stats["n_low_alignment"] > 0  # scored, but no margin of 2 exists
    assert len(res.kept) + len(res.quarantined) == len(table)


def _eval_only_captions(table: pd.DataFrame, n: int) -> list[str]:
    """``n`` captions of val or test rows that no train row carries (normalised)."""
    captioned, train = table[TEXT] != "", table["split"] == "train"
    in_train = set(pseudo.normalise_caption(table.loc[train & captioned, TEXT]))
    evals = table.loc[~train & captioned, TEXT].drop_duplicates()
    evals = evals[~pseudo.normalise_caption(evals).isin(in_train)].head(n).tolist()
    assert len(evals) == n
    return evals


def test_a_caption_train_rows_carry_too_is_no_eval_caption(pool, tmp_path):
    """Templated captions repeat across splits: one that train rows carry as well may be picked."""
    _, cfg, table, teacher = pool
    empty, train = table[TEXT] == "", table["split"] == "train"
    shared = sorted(set(table.loc[train & ~empty, TEXT]) & set(table.loc[~train & ~empty, TEXT]))
    assert len(shared) >= 2, "the pool's templated captions repeat across splits"
    bank = tmp_path / "bank.txt"
    bank.write_text("\n".join(shared[:2]) + "\n")
    on = _with(cfg, enabled=True, model_path=teacher, min_margin=0.0, captions=bank)
    res = pseudo.run(table, on.pseudo, execute.context(on, progress=False))
    assert res.stats["n_eval_caption"] == 0 and res.stats["n_pseudo"] == int((empty & train).sum())
    assert set(res.kept.loc[res.kept[PSEUDO_LABEL], TEXT]) <= set(shared[:2])


def test_a_bank_caption_of_a_val_or_test_row_is_never_a_pseudo_caption(pool, tmp_path):
    _, cfg, table, teacher = pool
    empty, train = table[TEXT] == "", table["split"] == "train"
    evals = _eval_only_captions(table, 2)
    # Only eval captions (cased and spaced otherwise): every pick is one, every uncaptioned train row quarantined.
    bank = tmp_path / "bank.txt"
    bank.write_text(f"  {evals[0].upper()}  \n{'   '.join(evals[1].split())}\n")
    on = _with(cfg, enabled=True, model_path=teacher, min_margin=0.0, captions=bank)
    res = pseudo.run(table, on.pseudo, execute.context(on, progress=False))
    q = res.quarantined
    assert set(q.loc[q["reason"] == "eval_caption", ROW_ID]) == set(table.loc[empty & train, ROW_ID])
    assert set(q.loc[q["reason"] == "no_caption", ROW_ID]) == set(table.loc[empty & ~train, ROW_ID])
    assert not res.kept[PSEUDO_LABEL].any() and res.stats["n_pseudo"] == 0
    assert res.stats["n_eval_caption"] == int((empty & train).sum())
    assert q.loc[q["reason"] == "eval_caption", tables.DETAIL].str.endswith("is the caption of a val or test row").all()
    # With a train caption in the bank too, a pick is either that caption or quarantined.
    own = table.loc[train & ~empty, TEXT].iloc[0]
    bank.write_text(f"{evals[0]}\n{own}\n")
    res = pseudo.run(table, on.pseudo, execute.context(on, progress=False))
    labelled = res.kept[res.kept[PSEUDO_LABEL]]
    assert set(labelled[TEXT]) <= {own}
    assert res.stats["n_pseudo"] + res.stats["n_eval_caption"] == int((empty & train).sum())


def test_a_relabel_to_a_val_or_test_caption_is_quarantined_not_kept(pool, tmp_path):
    _, cfg, table, teacher = pool
    empty, train = table[TEXT] == "", table["split"] == "train"
    evals = _eval_only_captions(table, 2)
    bank = tmp_path / "bank.txt"
    bank.write_text("\n".join(evals) + "\n")
    # Every captioned train row is a candidate; its pick is an eval caption whenever the teacher prefers one.
    on = _with(cfg, enabled=True, model_path=teacher, min_margin=0.0, captions=bank, relabel_below=1.0)
    res = pseudo.run(table, on.pseudo, execute.context(on, progress=False))
    q = res.quarantined
    assert len(res.kept) + len(q) == len(table) and not res.kept[PSEUDO_LABEL].any()
    leaked = q[q["reason"] == "eval_caption"]
    relabels = leaked[leaked[TEXT] != ""]
    assert len(relabels) > 0 and (relabels["split"] == "train").all()  # misaligned train rows, never kept
    assert set(leaked[ROW_ID]) >= set(table.loc[empty & train, ROW_ID])
    assert res.stats["n_eval_caption"] == len(leaked)
    assert relabels[tables.DETAIL].str.endswith("is the caption of a val or test row").all()
    # The rest kept their own caption, and no kept train row carries an eval caption it did not have.
    kept_train = res.kept[res.kept["split"] == "train"].set_index(ROW_ID)[TEXT]
    assert kept_train.equals(table.set_index(ROW_ID).loc[kept_train.index, TEXT])


def test_no_pseudo_row_may_be_in_val_or_test():
    df = pd.DataFrame({ROW_ID: [1, 2], TEXT: ["a", "b"], "split": ["train", "test"], PSEUDO_LABEL: [True, True]})
    with pytest.raises(LeakageError, match=r"1 pseudo-labelled rows are in val or test \(row_id 2\)"):
        pseudo.check_no_pseudo_in_eval(df)
    pseudo.check_no_pseudo_in_eval(df.iloc[:1])


def test_bad_pseudo_config_is_one_line(pool, tmp_path):
    from mmcore.config import load_config

    data, cfg, table, _ = pool
    with pytest.raises(ConfigError, match=r"^pseudo: pseudo.enabled needs pseudo.model_path"):
        load_config(None, [f"data.manifest={data / 'manifest.csv'}", "pseudo.enabled=true"])
    bad = _with(cfg, enabled=True, model_path=tmp_path)
    with pytest.raises(ConfigError, match=r"^pseudo.model_path: cannot load a CLIP model") as e:
        pseudo.run(table, bad.pseudo, execute.context(bad, progress=False))
    assert "\n" not in str(e.value)


def test_pseudo_section_shows_counts_margins_and_pairs(pool):
    from mmcore.layout import RunLayout
    from mmcore.report import plots  # noqa: F401 (matplotlib backend set up by the report package)
    from mmcore.report.markup import Thumbs
    from mmcore.report.sections import ReportConfig
    from mmcore.report.sections import pseudo as pseudo_section
    from mmcore.report.stats import Run

    data, cfg, table, teacher = pool
    on = _with(cfg, enabled=True, model_path=teacher, min_margin=0.0).model_copy(update={"out": cfg.run_dir.parent / "on"})
    _run(on, "pseudo", table)
    sec = pseudo_section(Run(RunLayout(on.run_dir)), ReportConfig(), Thumbs(data, 64, 10**8))
    assert sec.status == "ok" and "Pseudo-pairs" in sec.body and "was: (no caption)" in sec.body
    assert "<figcaption>margin (top-1 minus top-2 cosine); threshold 0</figcaption>" in sec.body  # the histogram
    n_cards = min(max(ReportConfig().thumbnails_per_reason, 1) * 3, int(tables.read_json(
        tables.StagePaths.of(on.run_dir, "pseudo").stats)["n_pseudo"]))
    assert n_cards and sec.body.count("was: (no caption) · margin ") == n_cards
    off = pseudo_section(Run(RunLayout(cfg.run_dir)), ReportConfig(), Thumbs(data, 64, 10**8))
    assert off.status == "ok" and "no_caption" in off.body


def test_matching_and_rerank_metrics_render_with_chance(tmp_path):
    from mmcore.layout import RunLayout
    from mmcore.report.markup import Thumbs
    from mmcore.report.sections import ReportConfig, metrics
    from mmcore.report.stats import Run

    ci = lambda v: {"value": v, "low": v - 0.05, "high": v + 0.05}  # noqa: E731
    m = {"test": {"retrieval": {"i2t_r1": ci(0.2)}}, "chance": {"test": {"i2t_r1": 0.01}},
         "matching": {"accuracy": ci(0.8), "precision": ci(0.7), "recall": ci(0.6), "f1": ci(0.65), "auroc": ci(0.9),
                      "n_pairs": 200, "n_positive": 100, "n_negative": 100,
                      "chance": {"accuracy": 0.5, "auroc": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5}},
         "rerank": {"k": 10, "i2t": {"R@1": {"without": ci(0.2), "with": ci(0.3), "difference": ci(0.1)}},
                    "t2i": {"R@1": {"without": ci(0.25), "with": ci(0.27), "difference": ci(0.02)}}}}
    run = RunLayout(tmp_path)
    tables.write_json(m, run.metrics)
    sec = metrics(Run(run), ReportConfig(), Thumbs(None, 64, 10**8))
    assert 'data-key="evaluate.matching.auroc" data-value="0.9"' in sec.body
    assert 'data-key="evaluate.rerank.i2t.R@1.difference" data-value="0.1"' in sec.body
    assert "Re-ranking the top 10" in sec.body and "matching split" not in sec.body


# --------------------------------------------------------------------------- degradation-aware captions


def test_degrade_names_the_degradation_in_the_caption_deterministically():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    seen = set()
    for seed in range(40):
        out, text = augment.apply("degrade", img, "a photo of a red circle on the left", np.random.default_rng(seed), 32)
        again, text2 = augment.apply("degrade", img, "a photo of a red circle on the left", np.random.default_rng(seed), 32)
        assert out.size == (32, 32) and text == text2 and np.array_equal(np.asarray(out), np.asarray(again))
        kind = next((k for k, p in augment.DEGRADATIONS.items() if text.startswith(p)), None)
        assert text == "a photo of a red circle on the left" if kind is None else text == (
            f"{augment.DEGRADATIONS[kind]} a red circle on the left")
        seen.add(kind)
    assert seen == {None, *augment.DEGRADATIONS}  # every degradation, and undegraded samples
    assert augment.degrade_caption("two shapes: a red star", "blur") == "a blurry photo of two shapes: a red star"
    dark = augment.degrade_image(Image.new("RGB", (32, 32), (200, 200, 200)), "dark", np.random.default_rng(0))
    assert np.asarray(dark).mean() < 110
