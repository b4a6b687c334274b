"""Fine-tuning a pretrained CLIP: the one model loader, the model's own tokenizer, pooling and
preprocessing, the fine-tuning settings, baseline vs fine-tuned, and one-line errors.

The pretrained model is a tiny CLIP with random weights saved in the exact layout of OpenAI's
Hugging Face checkpoint (``eos_token_id=2``, a ``CLIPTokenizer`` built from OpenAI's real BPE
merges, ``preprocessor_config.json`` with CLIP's mean and std), built once per session, offline.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from mmcore import clip_model, demo_split, evaluate, quality, tables, trainloop
from mmcore.base import StageContext
from mmcore.errors import InputError
from mmcore.evaluate import EvaluateConfig
from mmcore.layout import CHECKPOINT_DIR, LAST_CHECKPOINT, METRICS_FILE, TRAIN_CONFIG_FILE, RunLayout
from mmcore.train import FINETUNE_DEFAULTS, TrainConfig
from tests.conftest import write_train_run

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
SOT_ID, EOT_ID = 49406, 49407  # OpenAI's <|startoftext|>, <|endoftext|>
FAST = dict(batch_size=16, steps=2, num_workers=0, checkpoint_every=100, val_max_rows=20)
TEXTS = ["a photo of a cat", "A RED circle, on the left!! " * 20, "zebra"]


# --------------------------------------------------------------------------- fixtures


def _bytes_to_unicode() -> dict[int, str]:
    """OpenAI's byte -> printable-character table (the BPE's base alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, extra = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, map(chr, cs)))


def _openai_merges() -> list[tuple[str, str]]:
    spec = importlib.util.find_spec("open_clip")  # the package is not imported: only its data file is read
    bpe = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    return [tuple(m.split()) for m in lines]


def openai_tokenizer():
    """``CLIPTokenizer`` from the real merges in the open-clip-torch wheel (vocabulary built as OpenAI does)."""
    from transformers import CLIPTokenizer

    merges = _openai_merges()
    base = list(_bytes_to_unicode().values())
    vocab = base + [v + "</w>" for v in base] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges, model_max_length=77)


