"""A split-like table from synthetic data, for train tests, benchmarks and demos.

The real input is the split stage's ``kept.parquet``; this builds the same columns from
``synth.generate`` + ``clean.run`` without the image stages: rows the probe or quality stage
would quarantine are dropped, splits are assigned by scene so near-duplicates never straddle.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pandas as pd

from mmcore import clean, synth
from mmcore.base import DataConfig, StageContext
from mmcore.tables import ROW_ID


def _bucket(scene: str, seed: int) -> float:
    h = hashlib.sha256(f"{seed}:{scene}".encode()).digest()
    return int.from_bytes(h[:8], "little") / 2**64


def make(out: str | os.PathLike, n: int = 3000, seed: int = 0, val: float = 0.1, test: float = 0.1) -> tuple[pd.DataFrame, DataConfig]:
    """Write a synthetic dataset under ``out``; returns its split-like table and data config."""
    out = Path(out)
    synth.generate(out, n=n, seed=seed)
    data = DataConfig(manifest=out / "manifest.csv", label_column="label", domain_column="domain")
    ctx = StageContext(data=data, run_dir=out / "run", seed=seed)
    kept = clean.run(clean.read_manifest(data), clean.CleanConfig(), ctx).kept
    planted = synth.planted(out)
    image_bad = planted[planted["stage"].isin(["probe", "quality"])][ROW_ID]
    kept = kept[~kept[ROW_ID].isin(image_bad)].reset_index(drop=True)
    u = np.array([_bucket(str(s), seed) for s in kept["scene_id"]])
    kept["split"] = np.where(u < test, "test", np.where(u < test + val, "val", "train"))
    kept["sample_weight"] = 1.0
    return kept, data
