"""The evaluate stage end to end on synthetic data, with a small real stand-in encoder."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mmcore import clean, evaluate, synth, tables
from mmcore.base import DataConfig, StageContext
from mmcore.errors import ConfigError, InputError
from mmcore.evaluate import EvaluateConfig

COLOR_NAMES = list(synth.COLORS)
COLOR_RGB = np.array([synth.COLORS[c] for c in COLOR_NAMES], dtype=np.float32)


class StandInEncoder:
    """Same methods as ``mmcore.clip_model.Encoder``: colour features + random projections.

    Images: the share of pixels near each synthetic colour, plus a projection of 8x8 pixels.
    Texts: the colour words they name, plus hashed words. Enough signal to beat chance.
    """

    image_size = 32

    def __init__(self, dim: int = 48, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.proj = rng.normal(size=(8 * 8 * 3, dim - len(COLOR_NAMES))).astype(np.float32) / 14
        self.dim = dim

    def encode_images(self, images: list[Image.Image], batch_size: int = 256) -> np.ndarray:
        out = []
        for im in images:
            px = np.asarray(im.convert("RGB").resize((8, 8)), dtype=np.float32).reshape(-1, 3)
            near = (np.linalg.norm(px[:, None] - COLOR_RGB[None], axis=2) < 60).mean(0)
            out.append(np.concatenate([3 * near, 0.2 * ((px.ravel() / 255 - 0.5) @ self.proj)]))
        return _unit(np.array(out))

    def encode_texts(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        out = []
        for t in texts:
            words = t.lower().split()
            colors = np.array([float(c in words) for c in COLOR_NAMES])
            h = np.zeros(self.dim - len(COLOR_NAMES))
            for w in words:
                h[int(hashlib.md5(w.encode()).hexdigest(), 16) % len(h)] += 0.3
            out.append(np.concatenate([colors, h]))
        return _unit(np.array(out) + 1e-6)


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


FAST = dict(bootstrap=200, degradations={"brightness": [0.4, 2.0], "jpeg": [10]}, spotcheck_n=6, batch_size=64)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Synthetic data through clean, a content digest, and a scene-grouped split."""
    out = tmp_path_factory.mktemp("synth")
    synth.generate(out, n=240, seed=0)
    data = DataConfig(manifest=out / "manifest.csv", label_column="label", domain_column="domain", group_column="scene_id")
    kept = clean.run(clean.read_manifest(data), clean.CleanConfig(), StageContext(data, out / "run")).kept
    # what quality adds: same image bytes => same digest ("" for files that cannot be read)
    kept["content_digest"] = [_digest(out / p) for p in kept["image_path"]]
    # scene ids: s0012; planted copies have ids of their own (mirror0001, bench...): a stable number each
    scene = kept["group"].map(lambda g: int(g[1:]) if g[1:].isdigit() else int(tables.text_digest(g)[7:15], 16))
    kept["split"] = np.select([scene % 3 == 0, scene % 3 == 1], ["test", "val"], "train")
    return data, kept, synth.planted(out)


def _digest(p: Path) -> str | None:
    try:
        return tables.file_digest(p) if p.is_file() and p.resolve().is_relative_to(p.parent.parent.resolve()) else None
    except OSError:
        return None


def _ctx(data, tmp_path, seed=0):
    return StageContext(data=data, run_dir=tmp_path / "run", seed=seed)


@pytest.fixture(scope="module")
def evaluated(dataset, tmp_path_factory):
    data, kept, planted = dataset
    ctx = _ctx(data, tmp_path_factory.mktemp("eval"))
    res = evaluate.run(kept, EvaluateConfig(**FAST), ctx, encoder=StandInEncoder())
    return ctx, res, kept, planted