def save_openai_layout(out: Path, vocab_size: int = 49408, seed: int = 0) -> Path:
    """A tiny random CLIP saved as OpenAI's HF checkpoint is: config (eos_token_id=2), weights,
    tokenizer files, vocab.json + merges.txt, preprocessor_config.json."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tok = openai_tokenizer()
    torch.manual_seed(seed)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    cfg = CLIPConfig(
        text_config=dict(small, vocab_size=vocab_size, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1),
        vision_config=dict(small, image_size=32, patch_size=8),
        projection_dim=16,
    )
    CLIPModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    (out / "vocab.json").write_text(json.dumps(tok.get_vocab()))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in _openai_merges()) + "\n")
    CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=list(OPENAI_MEAN),
        image_std=list(OPENAI_STD),
    ).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def openai_clip(tmp_path_factory) -> Path:
    """The OpenAI-layout tiny CLIP; tests must not modify it (copy it first)."""
    return save_openai_layout(tmp_path_factory.mktemp("openai") / "clip-vit-tiny")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    table, data = demo_split.make(tmp_path_factory.mktemp("synth"), n=240, seed=2)
    return table, data


def _ctx(data, run_dir: Path) -> StageContext:
    return StageContext(data=data, run_dir=run_dir, seed=0, workers=1)


@pytest.fixture(scope="module")
def finetuned(demo, openai_clip, tmp_path_factory):
    """A run fine-tuned from the OpenAI-layout model with no other setting than its length."""
    table, data = demo
    run = tmp_path_factory.mktemp("ft")
    res = trainloop.run_stage(table, TrainConfig(model_path=openai_clip, **FAST), _ctx(data, run))
    return run, res


def _images(n: int = 3, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(32, 32), (70, 50), (41, 90)]
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in sizes[:n]]


def _hf_embeddings(folder: Path, images, texts) -> tuple[np.ndarray, np.ndarray]:
    """What a user gets with transformers alone: CLIPModel + AutoProcessor."""
    from transformers import AutoProcessor, CLIPModel

    model, proc = CLIPModel.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)
    x = proc(images=images, text=texts, return_tensors="pt", padding="max_length", truncation=True)
    with torch.no_grad():
        ie = model.get_image_features(pixel_values=x["pixel_values"]).pooler_output
        te = model.get_text_features(input_ids=x["input_ids"]).pooler_output
    return (torch.nn.functional.normalize(ie, dim=-1).numpy(), torch.nn.functional.normalize(te, dim=-1).numpy())


# --------------------------------------------------------------------------- the loader


def test_openai_layout_uses_its_own_tokenizer_pooling_and_preprocessing(openai_clip):
    from transformers import CLIPTokenizer

    m = clip_model.load(openai_clip)
    assert m.kind == "huggingface" and m.model.config.text_config.eos_token_id == 2  # config left as OpenAI wrote it
    ids = clip_model.tokenize(m.tokenizer, TEXTS)
    ref = CLIPTokenizer.from_pretrained(openai_clip)(TEXTS, padding="max_length", max_length=77, truncation=True)["input_ids"]
    assert ids.tolist() == ref
    assert ids[0, :7].tolist() == [SOT_ID, 320, 1125, 539, 320, 2368, EOT_ID]  # OpenAI's ids for "a photo of a cat"
    assert ids[1, -1] == EOT_ID  # a truncated caption still ends with its end token
    # transformers pools the text at the end token
    with torch.no_grad():
        out = m.model.text_model(input_ids=ids)
    eot = (ids == EOT_ID).int().argmax(1)
    assert torch.allclose(out.pooler_output, out.last_hidden_state[torch.arange(3), eot])
    # normalisation and resolution come from the folder, not ImageNet's
    assert m.pre.mean == OPENAI_MEAN and m.pre.std == OPENAI_STD and m.pre.image_size == 32


def test_loader_embeds_exactly_like_clipmodel_and_autoprocessor(openai_clip):
    enc = clip_model.Encoder.load(openai_clip)
    imgs = _images()
    ie, te = _hf_embeddings(openai_clip, imgs, TEXTS)
    assert np.allclose(enc.encode_images(imgs, batch_size=2), ie, atol=1e-5)
    assert np.allclose(enc.encode_texts(TEXTS, batch_size=2), te, atol=1e-5)


def test_pooling_is_fixed_for_a_tokenizer_whose_end_token_is_not_the_largest_id(demo, tmp_path):
    """An OpenAI-style config (eos_token_id=2, argmax pooling) with mmpipe's own tokenizer (end id 3)."""
    table, _ = demo
    tok = clip_model.train_tokenizer(table["text"].tolist(), 300)
    model = clip_model.build_model("micro", vocab_size=tok.get_vocab_size())
    model.config.text_config.eos_token_id = model.text_model.eos_token_id = 2
    clip_model.configure_tokenizer(tok, clip_model.context_length(model))
    eot = tok.token_to_id(clip_model.EOT)
    clip_model.align_pooling(model, tok, eot, "model")
    ids = clip_model.tokenize(tok, TEXTS)
    with torch.no_grad():
        out = model.text_model(input_ids=ids)
    at = (ids == eot).int().argmax(1)
    assert model.config.text_config.eos_token_id == eot
    assert torch.allclose(out.pooler_output, out.last_hidden_state[torch.arange(3), at])


# --------------------------------------------------------------------------- training from it


