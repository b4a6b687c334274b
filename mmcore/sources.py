"""Where image bytes come from: one interface for every input form.

A row's image column holds a *reference*; an ``ImageSource`` turns a reference into bytes. Every
stage that reads images (probe, quality, training shards, evaluate, the report's thumbnails, the
spot-check sheet, export, decontamination) reads through ``of(data)``, so content digests, every
check and every reason code work the same whatever the input form:

- ``FileSource`` (``data.format: manifest``): the reference is a path under ``data.root``.

A source is a small picklable value (it is passed to worker processes); what it opens is cached
per process and never pickled. Errors are the ones a row is quarantined with: ``images.UnsafePath``
(a reference that leaves the root) and ``faults.ReadError`` (with its reason code).
"""

from __future__ import annotations

import os
from typing import BinaryIO

from mmcore import faults, images
from mmcore.base import DataConfig
from mmcore.digests import files_fingerprint


class ImageSource:
    """Bytes by reference. Subclasses implement ``open``, ``read`` and ``fingerprint``."""

    kind = "abstract"

    def open(self, ref: str) -> tuple[BinaryIO, int]:
        """A seekable binary file positioned at 0 holding the image's bytes, and their count.

        Raises ``images.UnsafePath`` or ``faults.ReadError``; the caller closes the file.
        """
        raise NotImplementedError

    def read(self, ref: str, max_bytes: int | None = None) -> bytes:
        """The image's bytes; ``faults.ReadError('file_too_large')`` above ``max_bytes``, unread."""
        raise NotImplementedError

    def fingerprint(self, refs: list[str]) -> str:
        """A cheap digest that changes when any referenced image may have changed (cache keys)."""
        raise NotImplementedError

    def key(self) -> str:
        """What identifies this source's location in a cache key of derived files (shards)."""
        raise NotImplementedError


class FileSource(ImageSource):
    """Image files under a root folder; a reference is a path relative to it (or absolute under it)."""

    kind = "files"

    def __init__(self, root: str | os.PathLike):
        self.root = str(root)
        self._resolver: images.Resolver | None = None

    def __getstate__(self) -> dict:
        return {"root": self.root}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["root"])

    def __repr__(self) -> str:
        return f"FileSource({self.root!r})"

    def path(self, ref: str) -> str:
        """The real path of ``ref``; ``images.UnsafePath`` when it leaves the root."""
        if self._resolver is None:
            self._resolver = images.Resolver(self.root)
        return self._resolver(ref)

    def open(self, ref: str) -> tuple[BinaryIO, int]:
        path = self.path(ref)
        f = faults.open_binary(path)  # retries transient errors; a folder or FIFO fails at once
        try:
            return f, os.fstat(f.fileno()).st_size
        except BaseException:
            f.close()
            raise

    def read(self, ref: str, max_bytes: int | None = None) -> bytes:
        return faults.read_bytes(self.path(ref), max_bytes=max_bytes)

    def fingerprint(self, refs: list[str]) -> str:
        return files_fingerprint(self.root, refs)

    def key(self) -> str:
        return f"files:{os.path.realpath(self.root)}"


def of(data: DataConfig) -> ImageSource:
    """The image source of a data config."""
    return FileSource(data.image_root)


def load_rgb(source: ImageSource, ref: str, max_side: int | None = None,
             policy: images.DecodePolicy = images.DEFAULT_POLICY) -> images.Image.Image:
    """``images.load_rgb`` for a reference of ``source``: only what ``policy`` accepts is decoded."""
    return images.load_rgb_bytes(policy.accept(source.read(ref, max_bytes=policy.max_bytes)), max_side, policy)


__all__ = ["FileSource", "ImageSource", "load_rgb", "of"]
