"""The run folder's layout, defined once: every file and folder name a run writes.

``RUN_DIR/<stage>/`` holds each stage's artifacts (``kept.parquet``, ``quarantine.parquet``,
``stats.json``, ``status.json``) and the stage's own files below. Code never spells one of these
names itself: it asks ``RunLayout`` (``RunLayout(run_dir).metrics``) or uses the constant.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

# The run.
CONFIG_FILE = "config.yaml"  # the resolved config the run was made with
RUN_FILE = "run.json"  # the run's identity: id, start, planned stages (mmcore.runlock)
LOCK_FILE = ".mmpipe.lock"  # held while a run writes the folder; a second run fails in one line
SUPERSEDED_DIR = ".superseded"  # .superseded/<run id>/: stages of an earlier run this run did not redo

# Every stage (the artifact contract of ``mmcore.tables``).
KEPT_FILE = "kept.parquet"
QUARANTINE_FILE = "quarantine.parquet"
STATS_FILE = "stats.json"
STATUS_FILE = "status.json"  # whether this run took the stage from cache (written by the task layer)

# train
MODEL_DIR = "model"  # a save_pretrained folder + tokenizer.json + preprocess.json
HISTORY_FILE = "history.parquet"  # loss, lr and val R@5 per logged step
TIMING_FILE = "timing.json"  # samples/s per logged step (wall clock: differs run to run)
TRAIN_CONFIG_FILE = "config.json"  # the train section the model was trained with
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.pt"
SHARDS_DIR = "shards"  # decoded training images, one memory-mapped Arrow file per split
SHARDS_META = "meta.json"
# Rebuildable scratch (decoded shards, resume points): not copied when a stage is taken from cache
# into another run folder.
SCRATCH = (CHECKPOINT_DIR, SHARDS_DIR)

# decontam
REFERENCES_DIR = "references"  # references/<set>.<content key>.parquet: each reference set's hashes, cached by content

# evaluate
METRICS_FILE = "metrics.json"
PER_QUERY_FILE = "per_query.parquet"
EMBEDDINGS_FILE = "embeddings.parquet"
ROBUSTNESS_FILE = "robustness.parquet"
SPOTCHECK_CSV = "spotcheck.csv"
SPOTCHECK_HTML = "spotcheck.html"
VERDICTS_FILE = "verdicts.json"
ABLATION_FILE = "ablation.parquet"
EXTERNAL_DIR = "external"  # evaluate/external/<name>/: another dataset, evaluated with this run's model
CURATION_DIR = "curation"  # evaluate/external/<name>/curation/: that dataset's clean, probe, quality

# report
REPORT_FILE = "report.html"

# ablate: one run folder per variant and seed, and the fixed test set every variant is kept off
ABLATE_DIR = "ablate"
HELD_OUT_FILE = "held_out_test.parquet"  # the test rows (row_id, group, content digest, pHash)
TEST_SET_DIR = "test_set"  # ablate/test_set/: curation of a given evaluation manifest

# export (``mmpipe export``): a folder of its own, outside the run folder's stage folders
EXPORT_FILE = "export.json"  # the export's summary; "complete": false until its last file is in place
SIZES_FILE = "sizes.json"  # webdataset: samples per shard, as open_clip's loader reads it
EXPORT_CSV = "openclip.csv"  # csv: open_clip's tab-separated filepath/title file
RETRY_FILE = "retry.parquet"  # retry: url and caption of the failed downloads, img2dataset's input
EXPORT_IMAGES_DIR = "images"  # csv: images that are not files of their own (tar members, Parquet cells)
SHARD_DIGITS = 5  # NNNNN.tar, NNNNN.parquet, NNNNN_stats.json, as img2dataset names them
_SHARD_FILE = re.compile(rf"[0-9]{{{SHARD_DIGITS},}}(?:\.tar|\.parquet|_stats\.json)")


@dataclass(frozen=True)
class StagePaths:
    """Where one stage's artifacts live in a run folder (``mmcore.graph.stage`` checks the name)."""

    dir: Path

    @classmethod
    def of(cls, run_dir: str | os.PathLike, stage: str) -> StagePaths:
        return cls(Path(run_dir) / stage)

    @property
    def kept(self) -> Path:
        return self.dir / KEPT_FILE

    @property
    def quarantine(self) -> Path:
        return self.dir / QUARANTINE_FILE

    @property
    def stats(self) -> Path:
        return self.dir / STATS_FILE

    @property
    def status(self) -> Path:
        return self.dir / STATUS_FILE