def test_finetune_with_no_other_setting_uses_the_models_tokenizer_and_processor(finetuned, openai_clip):
    run, res = finetuned
    s = res.stats
    assert s["source"] == "huggingface" and s["steps"] == 2 and s["image_size"] == 32
    saved = tables.read_json(run / "train" / TRAIN_CONFIG_FILE)
    assert saved["lr"] == FINETUNE_DEFAULTS["lr"] and saved["warmup_fraction"] == 0.1 and saved["vocab_size"] is None
    out = RunLayout(run).model
    assert not (out / clip_model.PREPROCESS_FILE).exists()  # a Hugging Face folder stays one
    assert json.loads((out / clip_model.PROCESSOR_FILE).read_text())["image_mean"] == list(OPENAI_MEAN)
    m = clip_model.load(out)
    assert clip_model.tokenize(m.tokenizer, TEXTS).tolist() == clip_model.tokenize(clip_model.load(openai_clip).tokenizer, TEXTS).tolist()
    # CLIPModel + AutoProcessor, and mmpipe's loader, embed the fine-tuned folder alike
    imgs = _images()
    ie, te = _hf_embeddings(out, imgs, TEXTS)
    enc = clip_model.Encoder.load(out)
    assert np.allclose(enc.encode_images(imgs), ie, atol=1e-5) and np.allclose(enc.encode_texts(TEXTS), te, atol=1e-5)
    a, b = load_file(openai_clip / "model.safetensors"), load_file(out / "model.safetensors")
    assert not torch.equal(a["text_projection.weight"], b["text_projection.weight"])  # it did train


def test_wise_ft_saves_the_ensemble_and_alpha_zero_is_the_source(demo, openai_clip, tmp_path):
    table, data = demo
    trainloop.run_stage(table, TrainConfig(model_path=openai_clip, wise_ft_alpha=0.0, **FAST), _ctx(data, tmp_path / "a0"))
    out = RunLayout(tmp_path / "a0").model
    src = load_file(openai_clip / "model.safetensors")
    got = load_file(out / "model.safetensors")
    assert all(torch.equal(src[k], got[k]) for k in src)
    # step-0 embeddings: the saved model is the source, and embeds as the source does
    imgs = _images()
    ie, te = _hf_embeddings(openai_clip, imgs, TEXTS)
    enc = clip_model.Encoder.load(out)
    assert np.allclose(enc.encode_images(imgs), ie, atol=1e-6) and np.allclose(enc.encode_texts(TEXTS), te, atol=1e-6)
    # alpha=0.5: halfway between the source and the raw fine-tuned weights (kept in the checkpoint)
    trainloop.run_stage(table, TrainConfig(model_path=openai_clip, wise_ft_alpha=0.5, lr=1e-3, **FAST), _ctx(data, tmp_path / "a5"))
    raw = trainloop.load_checkpoint(tmp_path / "a5" / "train" / CHECKPOINT_DIR / LAST_CHECKPOINT)["model"]
    mix = load_file(RunLayout(tmp_path / "a5").model / "model.safetensors")
    k = "vision_model.encoder.layers.0.mlp.fc1.weight"
    assert not torch.equal(raw[k], src[k])
    assert torch.allclose(mix[k], 0.5 * src[k] + 0.5 * raw[k], atol=1e-6)


def test_locked_image_tower_keeps_all_but_its_last_block(demo, openai_clip, tmp_path):
    table, data = demo
    cfg = TrainConfig(model_path=openai_clip, lock_image=True, lock_image_unlocked_layers=1, lr=1e-3, projection_lr=1e-2, **FAST)
    res = trainloop.run_stage(table, cfg, _ctx(data, tmp_path))
    a, b = load_file(openai_clip / "model.safetensors"), load_file(RunLayout(tmp_path).model / "model.safetensors")
    frozen = [k for k in a if k.startswith("vision_model.") and not k.startswith(("vision_model.encoder.layers.1.", "vision_model.post_layernorm"))]
    assert frozen and all(torch.equal(a[k], b[k]) for k in frozen)
    for k in ("vision_model.encoder.layers.1.mlp.fc1.weight", "visual_projection.weight", "text_model.encoder.layers.0.mlp.fc1.weight"):
        assert not torch.equal(a[k], b[k]), k
    assert res.stats["n_trainable"] < res.stats["n_params"]