def test_rows_are_accounted_for_and_broken_images_quarantined(evaluated):
    ctx, res, kept, planted = evaluated
    tables.check_accounting("evaluate", kept["row_id"].to_numpy(), res.kept, res.quarantined)
    assert set(res.quarantined["reason"]) <= {"decode_failed"}
    bad = set(planted.loc[planted["stage"] == "probe", "row_id"])
    in_eval = set(kept.loc[kept["split"] != "train", "row_id"])
    assert set(res.quarantined["row_id"]) == bad & in_eval and len(bad & in_eval) > 0
    assert (res.quarantined["detail"] != "").all()


def test_metrics_json_has_every_metric_with_a_ci(evaluated):
    ctx, res, kept, _ = evaluated
    m = json.loads((ctx.stage_dir("evaluate") / "metrics.json").read_text())
    for split in ("test", "val"):
        body = m[split]
        assert set(body["retrieval"]) == {
            f"{d}_{x}" for d in ("i2t", "t2i") for x in ("r1", "r5", "r10", "mean_rank", "median_rank", "ndcg10")
        }
        assert {"acc1", "acc5", "balanced_acc", "macro_f1", "confusion", "classes"} <= set(body["zeroshot"])
        for group in ("retrieval", "zeroshot"):
            for name, v in body[group].items():
                if isinstance(v, dict):
                    assert v["low"] <= v["value"] <= v["high"], (split, name, v)
        assert body["n_texts"] > body["n_images"]  # several captions per image
        assert m["chance"][split]["t2i_r1"] == pytest.approx(1 / body["n_images"])
        assert m["n_queries"][split] == {"images": body["n_images"], "texts": body["n_texts"]}
    # the stand-in knows colours: clearly above chance
    assert m["test"]["retrieval"]["t2i_r10"]["low"] > 2 * m["chance"]["test"]["t2i_r10"]
    assert set(m["test"]["per_domain"]) >= {"flat", "textured"}
    assert res.stats["test_i2t_r5"] == m["test"]["retrieval"]["i2t_r5"]["value"]
    assert res.stats["chance_test_t2i_r5"] == m["chance"]["test"]["t2i_r5"]


def test_images_are_unique_by_content_and_embeddings_saved(evaluated):
    ctx, res, kept, _ = evaluated
    emb = tables.read_parquet(ctx.stage_dir("evaluate") / "embeddings.parquet")
    ok = kept[(kept["split"] != "train") & ~kept["row_id"].isin(res.quarantined["row_id"])]
    assert (emb["kind"] == "text").sum() == len(ok)
    assert (emb["kind"] == "image").sum() == ok["content_digest"].nunique()
    v = np.stack(emb["vector"].to_numpy())
    assert v.dtype == np.float32 and v.shape[1] == 48
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1, rtol=1e-5)


def test_robustness_table_per_degradation_and_severity(evaluated):
    ctx, *_ = evaluated
    rob = tables.read_parquet(ctx.stage_dir("evaluate") / "robustness.parquet")
    assert set(map(tuple, rob[["degradation", "severity"]].drop_duplicates().to_numpy())) == {
        ("clean", 0.0), ("brightness", 0.4), ("brightness", 2.0), ("jpeg", 10.0)
    }
    assert (rob.loc[rob["degradation"] == "clean", "relative_drop"].fillna(0) == 0).all()
    clean_r5 = rob.query("degradation == 'clean' and metric == 't2i_r5'")["value"].iat[0]
    dark = rob.query("degradation == 'brightness' and severity == 0.4 and metric == 't2i_r5'").iloc[0]
    assert dark["relative_drop"] == pytest.approx((clean_r5 - dark["value"]) / clean_r5)
    assert dark["relative_drop"] > 0  # darkening breaks colour matching
    m = json.loads((ctx.stage_dir("evaluate") / "metrics.json").read_text())
    assert m["test"]["robustness"]["brightness@0.4"]["t2i_r5"]["value"] == dark["value"]
    md = evaluate.summary_markdown(m, rob)
    assert "| i2t_r5 |" in md and "| brightness | 0.4 |" in md and len(evaluate.metrics_table(m)) == 2 * (12 + 4)