@dataclass(frozen=True)
class RunLayout:
    """Where a run's files are. Stage names are not checked here (``graph.stage`` does that)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @classmethod
    def of(cls, run_dir: str | os.PathLike) -> RunLayout:
        return cls(Path(run_dir))

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    def stage(self, stage: str) -> StagePaths:
        return StagePaths.of(self.root, stage)

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    # train
    @property
    def train_dir(self) -> Path:
        return self.stage_dir("train")

    @property
    def model(self) -> Path:
        return self.stage_dir("train") / MODEL_DIR

    @property
    def history(self) -> Path:
        return self.stage_dir("train") / HISTORY_FILE

    @property
    def timing(self) -> Path:
        return self.stage_dir("train") / TIMING_FILE

    @property
    def checkpoint(self) -> Path:
        return self.stage_dir("train") / CHECKPOINT_DIR / LAST_CHECKPOINT

    @property
    def shards(self) -> Path:
        return self.stage_dir("train") / SHARDS_DIR

    # evaluate
    @property
    def metrics(self) -> Path:
        return self.stage_dir("evaluate") / METRICS_FILE

    @property
    def per_query(self) -> Path:
        return self.stage_dir("evaluate") / PER_QUERY_FILE

    @property
    def embeddings(self) -> Path:
        return self.stage_dir("evaluate") / EMBEDDINGS_FILE

    @property
    def robustness(self) -> Path:
        return self.stage_dir("evaluate") / ROBUSTNESS_FILE

    @property
    def spotcheck_csv(self) -> Path:
        return self.stage_dir("evaluate") / SPOTCHECK_CSV

    @property
    def spotcheck_html(self) -> Path:
        return self.stage_dir("evaluate") / SPOTCHECK_HTML

    @property
    def verdicts(self) -> Path:
        return self.stage_dir("evaluate") / VERDICTS_FILE

    @property
    def ablation(self) -> Path:
        return self.stage_dir("evaluate") / ABLATION_FILE

    @property
    def external_root(self) -> Path:
        return self.stage_dir("evaluate") / EXTERNAL_DIR

    def external(self, name: str) -> Path:
        """``evaluate/external/<name>/``: metrics of another dataset under this run's model."""
        return self.external_root / name

    def external_metrics(self) -> list[Path]:
        """Every external dataset's metrics file, sorted by name."""
        return sorted(self.external_root.glob(f"*/{METRICS_FILE}"))

    def curation(self, name: str) -> Path:
        """The run folder in which that other dataset is cleaned, probed and quality-checked."""
        return self.external(name) / CURATION_DIR

    # report
    @property
    def report(self) -> Path:
        return self.stage_dir("report") / REPORT_FILE

    # ablate
    def variant(self, name: str, seed: int) -> Path:
        return self.root / ABLATE_DIR / f"{name}-s{seed}"

    @property
    def held_out(self) -> Path:
        return self.root / ABLATE_DIR / HELD_OUT_FILE

    @property
    def test_set(self) -> Path:
        """The run folder in which a given evaluation manifest is curated into the fixed test set."""
        return self.root / ABLATE_DIR / TEST_SET_DIR


@dataclass(frozen=True)
class ExportLayout:
    """Where an export's files are: img2dataset's shard names, open_clip's files and the summary."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def summary(self) -> Path:
        return self.root / EXPORT_FILE

    @property
    def sizes(self) -> Path:
        return self.root / SIZES_FILE

    @property
    def csv(self) -> Path:
        return self.root / EXPORT_CSV

    @property
    def retry(self) -> Path:
        return self.root / RETRY_FILE

    @property
    def images(self) -> Path:
        return self.root / EXPORT_IMAGES_DIR

    def shard_tar(self, shard: int) -> Path:
        return self.root / f"{shard:0{SHARD_DIGITS}d}.tar"

    def shard_parquet(self, shard: int) -> Path:
        return self.root / f"{shard:0{SHARD_DIGITS}d}.parquet"

    def shard_stats(self, shard: int) -> Path:
        return self.root / f"{shard:0{SHARD_DIGITS}d}_stats.json"

    def image(self, shard: int, key: str, ext: str) -> Path:
        return self.images / f"{shard:0{SHARD_DIGITS}d}" / f"{key}.{ext}"

    def brace(self, n_shards: int) -> Path:
        """Every shard as one brace pattern (``OUT/{00000..00003}.tar``), as webdataset and open_clip take them."""
        return self.root / f"{{{0:0{SHARD_DIGITS}d}..{max(0, n_shards - 1):0{SHARD_DIGITS}d}}}.tar"

    def owns(self, name: str) -> bool:
        """Whether a file name in the export folder is one an export writes (so a later export may replace it)."""
        return name in (EXPORT_FILE, SIZES_FILE, EXPORT_CSV, RETRY_FILE) or _SHARD_FILE.fullmatch(name) is not None