def test_projection_lr_has_its_own_groups_and_warmup_fraction_scales_with_the_run(openai_clip):
    model = clip_model.load(openai_clip).model
    groups = trainloop.param_groups(model, 0.1, projection_scale=10.0)
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        is_proj = {names[id(p)].startswith(trainloop.PROJECTIONS) for p in g["params"]}
        assert is_proj == {g["lr_scale"] == 10.0}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    cfg = TrainConfig(model_path=openai_clip, lr=1e-4)
    assert cfg.warmup_steps is None and cfg.warmup_fraction == 0.1
    assert trainloop.get_lr(0, cfg, 0.0, total=100) == pytest.approx(1e-4 / 10)
    assert trainloop.get_lr(9, cfg, 0.09, total=100) == pytest.approx(1e-4)
    assert trainloop.get_lr(50, cfg, 0.5, total=100) == pytest.approx(0.5e-4)
    assert TrainConfig(**cfg.model_dump()) == cfg  # the resolved config reloads as itself


def test_batches_hold_each_image_once_and_an_epoch_draws_one_caption_per_image():
    groups = np.array(["a", "a", "b", "c", "c", "c", "d", "e", "f", "g"], dtype=object)
    plan = trainloop.BatchPlan(n=10, batch_size=3, grad_accum=1, seed=0, groups=groups)
    assert plan.epoch_size == 7 and plan.steps_per_epoch == 2
    for epoch in range(5):
        order = plan.order(epoch)
        assert sorted(groups[order]) == sorted(set(groups))  # each image once per epoch
    assert len({tuple(plan.order(e)) for e in range(8)}) > 1  # captions and order change per epoch
    it = iter(plan)
    for _ in range(6):
        batch = [i for _, i in next(it)]
        assert len(set(groups[batch])) == len(batch)
    plain = trainloop.BatchPlan(n=10, batch_size=3, grad_accum=1, seed=0, groups=np.arange(10))
    assert plain.groups is None and plain.epoch_size == 10  # one caption per image: the plain permutation


def test_pretrained_mmpipe_model_is_fine_tuned_with_its_own_tokenizer(demo, tmp_path):
    """The benchmark's path: a preset model mmpipe trained, then fine-tuned from its folder."""
    table, data = demo
    trainloop.run_stage(table, TrainConfig(preset="micro", vocab_size=400, **FAST), _ctx(data, tmp_path / "pre"))
    src = RunLayout(tmp_path / "pre").model
    res = trainloop.run_stage(table, TrainConfig(model_path=src, **FAST), _ctx(data, tmp_path / "ft"))
    assert res.stats["source"] == "mmpipe"
    a, b = clip_model.load(src), clip_model.load(RunLayout(tmp_path / "ft").model)
    assert a.pre == b.pre and a.tokenizer.get_vocab() == b.tokenizer.get_vocab()
    assert clip_model.tokenize(a.tokenizer, TEXTS).tolist() == clip_model.tokenize(b.tokenizer, TEXTS).tolist()


# --------------------------------------------------------------------------- evaluate


