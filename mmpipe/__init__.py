"""mmpipe, the application: the ``mmpipe`` command line and the torchrun entry, above the library.

``mmcore`` holds all the logic and imports nothing from here, ``flows``, ``tasks`` or Prefect.
"""
