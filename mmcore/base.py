"""Config base model, the data section and the context a stage runs in."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from mmcore import tables


class StrictModel(BaseModel):
    """Frozen, and unknown keys are errors: a YAML typo must not be silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(StrictModel):
    """Where the manifest is and what its columns are called."""

    manifest: Path = Field(description="Manifest file: .csv, .parquet or .jsonl (one JSON object per line).")
    root: Path | None = Field(None, description="Folder image paths are relative to; default: the manifest's folder.")
    image_column: str = Field("image_path", min_length=1)
    text_column: str = Field("text", min_length=1)
    group_column: str | None = Field(None, description="Rows sharing a value never straddle splits.")
    time_column: str | None = Field(None, description="Timestamp, for time-based splits.")
    label_column: str | None = Field(None, description="Class label, for zero-shot classification.")
    domain_column: str | None = Field(None, description="Domain (source, style), for cross-domain evaluation.")

    @property
    def image_root(self) -> Path:
        return Path(self.root) if self.root is not None else Path(self.manifest).parent

    def column_map(self) -> dict[str, str]:
        """User column -> canonical column, for every column the config names."""
        pairs = {
            self.image_column: tables.IMAGE,
            self.text_column: tables.TEXT,
            self.group_column: tables.GROUP,
            self.time_column: tables.TIME,
            self.label_column: tables.LABEL,
            self.domain_column: tables.DOMAIN,
        }
        return {k: v for k, v in pairs.items() if k is not None}


@dataclass(frozen=True)
class StageContext:
    """What a stage needs besides its table and its own config section."""

    data: DataConfig
    run_dir: Path
    seed: int = 0
    workers: int = 1
    progress: bool = False
    run_name: str = ""  # the config's run_name, for what a stage shows people (the report's title)

    def stage_dir(self, stage: str) -> Path:
        return tables.StagePaths.of(self.run_dir, stage).dir


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