def test_evaluate_compares_with_the_model_training_started_from(finetuned, demo):
    run, _ = finetuned
    table, data = demo
    cfg = EvaluateConfig(splits=["test"], bootstrap=50, robustness=False, spotcheck_n=0, device="cpu")
    res = evaluate.run(table, cfg, _ctx(data, run))
    m = tables.read_json(RunLayout(run).metrics)
    b = m["baseline"]
    assert Path(b["model"]) == Path(tables.read_json(run / "train" / TRAIN_CONFIG_FILE)["model_path"])
    c = b["test"]["retrieval"]["i2t_r5"]
    assert c["model"] == m["test"]["retrieval"]["i2t_r5"]
    assert c["diff"]["value"] == pytest.approx(c["model"]["value"] - c["baseline"]["value"])
    assert c["diff"]["low"] <= c["diff"]["value"] <= c["diff"]["high"] and 0 <= c["diff"]["p_value"] <= 1
    assert set(b["test"]["per_domain"]) == set(table.loc[table["split"] == "test", "domain"].dropna())
    assert "acc1" in b["test"]["zeroshot"]
    assert res.stats["baseline_test_i2t_r5"] == c["baseline"]["value"]
    md = evaluate.summary_markdown(m)
    assert "| test metric | baseline | this model | difference |" in md and "| i2t_r5 |" in md
    assert set(evaluate.metrics_table(m)["split"]) == {"test"}  # the baseline block is not a split
    off = evaluate.run(table, cfg.model_copy(update={"baseline": False}), _ctx(data, run))
    assert "baseline" not in tables.read_json(RunLayout(run).metrics) and "diff_test_i2t_r5" not in off.stats


def test_evaluate_runs_on_a_bare_hugging_face_folder(openai_clip, demo, tmp_path):
    table, data = demo
    shutil.copytree(openai_clip, RunLayout(tmp_path).model)
    cfg = EvaluateConfig(splits=["test"], bootstrap=20, robustness=False, spotcheck_n=2, device="cpu",
                         baseline_model=openai_clip)
    evaluate.run(table, cfg, _ctx(data, tmp_path))
    m = tables.read_json(tmp_path / "evaluate" / METRICS_FILE)
    assert 0 <= m["test"]["retrieval"]["t2i_r5"]["value"] <= 1
    c = m["baseline"]["test"]["retrieval"]["t2i_r5"]  # the same model: no difference
    assert c["diff"]["value"] == 0 and c["diff"]["low"] == 0 == c["diff"]["high"]
    # The report shows the comparison: starting model, this model, the paired difference.
    from mmcore import report

    html = report.build(tmp_path).read_text()
    assert 'data-key="evaluate.baseline.test.retrieval.t2i_r5.diff" data-value="0' in html
    assert "Against the starting model (test)" in html and ">baseline split<" not in html


def test_quality_alignment_score_uses_the_same_loader(openai_clip, demo):
    table, data = demo
    rows = table.head(6)
    scores, errors = quality.clip_scores(rows, openai_clip, str(data.image_root), batch_size=4)
    enc = clip_model.Encoder.load(openai_clip)
    imgs = [Image.open(data.image_root / p) for p in rows["image_path"]]
    want = (enc.encode_images(imgs) * enc.encode_texts(rows["text"].tolist())).sum(1)
    assert not any(errors) and np.allclose(scores, want, atol=1e-5)


# --------------------------------------------------------------------------- errors


def _broken_copies(openai_clip: Path, root: Path) -> dict[str, tuple[Path, str]]:
    """Folder -> (path, the one-line message it must give)."""
    from transformers import BertConfig

    out = {}
    bert = root / "bert"
    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).save_pretrained(bert)
    out["not_clip"] = (bert, r"is not a CLIP-family model: config.json has model_type 'bert'; expected one of clip")
    noproc = root / "noproc"
    shutil.copytree(openai_clip, noproc)
    (noproc / clip_model.PROCESSOR_FILE).unlink()
    out["no_processor"] = (noproc, r"lacks preprocessor_config.json: a Hugging Face model's image preprocessing")
    small = save_openai_layout(root / "small-vocab", vocab_size=1000)
    out["vocab"] = (small, r"the tokenizer has 49408 token ids but the model's text tower has 1000")
    out["missing"] = (root / "nope", r"does not exist; expected a Hugging Face CLIP model folder")
    return out


def test_bad_model_folders_are_one_line_errors(openai_clip, tmp_path):
    for name, (path, msg) in _broken_copies(openai_clip, tmp_path).items():
        with pytest.raises(InputError, match=msg) as e:
            clip_model.load(path, where="train.model_path")
        assert "\n" not in str(e.value) and str(e.value).startswith("train.model_path: "), name


