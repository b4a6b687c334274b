"""Content digests: of files, folders, strings and JSON values. The bottom of mmcore's import graph.

Cache keys, ``stats.json`` records and ``mmpipe inspect --stale`` all compare these, so each is
defined once here.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def file_digest(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes, as ``sha256:<hex>``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return "sha256:" + h.hexdigest()


def text_digest(*parts: str | bytes) -> str:
    """sha256 over several strings or byte strings (length-prefixed so parts cannot run together)."""
    h = hashlib.sha256()
    for p in parts:
        b = p.encode() if isinstance(p, str) else p
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return "sha256:" + h.hexdigest()


def dir_digest(path: str | os.PathLike) -> str:
    """Digest of every file under a folder (relative names and bytes), e.g. a saved model."""
    root = Path(path)
    if not root.is_dir():
        return f"missing:{root}"
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    return text_digest(*(f"{p.relative_to(root).as_posix()}={file_digest(p)}" for p in files))


# A folder mirrored from object storage records its objects here ({relative key: "size:etag"}).
MIRROR_INDEX = ".mmpipe-mirror.json"


def mirror_index(folder: str) -> dict[str, str] | None:
    """The mirror index of ``folder`` (``mmcore.storage.mirror``), or None when it is no mirror."""
    try:
        with open(os.path.join(folder, MIRROR_INDEX), "rb") as f:
            data = json.loads(f.read(256 << 20))
    except (OSError, ValueError):
        return None
    objects = data.get("objects") if isinstance(data, dict) else None
    return objects if isinstance(objects, dict) else None


def files_fingerprint(root: str | os.PathLike, rel_paths: Iterable[str]) -> str:
    """Cheap fingerprint of many files: (path, size, mtime_ns) of what each path resolves to, unread.

    Symlinks are followed (DVC, git-annex and deduplicated storage link every image): a file changed
    behind a link changes the fingerprint as a file changed in place does (the quick check rsync
    and make rely on); the probe then records each file's content digest. A path that resolves
    outside the root is never touched, not even by ``stat``: the probe quarantines it.
    """
    root_real = os.path.realpath(root)
    prefix = root_real.rstrip(os.sep) + os.sep
    mirrored = mirror_index(root_real)
    h = hashlib.sha256()
    for rel in sorted(set(rel_paths)):
        if os.path.isabs(rel) or ".." in Path(rel).parts:
            h.update(f"{rel}\0unsafe\n".encode())  # never touched: probe quarantines it
            continue
        try:
            full = os.path.realpath(os.path.join(root_real, rel))
            if full != root_real and not full.startswith(prefix):
                h.update(f"{rel}\0unsafe\n".encode())
                continue
            st = os.stat(full)
            stamp = mirrored.get(Path(full).relative_to(root_real).as_posix()) if mirrored else None
            if stamp is not None and stamp.split(":", 1)[0] == str(st.st_size):
                # a mirror of object storage (mmcore.storage): the object's size and ETag, the same on
                # every worker that mirrored it (a local stat's mtime and inode are not)
                h.update(f"{rel}\0object\0{stamp}\n".encode())
                continue
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\n".encode())
        except (OSError, ValueError):
            h.update(f"{rel}\0missing\n".encode())
    return "sha256:" + h.hexdigest()


def json_digest(obj: Any) -> str:
    """Digest of a JSON-serialisable object, independent of key order."""
    return text_digest(json.dumps(obj, sort_keys=True, default=str))
