"""What the report reads from a run folder, in typed form: each stage's ``stats.json`` and
``status.json``, declared once here, so the sections read fields instead of guarding every ``.get``.

A stats file that does not have its declared shape is one line of error (the section showing it
says so; the rest of the report is still built). Keys a model does not declare are the stage's
own figures, shown as they are (``StageStats.figures``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError

from mmcore import graph, tables
from mmcore.errors import InputError
from mmcore.layout import RunLayout

STAGE = "report"
# The stages whose artifacts the report shows, in graph order (the graph's ``reads`` of the report).
UPSTREAM: tuple[str, ...] = tuple(s for s in graph.ORDER if s in graph.stage(STAGE).reads)


class _Shape(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class StageStats(_Shape):
    """What every stage's ``stats.json`` has: the counters and digests ``tables.write_stage`` writes."""

    stage: str = ""
    n_rows: int = 0
    n_kept: int = 0
    n_quarantined: int = 0
    reasons: dict[str, int] = {}
    seconds: float = 0.0
    input_digest: str = ""
    config_digest: str = ""
    code_digest: str = ""
    kept_digest: str = ""
    quarantine_digest: str = ""
    _raw: dict[str, Any] = PrivateAttr(default_factory=dict)

    @classmethod
    def parse(cls, raw: dict[str, Any], where: str = "stats") -> StageStats:
        if not isinstance(raw, dict):
            raise InputError(f"{where}: expected a JSON object, got {type(raw).__name__}")
        try:
            out = cls.model_validate(raw)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(map(str, err["loc"]))
            raise InputError(f"{where}: {loc}: {err['msg']}, got {err.get('input')!r:.80}") from None
        out._raw = dict(raw)
        return out

    def figures(self, skip: Iterable[str] = ()) -> dict[str, Any]:
        """The stage's own figures, as in the file: every key but the common ones (and ``skip``)."""
        common = set(StageStats.model_fields) | set(skip)
        return {k: v for k, v in self._raw.items() if k not in common}


class QualityStats(StageStats):
    thresholds: dict[str, float] = {}  # every check the stage ran
    flagged: dict[str, int] | None = None  # rows each check flags (a row can fail several); older runs lack it


class ReferenceSetStats(_Shape):
    """One reference set in decontam's stats."""

    n_rows: int = 0
    n_images: int = 0
    n_undecoded: int = 0
    cached: bool = False
    contaminated_rows: int = 0
    matched_reference_rows: int = 0
    by_kind: dict[str, int] = {}


class DecontamStats(StageStats):
    n_images: int = 0
    reference_sets: dict[str, ReferenceSetStats] = {}
    mirror: dict[str, float | int] = {}
    semantic: dict[str, float | int | str] | str = ""  # a string says why it is off


class SplitShare(_Shape):
    """One split's row in the split's stats; a fallback counted from the kept table has rows (and groups) only."""

    rows: int = 0
    groups: int | None = None
    ratio: float | None = None
    target: float | None = None
    deviation: float | None = None


class SplitStats(StageStats):
    splits: dict[str, SplitShare] = {}
    leakage: dict[str, int] | None = None  # rows sharing a digest, a near-duplicate cluster, a group
    caption_overlap: int | None = None
    distributions: dict[str, dict[str, dict[str, int]]] = {}  # dimension -> split -> value -> rows
    warnings: list[str] = []


class MarginHistogram(_Shape):
    edges: list[float] = []
    counts: list[int] = []


class PseudoStats(StageStats):
    """The pseudo stage's own figures (off: ``enabled`` false and nothing else)."""

    enabled: bool = False
    teacher: str = ""
    bank: str = ""
    n_bank: int = 0
    n_train: int = 0
    n_uncaptioned: int = 0
    n_uncaptioned_train: int = 0
    n_low_alignment: int = 0
    n_candidates: int = 0
    n_pseudo: int = 0
    n_pseudo_uncaptioned: int = 0
    n_pseudo_relabelled: int = 0
    min_margin: float | None = None
    weight: float | None = None
    margin_hist: MarginHistogram = MarginHistogram()
    margin_quantiles: dict[str, float] = {}


class TrainStats(StageStats):
    device: str | None = None
    steps: int | None = None
    final_loss: float | None = None
    samples_per_s: float | None = None


class StageStatus(_Shape):
    """``status.json``, written by the task layer: whether this run took the stage from cache."""

    cached: bool | None = None  # None: no status.json (the stage was run outside the task layer)
    finished: str = ""


# --------------------------------------------------------------------------- reading the run

S = TypeVar("S", bound=StageStats)


@dataclass
class Run:
    """A run folder's artifacts, read lazily and each stats file at most once."""

    layout: RunLayout
    config_error: str = ""  # why the run's config.yaml does not validate, as the caller found it
    _raw: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    _stats: dict[tuple[str, type], StageStats | None] = field(default_factory=dict)

    @property
    def dir(self) -> Path:
        return self.layout.root

    def stats(self, stage: str, shape: type[S] = StageStats) -> S | None:
        """A stage's stats in ``shape`` (the common counters, or a stage's own ``QualityStats`` ...),
        or ``None`` if the stage has not run. Only the sections reading a stage's own figures ask
        for its shape, so a stats file with odd own figures costs those sections only."""
        if stage not in self._raw:
            p = self.layout.stage(stage).stats
            self._raw[stage] = tables.read_json(p) if p.is_file() else None
        if (stage, shape) not in self._stats:
            raw = self._raw[stage]
            where = self.rel(self.layout.stage(stage).stats)
            self._stats[stage, shape] = shape.parse(raw, where) if raw is not None else None
        return self._stats[stage, shape]

    def ran(self, stages: Iterable[str] = graph.ORDER) -> list[str]:
        return [s for s in stages if self.stats(s) is not None]

    def status(self, stage: str) -> StageStatus:
        p = self.layout.stage(stage).status
        return StageStatus.model_validate(tables.read_json(p)) if p.is_file() else StageStatus()

    def table(self, stage: str, quarantine: bool = False, columns: Iterable[str] | None = None,
              suffix: str | None = None) -> pd.DataFrame | None:
        """A stage's kept (or quarantine) table, only the named columns (and those ending in ``suffix``)."""
        paths = self.layout.stage(stage)
        path = paths.quarantine if quarantine else paths.kept
        if not path.is_file():
            return None
        names = pq.read_schema(path).names
        want = [c for c in names if (columns is not None and c in columns) or (suffix is not None and c.endswith(suffix))]
        return tables.read_parquet(path, columns=want if columns is not None or suffix is not None else None)

    def rel(self, path: Path) -> str:
        """A path of the run as shown on the page: relative to the run folder."""
        return str(path.relative_to(self.dir))