def test_finetune_config_errors():
    with pytest.raises(ValueError, match="vocab_size trains a new tokenizer, but a pretrained model"):
        TrainConfig(model_path="/m", vocab_size=4096)
    for init in ("open_clip", "transformers"):  # was ignored with model_path; now a config error
        with pytest.raises(ValueError, match="init: a pretrained model .model_path. starts from its own weights"):
            TrainConfig(model_path="/m", init=init)
    with pytest.raises(ValueError, match="freeze every parameter"):
        TrainConfig(model_path="/m", lock_image=True, lock_text=True)
    with pytest.raises(ValueError, match="wise_ft_alpha ensembles with the starting weights; it needs model_path"):
        TrainConfig(wise_ft_alpha=0.5)
    with pytest.raises(ValueError, match="set warmup_steps or warmup_fraction, not both"):
        TrainConfig(warmup_steps=3, warmup_fraction=0.1)
    assert TrainConfig(model_path="/m", lock_image=True, lock_text=True, lock_text_unlocked_layers=1).lock_text




@pytest.mark.parametrize("case", ["not_clip", "no_processor", "vocab", "lock"])
def test_mmpipe_train_exits_2_with_one_line_and_writes_nothing(case, demo, openai_clip, tmp_path, capsys):
    from mmpipe import trainer

    table, data = demo
    broken = _broken_copies(openai_clip, tmp_path / "models") if case != "lock" else {}
    if case == "lock":
        train, msg = {"model_path": str(openai_clip), "lock_image": True, "lock_text": True}, "freeze every parameter"
    elif case == "vocab":
        train, msg = {"model_path": str(openai_clip), "tokenizer_path": str(tmp_path / "tok")}, "token ids but the model"
        # the OpenAI tokenizer (49408 ids) given for a model whose text tower has 1000
        train["model_path"] = str(broken["vocab"][0])
        openai_tokenizer().save_pretrained(tmp_path / "tok")
    else:
        train, msg = {"model_path": str(broken[case][0])}, broken[case][1]
    run = tmp_path / "run"
    write_train_run(run, table, data, {**train, "steps": 2, "batch_size": 16, "num_workers": 0})
    assert trainer.main([str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert pytest.importorskip("re").search(msg, err), err
    assert not (run / "train").exists()


# --------------------------------------------------------------------------- mmpipe evaluate on a bare folder


@pytest.mark.slow
def test_mmpipe_evaluate_runs_on_a_bare_hugging_face_folder(openai_clip, demo, tmp_path):
    """`mmpipe evaluate MODEL_FOLDER --data CFG`: the pretrained model before any fine-tuning, through
    the command line and the cached flow; a folder that is not a CLIP model is one line, exit 2."""
    import os
    import subprocess
    import sys

    _, data = demo
    cfg = tmp_path / "domain.yaml"
    cfg.write_text(yaml.safe_dump({"run_name": "domain", "data": {"manifest": str(data.manifest), "label_column": "label"},
                                   "evaluate": {"bootstrap": 20, "spotcheck_n": 2, "robustness": False}}))
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / ".prefect")}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "mmpipe", "evaluate", *map(str, args)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=600, env=env)

    r = cli(openai_clip, "--data", cfg, "--out", tmp_path / "pretrained")
    assert r.returncode == 0, r.stderr[-3000:]
    m = tables.read_json(RunLayout(tmp_path / "pretrained").external("domain") / METRICS_FILE)
    assert 0 <= m["test"]["retrieval"]["i2t_r5"]["value"] <= 1 and "i2t_r5" in r.stdout
    (tmp_path / "not-a-model").mkdir()
    r = cli(tmp_path / "not-a-model", "--data", cfg, "--out", tmp_path / "nothing")
    assert r.returncode == 2 and r.stderr.startswith("error: evaluate:") and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "nothing").exists()
