"""``python -m mmpipe ...`` is the ``mmpipe`` command; under torchrun: ``torchrun ... -m mmpipe train RUN_DIR``."""

from mmpipe.cli import main

if __name__ == "__main__":
    main()
