"""Data files installed with mmcore (``importlib.resources``), as open_clip ships ``model_configs/``.

They are found inside the installed package, so a non-editable ``pip install`` run from any
working directory reads the same presets and tables as a checkout.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

# A regular (not zipped) install: the package's files are real files with paths.
_ROOT = Path(str(resources.files("mmcore")))

# Model presets: ``<name>.json`` holds ``CLIPConfig`` keyword arguments; ``train.preset`` names the stem.
MODEL_CONFIGS = _ROOT / "model_configs"
# The default synonym table of ``augment=synonym`` (word -> replacement words).
DEFAULT_SYNONYMS = _ROOT / "data" / "synonyms.yaml"
# Named config presets: ``<name>.yaml`` holds config sections; ``--preset NAME`` layers one on a config.
PRESETS = _ROOT / "data" / "presets"
