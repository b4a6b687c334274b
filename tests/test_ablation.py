"""Curation ablations (DataComp's protocol), the caption language check, presets and planted noise."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from mmcore import ablation, checks, clean, split, synth, tables
from mmcore.base import DataConfig, StageContext
from mmcore.config import load_config, preset_names
from mmcore.errors import ConfigError, InputError
from mmcore.layout import RunLayout
from tests.conftest import REPO, demo_config

# --------------------------------------------------------------------------- variants file


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "mmpipe", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_misnamed_variant_key_is_one_line_error_before_anything_runs(tmp_path):
    (tmp_path / "m.csv").write_text("image_path,text\na.jpg,a red circle on the left\n")
    (tmp_path / "c.yaml").write_text("data:\n  manifest: m.csv\nout: run\n")
    (tmp_path / "v.yaml").write_text(
        "variants:\n  base: {}\n  typo:\n    quality.thresholdz: {blurry: 0.5}\n"
    )
    r = _cli("ablate", "c.yaml", "--variants", "v.yaml", cwd=tmp_path)
    assert r.returncode == 2, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: variant 'typo' (v.yaml): unknown config key 'quality.thresholdz'")
    assert "expected one of: alignment_batch_size, alignment_keep_fraction" in lines[0]
    assert not (tmp_path / "run").exists() and not (tmp_path / ".prefect").exists()


@pytest.mark.parametrize(
    "text, message",
    [
        ("variants:\n  a:\n    train.steps: 5\n", "variant 'a' sets 'train.steps', which an ablation fixes"),
        ("variants:\n  a:\n    evaluate.ks: [1]\n", "variant 'a' sets 'evaluate.ks', which an ablation fixes"),
        ("variants:\n  a: {}\nbaseline: b\n", "baseline 'b' is not a variant; expected one of a"),
        ("variant:\n  a: {}\n", "unknown key 'variant' in variants file"),
        ("variants:\n  ../x: {}\n", "variant name must match"),
        ("variants: {}\n", "variants"),
    ],
)
def test_variants_file_errors_are_one_line(tmp_path, text, message):
    (tmp_path / "v.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("[", r"\[")) as e:
        ablation.load_spec(tmp_path / "v.yaml")
    assert "\n" not in str(e.value)


def test_variant_configs_layer_presets_and_overrides_and_unknown_presets_fail(tmp_path):
    m = tmp_path / "m.csv"
    m.write_text("image_path,text\n")
    spec = ablation.AblationSpec(variants={"base": {}, "basic": {"presets": ["datacomp_basic"], "clean.min_words": 4}})
    cfgs = ablation.variant_configs(REPO / "configs" / "demo.yaml", spec, [f"data.manifest={m}"])
    assert list(cfgs) == ["base", "basic"]
    assert cfgs["base"].clean.languages == [] and cfgs["basic"].clean.languages == ["en"]
    assert cfgs["basic"].clean.min_words == 4  # the variant's own key wins over its preset
    bad = ablation.AblationSpec(variants={"x": {"presets": ["nope"]}})
    with pytest.raises(ConfigError, match=r"unknown preset 'nope' \(v\.yaml\); expected one of: datacomp_basic"):
        ablation.variant_configs(REPO / "configs" / "demo.yaml", bad, [f"data.manifest={m}"], source="v.yaml")
    schemes = ablation.AblationSpec.from_schemes(["light", "none"])
    assert schemes.baseline_name == "none" and schemes.variants["light"] == {"train.augment": "light"}


def test_derived_steps_are_the_baselines_epochs_of_its_train_split(tmp_path):
    cfg = load_config(None, [f"data.manifest={tmp_path / 'm.csv'}", "train.batch_size=16", "train.epochs=3"])
    assert ablation.derive_steps(cfg, 100) == 3 * 7
    with pytest.raises(ConfigError, match="train.minutes is not equal compute"):
        ablation.derive_steps(load_config(None, [f"data.manifest={tmp_path / 'm.csv'}", "train.minutes=1"]), 100)


def test_equal_compute_counts_the_train_rows_train_sees_after_pseudo(tmp_path):
    """clean.keep_uncaptioned with pseudo off: pseudo quarantines uncaptioned train rows, so the steps come
    from its kept train rows (train's input), not split's."""
    from mmcore import pseudo

    assert ablation.TRAIN_INPUT == "pseudo"
    n = 100
    df = _split_input(n)
    df[tables.TEXT] = np.where(np.arange(n) % 4 == 0, "", df[tables.TEXT])  # 25 rows without a caption
    df[tables.IMAGE] = [f"i{i}.png" for i in range(n)]
    ctx = StageContext(data=DataConfig(manifest=tmp_path / "m.csv"), run_dir=tmp_path / "run", seed=0)
    split_res = split.run(df, split.SplitConfig(strata=[]), ctx)
    res = pseudo.run(split_res.kept, pseudo.PseudoConfig(), ctx)
    n_split, n_seen = ablation.n_train_rows(split_res.stats), ablation.n_train_rows(res.stats)
    kept_train = res.kept[res.kept[split.SPLIT] == "train"]
    assert n_seen == len(kept_train) < n_split == int((split_res.kept[split.SPLIT] == "train").sum())
    assert res.stats["splits"]["val"]["rows"] == int((res.kept[split.SPLIT] == "val").sum())
    cfg = load_config(None, [f"data.manifest={tmp_path / 'm.csv'}", "train.batch_size=4", "train.epochs=1"])
    assert ablation.derive_compute(cfg, ablation.n_train_rows(res.stats)) == (-(-n_seen // 4), 4)
    with pytest.raises(InputError, match=r"no per-split row counts .* expected the stats of 'pseudo'"):
        ablation.n_train_rows({"enabled": False})


# --------------------------------------------------------------------------- fixed test set (split)


def _split_input(n: int = 120, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        tables.ROW_ID: np.arange(n, dtype=np.int64),
        tables.TEXT: [f"a caption number {i}" for i in range(n)],
        tables.GROUP: [f"g{i // 2}" for i in range(n)],  # pairs of rows share a group
        split.CONTENT_DIGEST: [f"d{i}" for i in range(n)],
        split.PHASH: [f"{int(h):016x}" for h in rng.integers(0, 2**63, n)],
    })


def test_split_with_a_fixed_test_set_quarantines_its_rows_and_fills_train_and_val(tmp_path):
    m = tmp_path / "m.csv"
    m.write_text("x\n")
    ctx = StageContext(data=DataConfig(manifest=m), run_dir=tmp_path / "run", seed=0, workers=1, progress=False)
    df = _split_input()
    first = split.run(df, split.SplitConfig(strata=[]), ctx).kept
    held = split.held_out_rows(first, tables.file_digest(m))
    assert set(held[tables.ROW_ID]) == set(first.loc[first[split.SPLIT] == "test", tables.ROW_ID])
    path = tmp_path / "held.parquet"
    tables.write_parquet(held, path)

    # Another curation of the same data: one held-out image re-encoded (a pHash 2 bits away, a new digest).
    other = df.copy()
    target = int(held[tables.ROW_ID].iloc[0])
    other.loc[target, split.CONTENT_DIGEST] = "new"
    other.loc[target, split.PHASH] = f"{int(other.loc[target, split.PHASH], 16) ^ 0b11:016x}"
    res = split.run(other, split.SplitConfig(strata=[], fixed_test=path), ctx)
    assert set(res.kept[split.SPLIT]) == {"train", "val"}
    assert set(res.quarantined[tables.REASON]) == {"held_out_test"}
    assert set(res.quarantined[tables.ROW_ID]) == set(held[tables.ROW_ID])
    assert ablation.check_no_leakage(held, res.kept, "other", tables.file_digest(m)) == {
        split.CONTENT_DIGEST: 0, tables.GROUP: 0, tables.ROW_ID: 0}
    assert res.stats["splits"]["train"]["target"] == pytest.approx(0.75)

    # Row ids and groups of another manifest mean nothing: only the image keys match.
    held_other = held.assign(**{split.MANIFEST_DIGEST: "sha256:another"})
    tables.write_parquet(held_other, path)
    shifted = other.assign(**{split.CONTENT_DIGEST: [f"e{i}" for i in range(len(other))]})
    shifted[split.PHASH] = [f"{(int(h, 16) ^ (1 << 63)) ^ 0xFF00FF:016x}" for h in shifted[split.PHASH]]
    res = split.run(shifted, split.SplitConfig(strata=[], fixed_test=path), ctx)
    assert res.quarantined.empty


# --------------------------------------------------------------------------- language, presets, synth


def test_language_check_with_real_langid(tmp_path):
    texts = ["a small red circle on the left of a blue square", "un petit cercle rouge à gauche sur un fond gris",
             "ein kleiner roter Kreis links auf grauem Hintergrund", "un pequeño círculo rojo a la izquierda"]
    lang, conf = clean.identify_language(pd.Series(texts))
    ident = clean._language_identifier()
    assert lang.tolist() == [ident.classify(t)[0] for t in texts] == ["en", "fr", "de", "es"]
    assert np.allclose(conf.to_numpy(), [ident.classify(t)[1] for t in texts], atol=1e-6)

    m = tmp_path / "m.csv"
    pd.DataFrame({"image_path": [f"{i}.jpg" for i in range(4)], "text": texts}).to_csv(m, index=False)
    ctx = StageContext(data=DataConfig(manifest=m), run_dir=tmp_path, seed=0, workers=1, progress=False)
    table = clean.read_manifest(ctx.data)
    kept_all = clean.run(table, clean.CleanConfig(), ctx)
    assert len(kept_all.kept) == 4 and {clean.LANG, clean.LANG_CONFIDENCE} <= set(kept_all.kept.columns)
    res = clean.run(table, clean.CleanConfig(languages=["en", "de"]), ctx)
    assert res.kept[tables.ROW_ID].tolist() == [0, 2]
    assert set(res.quarantined[tables.REASON]) == {"wrong_language"}
    assert res.quarantined[tables.DETAIL].str.startswith(("fr (p=", "es (p=")).all()


def test_datacomp_basic_preset(tmp_path):
    assert "datacomp_basic" in preset_names()
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"data.manifest={tmp_path / 'm.csv'}"], ["datacomp_basic"])
    assert cfg.clean.languages == ["en"] and (cfg.clean.min_words, cfg.clean.min_chars) == (3, 6)
    # Short side at least 200 px and aspect ratio at most 3 pass; 199 px or 3.01 fail.
    sizes = pd.DataFrame({"width": [200, 199, 600, 602], "height": [300, 300, 200, 200]})
    flagged = {c: checks.evaluate(sizes, checks.CHECKS[c], cfg.quality.thresholds[c])[checks.issue_column(c)].tolist()
               for c in ("too_small", "extreme_aspect")}
    assert flagged == {"too_small": [False, True, False, False], "extreme_aspect": [False, False, False, True]}
    ctx = StageContext(data=DataConfig(manifest=tmp_path / "m.csv"), run_dir=tmp_path, seed=0, workers=1, progress=False)
    pd.DataFrame({"image_path": ["a.jpg", "b.jpg", "c.jpg", "d.jpg"],
                  "text": ["a red circle", "red circle", "a red star here", "un cercle rouge à gauche"]}).to_csv(
        tmp_path / "m.csv", index=False)
    res = clean.run(clean.read_manifest(ctx.data), cfg.clean, ctx)
    assert res.kept[tables.TEXT].tolist() == ["a red circle", "a red star here"]
    with pytest.raises(ConfigError, match=r"^unknown preset 'nope'; expected one of: datacomp_basic"):
        load_config(REPO / "configs" / "demo.yaml", [f"data.manifest={tmp_path / 'm.csv'}"], ["nope"])


def test_synth_plants_mismatches_and_foreign_captions(tmp_path):
    # seed 4: langid names all twelve translations right (seed 3 puts a Spanish one in Slovenian)
    m = synth.generate(tmp_path / "d", n=200, seed=4, mismatch_rate=0.2, foreign_rate=0.06)
    p = synth.planted(tmp_path / "d")
    mis = p[p["defect"] == "mismatch"]
    foreign = p[p["defect"].str.startswith("foreign_language_")]
    assert len(mis) == 40 and len(foreign) == 12 and not set(mis.row_id) & set(foreign.row_id)
    assert p["row_id"].is_unique and (p.loc[mis.index, "stage"] == "").all()
    for r in mis.itertuples():
        assert m.loc[r.row_id, "text"] == r.expected_text
    lang, _ = clean.identify_language(foreign["expected_text"])
    assert lang.tolist() == [d.rsplit("_", 1)[1] for d in foreign["defect"]]
    # Rates of 0 plant none of them; the rates change those captions and nothing else.
    plain = synth.generate(tmp_path / "p", n=200, seed=4)
    pp = synth.planted(tmp_path / "p")
    assert not (pp["defect"].eq("mismatch") | pp["defect"].str.startswith("foreign")).any()
    changed = sorted(set(mis.row_id) | set(foreign.row_id))
    same = m.index.difference(changed)
    assert plain.loc[same].equals(m.loc[same])
    assert (plain.loc[changed, "text"] != m.loc[changed, "text"]).all()  # another scene's caption, or a translation


# --------------------------------------------------------------------------- cache across run folders, end to end


def _status(run_dir, stage) -> bool:
    return tables.read_json(tables.StagePaths.of(run_dir, stage).status)["cached"]


@pytest.mark.usefixtures("prefect_harness")
def test_a_variant_that_only_changes_quality_reruns_from_quality_on(synth_small, tmp_path):
    from flows.pipeline import pipeline

    # A setting no other test uses: the first run computes (other tests may have cached the defaults).
    own = "clean.max_chars=997"
    a = demo_config(synth_small / "manifest.csv", tmp_path / "a", own)
    pipeline(a, until="quality")
    b = demo_config(synth_small / "manifest.csv", tmp_path / "b", own, "quality.thresholds={blurry: 0.5}")
    pipeline(b, until="split")
    assert [_status(b.run_dir, s) for s in ("clean", "probe", "quality", "split")] == [True, True, False, False]
    for s in ("clean", "probe"):  # the files are here, with the bytes computed in the other folder
        assert tables.StagePaths.of(b.run_dir, s).kept.read_bytes() == tables.StagePaths.of(a.run_dir, s).kept.read_bytes()
    assert not _status(a.run_dir, "clean")  # the other folder's record is its own
    # Deleted at the source: the stage runs again rather than copying nothing.
    c = demo_config(synth_small / "manifest.csv", tmp_path / "c", own)
    tables.StagePaths.of(a.run_dir, "clean").kept.unlink()
    pipeline(c, until="clean")
    assert not _status(c.run_dir, "clean") and tables.StagePaths.of(c.run_dir, "clean").kept.is_file()


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_small_ablation_end_to_end(synth_small, tmp_path):
    """Two curation variants, one seed: one fixed test set, the same steps, one table."""
    from flows.ablate import ablate

    spec = ablation.AblationSpec(variants={"base": {}, "short_ok": {"clean.min_words": 6}})
    m = synth_small / "manifest.csv"
    base = demo_config(m, tmp_path / "run")
    fast = [f"data.manifest={m}", f"out={tmp_path / 'run'}", "train.steps=3", "train.batch_size=16",
            "train.num_workers=0", "evaluate.bootstrap=50", "evaluate.robustness=false", "evaluate.spotcheck_n=0"]
    cfgs = ablation.variant_configs(REPO / "configs" / "demo.yaml", spec, fast)
    assert base.run_dir == cfgs["base"].run_dir
    path = ablate(cfgs["base"], cfgs, "base", seeds=1)

    run = RunLayout(tmp_path / "run")
    t = tables.read_parquet(path)
    assert set(t["scheme"]) == {"base", "short_ok"} and (t["steps"] == 3).all() and t["n_test"].nunique() == 1
    assert (t.loc[t["scheme"] == "base", "diff"].abs() < 1e-12).all()
    v = {n: run.variant(n, 0) for n in spec.variants}
    ids = {n: ablation.scored_test_rows(d) for n, d in v.items()}
    held = split.read_held_out(run.held_out)
    assert np.array_equal(ids["base"], ids["short_ok"])
    assert set(ids["base"]) <= set(held[tables.ROW_ID])
    for n, d in v.items():
        assert tables.read_json(tables.StagePaths.of(d, "train").stats)["steps"] == 3
        kept = tables.read_parquet(tables.StagePaths.of(d, "split").kept)
        assert not set(kept[tables.ROW_ID]) & set(held[tables.ROW_ID])
        assert not set(kept[split.CONTENT_DIGEST]) & set(held[split.CONTENT_DIGEST])
    # The stricter clean really curated differently, and clean is the first stage that ran for it.
    assert t.loc[t["scheme"] == "short_ok", "kept_clean"].iloc[0] < t.loc[t["scheme"] == "base", "kept_clean"].iloc[0]
    assert _status(v["base"], "clean") and not _status(v["short_ok"], "clean")
    assert run.report.is_file()