def test_spotcheck_sheet_and_verdicts(evaluated, tmp_path):
    ctx, *_ = evaluated
    d = ctx.stage_dir("evaluate")
    page = (d / "spotcheck.html").read_text()
    assert page.count("data:image/jpeg;base64,") >= 6 and "http" not in page
    sheet = pd.read_csv(d / "spotcheck.csv", keep_default_na=False)
    assert list(sheet.columns) == ["query_id", "query_kind", "query", "rank", "retrieved", "row_id", "verdict"]
    assert sheet["query_id"].nunique() == 6 and set(sheet["query_kind"]) == {"image", "text"}
    assert (sheet["verdict"] == "").all() and sheet.groupby("query_id").size().eq(5).all()
    filled = sheet.assign(verdict=np.where(sheet["rank"] == 1, "y", "0"))
    filled.loc[filled.index[-1], "verdict"] = ""  # one query left unfinished
    filled.to_csv(tmp_path / "filled.csv", index=False)
    out = evaluate.verdicts(ctx.run_dir, tmp_path / "filled.csv", n_boot=100)
    assert out["precision@1"]["value"] == 1.0 and out["precision@5"]["value"] == pytest.approx(0.2)
    assert out["n_queries"] == 5 and out["n_skipped"] == 1
    assert (d / "verdicts.json").is_file()
    filled.loc[0, "verdict"] = "maybe"
    filled.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(InputError, match=r"row 2 of .*verdict 'maybe' not understood"):
        evaluate.verdicts(ctx.run_dir, tmp_path / "bad.csv")


def test_held_out_domain_is_compared_in_vs_out(dataset, tmp_path):
    data, kept, _ = dataset
    t = kept[~((kept["split"] == "train") & (kept["domain"] == "textured"))]
    cfg = EvaluateConfig(**{**FAST, "robustness": False, "spotcheck_n": 0, "splits": ["test"]})
    evaluate.run(t, cfg, _ctx(data, tmp_path), encoder=StandInEncoder())
    m = json.loads((tmp_path / "run" / "evaluate" / "metrics.json").read_text())
    dom = m["test"]["per_domain"]
    assert dom["flat"]["in_training"] and not dom["textured"]["in_training"]
    assert dom["_in_vs_out"]["out_of_domain_values"] == ["textured"]
    assert dom["_in_vs_out"]["out_of_domain"]["n_texts"] == dom["textured"]["n_texts"]
    assert "val" not in m and not (tmp_path / "run" / "evaluate" / "spotcheck.csv").exists()


def test_same_input_and_seed_give_identical_metrics(dataset, tmp_path):
    data, kept, _ = dataset
    cfg = EvaluateConfig(**{**FAST, "degradations": {"noise": [0.1]}, "spotcheck_n": 0, "splits": ["test"]})
    for k in ("a", "b"):
        evaluate.run(kept, cfg, _ctx(data, tmp_path / k), encoder=StandInEncoder())
    a, b = ((tmp_path / k / "run" / "evaluate") for k in ("a", "b"))
    assert (a / "metrics.json").read_bytes() == (b / "metrics.json").read_bytes()
    assert tables.file_digest(a / "robustness.parquet") == tables.file_digest(b / "robustness.parquet")


