"""Config loading and the CLI's error contract: one line, non-zero exit, nothing written."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mmcore.config import load_config
from mmcore.errors import ConfigError
from tests.conftest import REPO

BAD = [
    ("clean:\n  min_chars: -1\n", r"clean.min_chars: input should be greater than or equal to 0, got -1"),
    ("clean:\n  min_char: 3\n", r"unknown config key 'clean.min_char' .*expected one of: .*min_chars"),
    ("clean:\n  min_chars: lots\n", r"clean.min_chars: input should be a valid integer.*got 'lots'"),
    ("clean:\n  min_chars: 50\n  max_chars: 10\n", r"max_chars \(10\) must be >= min_chars \(50\)"),
    ("bogus: 1\n", r"unknown config key 'bogus'"),
    ("- a\n- b\n", r"must be a mapping of sections, got list"),
    ("clean: [\n", r"invalid YAML in .* line"),
    ("run_name: 'bad name/..'\n", r"run_name: string should match pattern"),
]


@pytest.mark.parametrize("text, match", BAD)
def test_bad_config_is_one_line_error(tmp_path, text, match):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  manifest: m.csv\n" + text if not text.startswith("-") else text)
    with pytest.raises(ConfigError, match=match) as e:
        load_config(cfg)
    assert "\n" not in str(e.value)


def test_overrides_are_typed_and_validated(tmp_path):
    cfg = load_config(None, ["data.manifest=m.csv", "clean.min_words=3", "clean.fix_text=false", "seed=7"])
    assert cfg.clean.min_words == 3 and cfg.clean.fix_text is False and cfg.seed == 7
    assert cfg.data.manifest.is_absolute() and cfg.run_dir.is_absolute()
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        load_config(None, ["data.manifest"])
    with pytest.raises(ConfigError, match="config key 'data' is required"):
        load_config(None, [])


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "mmpipe", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "args, match",
    [
        (["run", "missing.yaml"], "error: config file not found: missing.yaml"),
        (["run", "c.yaml", "--set", "clean.min_chars=-5"], "error: clean.min_chars: input should be greater"),
        (["run", "c.yaml", "--set", "data.text_column=caption"], "error: data.text_column: column 'caption' not in manifest"),
        (["run", "c.yaml", "--set", "data.manifest=nope.csv"], "error: data.manifest: file not found"),
        (["run", "c.yaml", "--until", "nowhere"], "error: --until: unknown stage 'nowhere'"),
        (["inspect", "no_such_run"], "error: run folder not found"),
    ],
)
def test_cli_errors_are_one_line_nonzero_and_write_nothing(tmp_path, args, match):
    (tmp_path / "m.csv").write_text("image_path,text\na.jpg,a red circle on the left\n")
    (tmp_path / "c.yaml").write_text("data:\n  manifest: m.csv\nout: run\n")
    r = _cli(*args, cwd=tmp_path)
    assert r.returncode == 2, r
    assert r.stderr.strip().startswith(match), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / ".prefect").exists()


def test_help_explains_every_command():
    r = subprocess.run([sys.executable, "-m", "mmpipe", "--help"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0
    for cmd in ("synth", "run", "demo", "inspect"):
        assert cmd in r.stdout
        sub = subprocess.run([sys.executable, "-m", "mmpipe", cmd, "--help"], capture_output=True, text=True, cwd=REPO)
        assert sub.returncode == 0 and len(sub.stdout) > 200


def test_synth_cli_is_deterministic(tmp_path):
    for name in ("a", "b"):
        r = _cli("synth", str(tmp_path / name), "--n", "120", "--seed", "3", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
    a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*"))
    b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*"))
    assert a == b
    for rel in a:
        pa_, pb = tmp_path / "a" / rel, tmp_path / "b" / rel
        if pa_.is_file() and not pa_.is_symlink():
            assert pa_.read_bytes() == pb.read_bytes(), rel


def test_every_path_is_made_absolute_and_a_given_tokenizer_is_part_of_trains_inputs(tmp_path, monkeypatch):
    """Relative paths resolve where the config is read, so digests do not depend on where they are
    computed later; editing a tokenizer file in place makes train stale (its cache key changes)."""
    from mmcore import stale
    from mmcore.config import path_keys

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tok.json").write_text("{}")
    cfg = load_config(None, ["data.manifest=m.csv", "train.tokenizer_path=tok.json", "train.synonyms=syn.yaml", "out=run"])
    for key in ("data.manifest", "train.tokenizer_path", "train.synonyms", "out"):
        assert key in path_keys()
        section, _, name = key.rpartition(".")
        value = getattr(getattr(cfg, section) if section else cfg, name)
        assert value.is_absolute() and str(value).startswith(str(tmp_path)), key
    before = stale.extra_digest("train", cfg)
    monkeypatch.chdir("/")
    assert stale.extra_digest("train", cfg) == before
    (tmp_path / "tok.json").write_text('{"edited": 1}')
    assert stale.extra_digest("train", cfg) != before
