"""The pipeline config: one pydantic model per stage inside ``PipelineConfig``, read from YAML.

``load_config`` is the only YAML reader (the CLI and ``deployments/`` use it). Errors are one
line: what, where, got, expected.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from mmcore import graph
from mmcore.alerts import AlertConfig
from mmcore.base import DataConfig, StrictModel, default_workers
from mmcore.clean import CleanConfig
from mmcore.decontam import DecontamConfig
from mmcore.errors import ConfigError
from mmcore.evaluate import EvaluateConfig
from mmcore.probe import ProbeConfig
from mmcore.pseudo import PseudoConfig
from mmcore.quality import QualityConfig
from mmcore.report import ReportConfig
from mmcore.resources import PRESETS
from mmcore.split import SplitConfig
from mmcore.storage import StorageConfig
from mmcore.train import TrainConfig


class PipelineConfig(StrictModel):
    """Everything a run needs; saved resolved as ``RUN_DIR/config.yaml``."""

    run_name: str = Field("mmpipe", min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    out: Path | None = Field(None, description="Run folder; default runs/<run_name>. A URL (s3://bucket/runs/NAME): the run "
                             "works in a local copy and uploads each stage when it is done (mmcore.storage).")
    seed: int = Field(0, ge=0)
    workers: int = Field(0, ge=0, description="Processes for image work; 0 = one per core.")
    data: DataConfig
    storage: StorageConfig = Field(StorageConfig(), description="Remote storage: Prefect's result storage and report "
                                   "links (mmcore/storage.py). Not in any stage's cache key.")
    alert: AlertConfig = Field(AlertConfig(), description="When an evaluation counts as a regression (a Prefect "
                               "event an automation alerts on; tasks/events.py). Not in any stage's cache key.")
    clean: CleanConfig = CleanConfig()
    probe: ProbeConfig = ProbeConfig()
    quality: QualityConfig = QualityConfig()
    decontam: DecontamConfig = DecontamConfig()
    split: SplitConfig = SplitConfig()
    pseudo: PseudoConfig = PseudoConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    report: ReportConfig = ReportConfig()

    @model_validator(mode="before")
    @classmethod
    def _remote_out(cls, values: Any) -> Any:
        # out as a URL: the run works in its local copy and uploads each stage (mmcore.storage).
        if not isinstance(values, dict) or "out" not in values:
            return values
        from mmcore import locations

        return {**values, "out": locations.as_local(values["out"], "out")}

    @property
    def run_dir(self) -> Path:
        return Path(self.out) if self.out is not None else Path("runs") / self.run_name

    @property
    def n_workers(self) -> int:
        return self.workers or default_workers()

    def section(self, stage: str) -> StrictModel:
        """The config section of a stage of the graph."""
        return getattr(self, graph.stage(stage).section)


def _check_sections() -> None:
    """The sections above are the graph's stages, each typed with the config model its record names
    (typed fields, so editors and Prefect's deployment form see them; checked here against the graph)."""
    stage_fields = [n for n, f in PipelineConfig.model_fields.items() if n in graph.STAGES or n not in _RUN_FIELDS]
    assert stage_fields == [s.section for s in graph.STAGES.values()], (stage_fields, graph.ORDER)
    for s in graph.STAGES.values():
        want = getattr(sys.modules[s.module], s.config)
        got = PipelineConfig.model_fields[s.section].annotation
        assert got is want, f"PipelineConfig.{s.section} is {got}, the graph says {s.module}.{s.config}"


_RUN_FIELDS = ("run_name", "out", "seed", "workers", "data", "storage", "alert")
_check_sections()


def path_keys(model: type[BaseModel] = PipelineConfig, prefix: str = "") -> tuple[str, ...]:
    """Dotted keys of every field typed ``Path`` or ``Path | None``, in nested sections too (``train.synonyms``)."""
    keys: list[str] = []
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            keys += path_keys(field.annotation, f"{prefix}{name}.")
        elif field.annotation in (Path, Path | None):
            keys.append(prefix + name)
    return tuple(keys)


def _set(tree: dict[str, Any], dotted: str, value: Any, source: str) -> None:
    keys = dotted.split(".")
    node = tree
    for i, k in enumerate(keys[:-1]):
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {dotted}: {'.'.join(keys[: i + 1])} is a value, not a section ({source})")
        node = nxt
    node[keys[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """``a.b=value`` -> (``a.b``, YAML-parsed value)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _format_error(err: ValidationError, source: str) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"])
    kind = e["type"]
    if kind == "extra_forbidden":
        parent = PipelineConfig
        for p in e["loc"][:-1]:
            field = parent.model_fields.get(str(p)) if hasattr(parent, "model_fields") else None
            parent = field.annotation if field is not None else None
        valid = sorted(parent.model_fields) if hasattr(parent, "model_fields") else []
        hint = f"; expected one of: {', '.join(valid)}" if valid else ""
        return f"unknown config key {loc!r} ({source}){hint}"
    if kind == "missing":
        return f"config key {loc!r} is required ({source})"
    import reprlib

    msg = e["msg"].removeprefix("Value error, ").splitlines()[0][:300] if e["msg"] else ""
    msg = msg[0].lower() + msg[1:] if msg else msg
    # A bounded repr: the value may be huge, or an alias bomb whose plain repr is gigabytes.
    short = reprlib.Repr()
    short.maxlevel, short.maxlist, short.maxdict, short.maxstring, short.maxother, short.maxlong = 2, 4, 4, 60, 60, 40
    got = short.repr(e.get("input"))
    got = got if len(got) <= 120 else got[:117] + "..."
    return f"{loc or 'config'}: {msg}, got {got} ({source})" if loc else f"config: {msg} ({source})"


def _absolute_paths(model: BaseModel) -> BaseModel:
    """``model`` with every relative ``Path`` field, in nested sections too, made absolute."""
    update: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            if (fixed := _absolute_paths(value)) is not value:
                update[name] = fixed
        elif isinstance(value, dict) and any(isinstance(v, BaseModel) for v in value.values()):
            # Sections keyed by name (decontam.reference_sets: name -> data config).
            fixed_map = {k: _absolute_paths(v) if isinstance(v, BaseModel) else v for k, v in value.items()}
            if any(fixed_map[k] is not value[k] for k in value):
                update[name] = fixed_map
        elif isinstance(value, Path) and not value.is_absolute():
            update[name] = Path(os.path.abspath(value))
    return model.model_copy(update=update) if update else model


def _absolute(cfg: PipelineConfig) -> PipelineConfig:
    """Resolve relative paths (every field in ``path_keys``) against the current directory, so the
    saved config is self-contained and a stage's file digests do not depend on where it is read."""
    cfg = _absolute_paths(cfg)
    return cfg.model_copy(update={"out": Path(os.path.abspath(cfg.run_dir))})


def build_config(tree: dict[str, Any], source: str = "<dict>") -> PipelineConfig:
    try:
        return _absolute(PipelineConfig.model_validate(tree))
    except ValidationError as e:
        raise ConfigError(_format_error(e, source)) from None


def preset_names() -> list[str]:
    """The named config presets shipped in ``mmcore/data/presets/`` (file stems), sorted."""
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def preset(name: str) -> dict[str, Any]:
    """A named preset's sections; an unknown name is a one-line error listing the valid ones."""
    if name not in preset_names():
        raise ConfigError(f"unknown preset {name!r}; expected one of: {', '.join(preset_names())}")
    tree = yaml.safe_load((PRESETS / f"{name}.yaml").read_text()) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"preset {name!r} must be a mapping of sections, got {type(tree).__name__}")
    return tree


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` layered on ``base``: mappings merge key by key, anything else replaces."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(
    path: str | os.PathLike | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    presets: list[str] | tuple[str, ...] = (),
) -> PipelineConfig:
    """Read a YAML config, layer the named ``presets`` on it, apply ``key.sub=value`` overrides and validate it."""
    tree: dict[str, Any] = {}
    source = "<overrides>"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        max_bytes, max_values, max_depth = 1 << 20, 100_000, 64  # far beyond any real config
        if p.stat().st_size > max_bytes:
            raise ConfigError(f"config {p} is {p.stat().st_size} bytes; expected at most {max_bytes}")
        try:
            loaded = yaml.safe_load(p.read_text(errors="replace"))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"invalid YAML in {p}{where}: {str(getattr(e, 'problem', e))[:200]}") from None
        except RecursionError:
            raise ConfigError(f"invalid YAML in {p}: nested too deeply; expected at most {max_depth} levels") from None

        # Aliases share one object, so an alias bomb loads in kilobytes but expands to billions of
        # values when validated or printed: count values as expanded, and stop at the limits.
        budget = [max_values]

        def walk(node: Any, depth: int) -> None:
            budget[0] -= 1
            if budget[0] < 0:
                raise ConfigError(f"config {p} expands to more than {max_values} values (YAML aliases?); "
                                  "expected a plain mapping of sections")
            if depth > max_depth:
                raise ConfigError(f"config {p} is nested more than {max_depth} levels deep")
            if isinstance(node, dict):
                for k, v in node.items():
                    walk(k, depth + 1)
                    walk(v, depth + 1)
            elif isinstance(node, list):
                for v in node:
                    walk(v, depth + 1)

        walk(loaded, 0)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config {p} must be a mapping of sections, got {type(loaded).__name__}")
        tree = loaded
    for name in presets:
        tree = _merge(tree, preset(name))
    for item in overrides:
        key, value = parse_override(item)
        _set(tree, key, value, source)
    return build_config(tree, source)


def check_paths(cfg: PipelineConfig) -> None:
    """Every file or folder the config names must exist: a typo fails before the run, not in its last stage."""
    for name, section in cfg:
        if not isinstance(section, StrictModel):
            continue
        for key, value in section:
            if isinstance(value, Path) and not value.exists():
                raise ConfigError(f"{name}.{key}: not found: {value}")
            if isinstance(value, dict):  # named sub-configs (decontam.reference_sets)
                for sub, model in value.items():
                    for field, v in model if isinstance(model, BaseModel) else ():
                        if isinstance(v, Path) and not v.exists():
                            raise ConfigError(f"{name}.{key}.{sub}.{field}: not found: {v}")


def portable(cfg: PipelineConfig) -> dict[str, Any]:
    """The resolved config as JSON values, with the local copy of a remote location written as its
    URL (``mmcore.locations``): the same on every worker, whatever its cache folder. ``config.yaml``
    and a typed deployment's parameters are this."""
    from mmcore.locations import url_of

    def walk(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x) for x in v]
        if isinstance(v, str) and os.path.isabs(v) and (url := url_of(v)) is not None:
            return url
        return v

    return walk(cfg.model_dump(mode="json"))


def dump_config(cfg: PipelineConfig) -> str:
    """The resolved config as YAML (``portable``: paths as strings, remote locations as URLs), as
    written to ``RUN_DIR/config.yaml``."""
    return yaml.safe_dump(portable(cfg), sort_keys=False, allow_unicode=True)


# --------------------------------------------------------------------------- the README's reference

_LONG = 64  # a default longer than this in JSON shows as "(see module)"


def _default_text(value: Any) -> str:
    import json

    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, str):
        return value
    if isinstance(value, tuple):
        value = list(value)
    text = json.dumps(value, default=str)
    return "(see module)" if len(text) > _LONG else text


def reference_rows(model: type[BaseModel] = PipelineConfig, prefix: str = "") -> list[str]:
    """``| `key` = `default` | description |`` for every setting of the stage sections and of
    ``data``, in the config's order, nested sections flattened (``alert.max_drop``)."""
    rows: list[str] = []
    for name, field in model.model_fields.items():
        if not prefix and name in ("run_name", "out", "seed", "workers"):
            continue
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows += reference_rows(ann, f"{prefix}{name}.")
            continue
        default = field.get_default(call_default_factory=True)
        meaning = " ".join((field.description or "").split()).replace("|", "\\|")
        rows.append(f"| `{prefix}{name}` = `{_default_text(default)}` | {meaning} |")
    return rows


def reference_table() -> str:
    """The README's config reference (a test keeps them equal)."""
    return "\n".join(["| key = default | meaning |", "|---|---|", *reference_rows()])