def test_external_dataset_and_ablation_table(evaluated, tmp_path):
    ctx, res, kept, _ = evaluated
    other = kept[kept["split"] == "test"].drop(columns=["split"])
    cfg = EvaluateConfig(**{**FAST, "splits": ["test"]})
    m = evaluate.run_external(other, cfg, ctx, "other", encoder=StandInEncoder(seed=1))
    path = ctx.stage_dir("evaluate") / "external" / "other" / "metrics.json"
    assert json.loads(path.read_text())["test"]["retrieval"]["i2t_r1"] == m["test"]["retrieval"]["i2t_r1"]
    assert "robustness" not in m["test"]
    with pytest.raises(InputError, match="dataset name must match"):
        evaluate.run_external(other, cfg, ctx, "../x", encoder=StandInEncoder())

    none = evaluate.per_query(ctx.run_dir, "test")
    ext = evaluate.per_query(ctx.run_dir, "test", external="other")
    assert len(none["i2t_r1"]) == m["test"]["n_images"] and "acc5" in none
    better = {k: np.maximum(v, 1.0) if k.endswith("r10") else v for k, v in none.items()}
    tab = evaluate.ablation_table({"none": none, "aligned": better, "seeds": {k: np.stack([v, v]) for k, v in ext.items()}}, n_boot=200)
    base = tab[tab["scheme"] == "none"]
    assert (base["diff"] == 0).all() and not base["significant"].any()
    row = tab.query("scheme == 'aligned' and metric == 't2i_r10'").iloc[0]
    assert row["diff"] == pytest.approx(1 - none["t2i_r10"].mean()) and row["significant"]
    assert row["low"] <= row["value"] <= row["high"]
    with pytest.raises(InputError, match="baseline scheme 'none' missing"):
        evaluate.ablation_table({"light": none})


def test_input_and_config_errors(dataset, tmp_path):
    data, kept, _ = dataset
    with pytest.raises(InputError, match="missing column.*'split'"):
        evaluate.run(kept.drop(columns=["split"]), EvaluateConfig(), _ctx(data, tmp_path), encoder=StandInEncoder())
    with pytest.raises(InputError, match=r"no rows in evaluate.splits \['val'\]; the table's splits are \['test', 'train'\]"):
        evaluate.run(kept[kept["split"] != "val"], EvaluateConfig(splits=["val"]), _ctx(data, tmp_path), encoder=StandInEncoder())
    with pytest.raises(InputError, match="no trained model at"):
        evaluate.run(kept, EvaluateConfig(), _ctx(data, tmp_path))
    with pytest.raises(ValueError, match="unknown degradation 'fog'; expected one of blur, brightness, downscale, jpeg, noise"):
        EvaluateConfig(degradations={"fog": [1]})
    with pytest.raises(ValueError, match=r"jpeg: severity must be in \[1, 95\], got 200"):
        EvaluateConfig(degradations={"jpeg": [200]})
    with pytest.raises(ValueError, match="needs '\\{\\}' for the class name"):
        EvaluateConfig(templates=["a photo"])
    with pytest.raises(ValueError, match="extra"):
        EvaluateConfig(bootstrp=10)
    assert issubclass(ConfigError, ValueError)


def test_loads_the_trained_model_folder_by_default(dataset, tmp_path):
    """No encoder given: evaluate loads RUN_DIR/train/model with mmcore.clip_model.Encoder."""
    torch = pytest.importorskip("torch")
    from mmcore import clip_model

    data, kept, _ = dataset
    ctx = _ctx(data, tmp_path)
    model_dir = ctx.stage_dir("train") / "model"
    # An untrained tiny model saved the way the train stage saves one (metrics are near chance).
    tok = clip_model.train_tokenizer(kept["text"].tolist(), 300)
    torch.manual_seed(0)
    model = clip_model.build_model("tiny", vocab_size=tok.get_vocab_size(), image_size=32)
    n_ctx = clip_model.context_length(model)
    clip_model.configure_tokenizer(tok, n_ctx)
    model.save_pretrained(model_dir)
    clip_model.save_tokenizer(tok, model_dir, n_ctx)
    clip_model.Preprocess(image_size=32, context_length=n_ctx).save(model_dir)
    cfg = EvaluateConfig(splits=["val"], bootstrap=50, robustness=False, spotcheck_n=2, device="cpu")
    res = evaluate.run(kept, cfg, ctx)
    m = json.loads((ctx.stage_dir("evaluate") / "metrics.json").read_text())
    assert 0 <= m["val"]["retrieval"]["i2t_r10"]["value"] <= 1 and res.stats["val_t2i_r1"] >= 0
    assert (ctx.stage_dir("evaluate") / "spotcheck.html").is_file()
