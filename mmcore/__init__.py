"""mmpipe's library: every stage's logic, importable and testable without Prefect.

>>> import mmcore
>>> kept = mmcore.load("runs/demo", "quality")                   # a stage's kept table
>>> dropped = mmcore.load("runs/demo", "quality", quarantine=True)  # and what it quarantined
"""

import os

# MKL picks kernels by memory alignment unless told not to, so two runs of the same training could
# differ in the last bit. Strict conditional numerical reproducibility makes CPU results
# bit-identical from run to run. It must be set before torch loads MKL; mmcore imports torch lazily.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

from mmcore.tables import load  # noqa: E402

__all__ = ["load"]
