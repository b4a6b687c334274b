"""One plug-in idiom: checks, augmentations, degradations and manifest readers share ``Registry``."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mmcore import augment, checks, clean, robustness, tables
from mmcore.base import DataConfig
from mmcore.errors import ConfigError, InputError
from mmcore.registry import Registry

# --------------------------------------------------------------------------- the registry


def test_register_get_and_iterate_in_registration_order():
    reg: Registry[int] = Registry("widget")
    assert reg.register("b", 2) == 2

    @reg.register("a")
    def one() -> int:
        return 1

    assert reg.get("a") is one and reg["b"] == 2
    assert reg.names() == ("b", "a") and list(reg) == ["b", "a"] and dict(reg.items()) == {"b": 2, "a": one}
    assert len(reg) == 2 and "a" in reg and "c" not in reg


def test_a_duplicate_name_raises():
    reg: Registry[int] = Registry("widget")
    reg.register("a", 1)
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        reg.register("a", 2)
    assert reg["a"] == 1


def test_an_unknown_name_is_one_line_listing_the_sorted_names():
    reg: Registry[int] = Registry("widget")
    for name in ("zeta", "alpha", "mid"):
        reg.register(name, 0)
    with pytest.raises(ConfigError, match=r"^widgets.kind: unknown widget 'beta'; expected one of alpha, mid, zeta$"):
        reg.get("beta", where="widgets.kind")
    with pytest.raises(ConfigError, match=r"^unknown widget 'beta'; expected one of alpha, mid, zeta$"):
        reg["beta"]
    # A collection names every unknown entry.
    with pytest.raises(ConfigError, match=r"^w: unknown widget\(s\) 'x', 'y'; expected one of alpha, mid, zeta$"):
        reg.check(["alpha", "x", "y"], where="w")
    assert reg.problem(["alpha", "mid"]) is None and reg.problem("alpha") is None
    reg.check("zeta")


def test_the_error_type_and_wording_are_the_registrys():
    reg: Registry[int] = Registry("format", error=InputError, unknown="unsupported")
    reg.register(".a", 0)
    with pytest.raises(InputError, match=r"^unsupported format '.b'; expected one of .a$"):
        reg.get(".b")


# --------------------------------------------------------------------------- quality checks


def test_checks_are_a_registry_used_by_quality():
    from mmcore import quality

    assert isinstance(checks.CHECKS, Registry)
    assert set(checks.DEFAULT_CHECKS) < set(checks.CHECKS) and "low_alignment" in checks.CHECKS
    assert all(quality.REASONS[name] == c.reason for name, c in checks.CHECKS.items())
    assert [c.name for c in checks.get(["blurry", "too_small"])] == ["blurry", "too_small"]
    with pytest.raises(ValueError, match="check 'blurry' is already registered"):
        checks.register(checks.Check("blurry", lambda df: df, 0.5, "again"))


# --------------------------------------------------------------------------- augmentation schemes


def test_every_augmentation_scheme_is_registered_and_applies():
    assert isinstance(augment.SCHEMES, Registry)
    assert augment.SCHEMES.names() == ("none", "light", "aligned", "cross_modal", "synonym", "degrade")  # 'none' first
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    for name in augment.SCHEMES:
        out, text = augment.apply(name, img, "a red circle on the left", np.random.default_rng(1), 32, {"red": ["crimson"]})
        assert out.size == (32, 32) and text, name
    with pytest.raises(ConfigError, match=r"^train.augment: unknown augmentation 'bogus'; expected one of aligned, cross_modal, degrade, light, none, synonym$"):
        augment.apply("bogus", img, "x", np.random.default_rng(0), 32)


def test_train_augment_is_checked_against_the_registry_not_a_literal(monkeypatch):
    from mmcore.train import TrainConfig

    assert TrainConfig.model_fields["augment"].annotation is str
    with pytest.raises(ValueError, match="unknown augmentation 'bogus'; expected one of aligned, cross_modal, degrade, light"):
        TrainConfig(augment="bogus")
    # A newly registered scheme is a valid config value without touching train.py.
    monkeypatch.setitem(augment.SCHEMES._items, "grayscale", lambda img, text, rng, size, syn: (img, text))
    assert TrainConfig(augment="grayscale").augment == "grayscale"


# --------------------------------------------------------------------------- robustness degradations


def test_every_degradation_is_registered_with_its_defaults_and_keeps_the_size():
    assert isinstance(robustness.DEGRADATIONS, Registry)
    assert list(robustness.DEFAULT_SEVERITIES) == list(robustness.DEGRADATIONS)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    for name, sevs in robustness.DEFAULT_SEVERITIES.items():
        for s in sevs:
            assert robustness.degrade(img, name, s).size == img.size, (name, s)
    with pytest.raises(ConfigError, match=r"^evaluate.degradations: unknown degradation 'fog'; expected one of blur, brightness, downscale, jpeg, noise$"):
        robustness.degrade(img, "fog", 1.0)
    with pytest.raises(ConfigError, match=r"^unknown degradation 'fog'; expected one of blur, "):
        robustness.check({"blur": [0.01], "fog": [1]})
    with pytest.raises(ConfigError, match=r"^jpeg: severity must be in \[1, 95\], got 200$"):
        robustness.check({"jpeg": [200]})


# --------------------------------------------------------------------------- manifest readers


def _write(df: pd.DataFrame, path) -> None:
    suffix = path.suffix
    if suffix == ".csv":
        df.to_csv(path, index=False)
    elif suffix == ".tsv":
        df.to_csv(path, index=False, sep="\t")
    elif suffix in (".parquet", ".pq"):
        df.to_parquet(path)
    else:
        df.to_json(path, orient="records", lines=True)


def test_every_registered_suffix_reads_a_manifest(tmp_path):
    assert isinstance(clean.READERS, Registry)
    assert set(clean.READERS) == {".csv", ".tsv", ".parquet", ".pq", ".jsonl", ".ndjson", ".json"}
    df = pd.DataFrame({"image_path": ["a.jpg", "b.jpg"], "text": ["a red circle, on the left", "NA"]})
    for suffix in clean.READERS:
        path = tmp_path / f"m{suffix}"
        _write(df, path)
        data = DataConfig(manifest=path)
        table = clean.read_manifest(data)
        assert table[tables.ROW_ID].tolist() == [0, 1], suffix
        assert table["text"].tolist() == ["a red circle, on the left", "NA"], suffix
        assert clean.manifest_columns(data) == ["image_path", "text"], suffix
    assert clean.read_input is clean.read_manifest


def test_tsv_is_split_on_tabs(tmp_path):
    path = tmp_path / "m.tsv"
    # Commas and plain quotes are text in a TSV; a field with a tab is quoted, as pandas writes it.
    path.write_text(
        'image_path\ttext\tid\n'
        'a.jpg\ta red circle, a blue square\t1\n'
        'b.jpg\ta 12" record, on the left\t2\n'
        'c.jpg\t"with\ta tab"\t3\n'
    )
    data = DataConfig(manifest=path)
    assert clean.manifest_columns(data) == ["image_path", "text", "id"]
    table = clean.read_manifest(data)
    assert table.columns.tolist() == [tables.ROW_ID, "image_path", "text", "id"]
    assert table["text"].tolist() == ["a red circle, a blue square", 'a 12" record, on the left', "with\ta tab"]
    assert table["id"].tolist() == ["1", "2", "3"]


def test_an_unsupported_manifest_format_lists_the_registered_suffixes(tmp_path):
    path = tmp_path / "m.xml"
    path.write_text("<x/>")
    with pytest.raises(InputError, match=r"unsupported format '.xml'; expected one of .csv, .json, .jsonl, .ndjson, .parquet, .pq, .tsv$") as e:
        clean.read_manifest(DataConfig(manifest=path))
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- config and CLI


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.augment=bogus",
         "train.augment: unknown augmentation 'bogus'; expected one of aligned, cross_modal, degrade, light, none, synonym, got 'bogus'"),
        ("evaluate.degradations={fog: [1]}",
         "evaluate.degradations: unknown degradation 'fog'; expected one of blur, brightness, downscale, jpeg, noise, got {'fog': [1]}"),
        ("quality.checks=[fuzzy]",
         "quality.checks: unknown check(s) 'fuzzy'; expected one of blurry, duplicate_image, extreme_aspect, low_alignment, "
         "low_information, too_bright, too_dark, too_small, got ['fuzzy']"),
    ],
)
def test_an_unknown_plugin_in_the_config_is_one_line_naming_the_key_once(override, message):
    from mmcore.config import load_config

    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.manifest=m.csv", override])
    assert str(e.value) == f"{message} (<overrides>)"


@pytest.mark.parametrize(
    "args, line",
    [
        (["run", "c.yaml", "--set", "train.augment=bogus"],
         "error: train.augment: unknown augmentation 'bogus'; expected one of aligned, cross_modal, degrade, light, none, synonym, got 'bogus' (c.yaml)"),
        (["ablate", "c.yaml", "--schemes", "none,bogus"],
         "error: --schemes: unknown augmentation(s) 'bogus'; expected one of aligned, cross_modal, degrade, light, none, synonym"),
    ],
)
def test_cli_prints_one_line_and_exits_2(tmp_path, args, line):
    (tmp_path / "m.csv").write_text("image_path,text\na.jpg,a red circle on the left\n")
    (tmp_path / "c.yaml").write_text("data:\n  manifest: m.csv\nout: run\n")
    r = subprocess.run([sys.executable, "-m", "mmpipe", *args], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r
    assert r.stderr.strip() == line, r.stderr
    assert not (tmp_path / "run").exists()
