"""Config base model, the data section and the context a stage runs in."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mmcore import tables


class StrictModel(BaseModel):
    """Frozen, and unknown keys are errors: a YAML typo must not be silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# The input forms ``data.format`` names (``mmcore.ingest`` reads each; ``mmcore.sources`` serves their images).
FORMATS = ("manifest", "webdataset", "parquet", "coco", "karpathy")
DataFormat = Literal["manifest", "webdataset", "parquet", "coco", "karpathy"]
# Where each form's input is: a file (``manifest``) or files matching a pattern under the root (``shards``).
_NEEDS_MANIFEST = ("manifest", "coco", "karpathy")
_NEEDS_SHARDS = ("webdataset", "parquet")


class DataConfig(StrictModel):
    """Where the input is, in which form, and what its columns are called."""

    format: DataFormat = Field(
        "manifest",
        description="Input form: manifest (a table of image paths and captions), webdataset (img2dataset/webdataset "
                    "tar shards, read in place), parquet (Parquet files with the image bytes in a column), coco "
                    "(COCO captions_*.json), karpathy (Karpathy's dataset_coco.json / dataset_flickr30k.json).",
    )
    manifest: Path | None = Field(
        None,
        description="manifest: the table (.csv, .tsv, .parquet or .jsonl); coco and karpathy: the caption JSON file. "
                    "Not used by webdataset and parquet (see data.shards).",
    )
    root: Path | None = Field(
        None,
        description="Folder every image (file, shard or Parquet file) lies under; nothing outside it is ever read. "
                    "Default: the manifest's folder; required for webdataset and parquet.",
    )
    shards: str | None = Field(
        None,
        description="webdataset and parquet: the files under data.root, as a glob and/or brace pattern relative to it "
                    "('shards/{00000..00099}.tar', 'data/train-*.parquet'); matched files are read in sorted order.",
    )
    image_column: str = Field(
        "image_path", min_length=1,
        description="manifest: the image path column; parquet: the image column (binary, or a {bytes, path} struct "
                    "as Hugging Face datasets write it; default there: image).",
    )
    text_column: str = Field(
        "text", min_length=1, description="The caption column (manifest, parquet); webdataset and coco/karpathy: not used."
    )
    caption_field: str | None = Field(
        None,
        description="webdataset: take the caption from this field of each sample's .json member instead of its .txt "
                    "member.",
    )
    trust_sha256: bool = Field(
        False,
        description="webdataset: the probe takes img2dataset's sha256 (per-shard .parquet or .json) as the content "
                    "digest instead of hashing the bytes. Off by default: a wrong sha256 would merge different images.",
    )
    max_member_bytes: int = Field(
        64 << 20, ge=1,
        description="webdataset: a tar member larger than this is quarantined (member_too_large) and never read.",
    )
    group_column: str | None = Field(
        None, description="Rows sharing a value never straddle splits (coco, karpathy: the image id, always)."
    )
    time_column: str | None = Field(None, description="Timestamp, for time-based splits.")
    label_column: str | None = Field(None, description="Class label, for zero-shot classification.")
    domain_column: str | None = Field(None, description="Domain (source, style), for cross-domain evaluation.")

    @model_validator(mode="before")
    @classmethod
    def _remote(cls, values: Any) -> Any:
        # A URL in data.manifest or data.root names object storage: the stages read the local mirror
        # of it (``mmcore.storage``: ``local_path``; ``sync_inputs`` brings it up to date before a run).
        if not isinstance(values, dict):
            return values
        from mmcore import locations

        return {k: locations.as_local(v, f"data.{k}") if k in ("manifest", "root") else v for k, v in values.items()}

    @model_validator(mode="before")
    @classmethod
    def _form_defaults(cls, values: Any) -> Any:
        # Hugging Face datasets call the image column "image": the parquet form's default.
        if isinstance(values, dict) and values.get("format") == "parquet" and "image_column" not in values:
            values = {**values, "image_column": "image"}
        return values

    @model_validator(mode="after")
    def _form_fields(self) -> DataConfig:
        f = self.format
        if f in _NEEDS_MANIFEST and self.manifest is None:
            raise ValueError(f"data.format {f} needs data.manifest (the {'table' if f == 'manifest' else 'caption JSON file'})")
        if f in _NEEDS_SHARDS:
            if self.manifest is not None:
                raise ValueError(f"data.format {f} reads data.shards under data.root, not data.manifest; got manifest "
                                 f"{self.manifest}")
            if self.shards is None or not self.shards.strip():
                raise ValueError(f"data.format {f} needs data.shards (a glob or brace pattern under data.root)")
            if self.root is None:
                raise ValueError(f"data.format {f} needs data.root (the folder data.shards lies under)")
        elif self.shards is not None:
            raise ValueError(f"data.shards is for data.format webdataset or parquet; got format {f}")
        if self.caption_field is not None and f != "webdataset":
            raise ValueError(f"data.caption_field is for data.format webdataset; got format {f}")
        if self.trust_sha256 and f != "webdataset":
            raise ValueError(f"data.trust_sha256 is for data.format webdataset (img2dataset's sha256); got format {f}")
        if f in ("coco", "karpathy") and self.group_column is not None:
            raise ValueError(f"data.group_column: data.format {f} groups by image id; got {self.group_column!r}")
        return self

    @property
    def image_root(self) -> Path:
        """The folder every image, shard or Parquet file of the input lies under."""
        return Path(self.root) if self.root is not None else Path(self.manifest).parent

    def column_map(self) -> dict[str, str]:
        """User column -> canonical column, for every column the config names."""
        if self.format != "manifest":  # the ingested table already has mmpipe's names for image and text
            pairs = {tables.IMAGE: tables.IMAGE, tables.TEXT: tables.TEXT,
                     (tables.GROUP if self.format in ("coco", "karpathy") else self.group_column): tables.GROUP}
        else:
            pairs = {self.image_column: tables.IMAGE, self.text_column: tables.TEXT, self.group_column: tables.GROUP}
        pairs.update({self.time_column: tables.TIME, self.label_column: tables.LABEL, self.domain_column: tables.DOMAIN})
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
