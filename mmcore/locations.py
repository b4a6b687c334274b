"""Locations: a URL on object storage and the local path of its copy (``mmcore.storage`` keeps the copies).

Config fields that name a place (``data.manifest``, ``data.root``, ``out``) take a URL as well as a
path; ``as_local`` turns one into the path of its local copy, ``url_of`` goes back. Low in the
import graph: the data section's validator uses it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mmcore.errors import ConfigError

# The local copies' root: MMPIPE_CACHE, else ~/.cache/mmpipe (machine-specific, never in a cache key).
CACHE_ENV = "MMPIPE_CACHE"


def is_url(value: Any) -> bool:
    """Whether ``value`` is a remote location (``proto://...`` other than ``file://``)."""
    if not isinstance(value, str) or "://" not in value:
        return False
    return value.split("://", 1)[0].lower() not in ("file", "local")


def local_url(value: str) -> str:
    """``file:///x/y`` -> ``/x/y``; anything else unchanged."""
    return value[len("file://"):] if isinstance(value, str) and value.lower().startswith("file://") else value


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mmpipe").expanduser().absolute()


def _split(url: str) -> tuple[str, str]:
    proto, _, rest = url.partition("://")
    return proto.lower(), rest.strip("/")


def safe_key(key: str) -> str:
    """Why an object key cannot become a local path under the mirror ('' when it can)."""
    parts = key.split("/")
    if key.startswith("/") or "\\" in key or "\x00" in key or any(p in ("..", ".") for p in parts) or "" in parts:
        return f"object key {key!r} would leave the mirror"
    return ""


def check_url(url: str, where: str) -> str:
    """``url`` normalised (no trailing slash); a one-line ``ConfigError`` for an unknown protocol, a
    missing fsspec backend or a key that would leave the mirror."""
    import fsspec

    proto, rest = _split(url)
    try:
        fsspec.get_filesystem_class(proto)
    except (ImportError, ValueError) as e:
        raise ConfigError(f"{where}: cannot use {proto}:// ({str(e).splitlines()[0][:160]})") from None
    if not rest or (why := safe_key(rest)):
        raise ConfigError(f"{where}: {url!r} is not a usable location ({why or 'no bucket or path'})")
    return f"{proto}://{rest}"


def local_path(url: str) -> Path:
    """Where the local copy of ``url`` lies: ``cache_root()/remote/<protocol>/<bucket>/<key>``."""
    proto, rest = _split(url)
    return cache_root() / "remote" / proto / Path(*rest.split("/"))


def url_of(path: str | os.PathLike | None) -> str | None:
    """The remote location a local copy stands for (``local_path``'s inverse), or None for a local path:
    a run folder's subfolders (an ablation's variants) map to the remote folder's subfolders."""
    if path is None:
        return None
    base = cache_root() / "remote"
    try:
        rel = Path(os.path.abspath(path)).relative_to(base)
    except ValueError:
        return None
    parts = rel.parts
    return f"{parts[0]}://{'/'.join(parts[1:])}" if len(parts) >= 2 else None  # protocol, bucket, ...


def as_local(value: Any, where: str) -> Any:
    """A config value naming a place: a URL becomes the path of its local copy (checked: a one-line
    ``ConfigError`` for an unknown protocol); ``file://`` a plain path; anything else unchanged."""
    if is_url(value):
        return local_path(check_url(value, where))
    return local_url(value)


__all__ = ["CACHE_ENV", "as_local", "cache_root", "check_url", "is_url", "local_path", "local_url", "safe_key", "url_of"]
