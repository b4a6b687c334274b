"""mmpipe's library: every stage's logic, importable and testable without Prefect.

>>> import mmcore
>>> kept = mmcore.load("runs/demo", "quality")                   # a stage's kept table
>>> dropped = mmcore.load("runs/demo", "quality", quarantine=True)  # and what it quarantined
"""

from mmcore.tables import load

__all__ = ["load"]
