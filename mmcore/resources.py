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
# OpenAI CLIP's BPE merges (49,408 tokens with its two specials; MIT licence, CLIP_BPE_LICENSE.txt), the
# file open_clip ships as bpe_simple_vocab_16e6.txt.gz:
# the default caption tokenizer of a preset model (``clip_model.clip_bpe_tokenizer``).
CLIP_BPE = _ROOT / "data" / "clip_bpe_simple_vocab_16e6.txt.gz"
# Named config presets: ``<name>.yaml`` holds config sections; ``--preset NAME`` layers one on a config.
PRESETS = _ROOT / "data" / "presets"
