"""Object storage through fsspec: remote inputs mirrored to local disk, the run folder kept remote.

Every stage reads and writes local files (memory-mapped shards, ``pread`` of tar members, atomic
renames): object stores offer none of these. So a remote location is served by a local copy:

- **Inputs** (``data.manifest``, ``data.root`` as ``s3://``, ``gs://``, ... URLs): ``sync_inputs``
  mirrors the manifest and every object under the root into ``cache_root()/remote/<protocol>/<key>``
  before the run, downloading only objects whose size or ETag changed. Nothing outside the declared
  root is listed or read, and a key that would leave the mirror (``..``, an absolute part, a NUL) is
  skipped and counted. The mirror's index (``MIRROR_INDEX``: each object's size and ETag) is what
  ``digests.files_fingerprint`` reads for mirrored files, so a probe cached by one worker is a hit on
  another that mirrored the same objects (a local stat would differ in mtime and inode).
- **The run folder** (``out: s3://bucket/runs/NAME``): the run works in its local copy
  (``local_path(url)``) and ``push_stage`` uploads each stage's files when the stage is done, its
  ``stats.json`` last, after a list of every file with its digest (``FILES_MANIFEST``): a stage's
  remote folder is complete when its stats are there; objects an earlier result left are removed.
  A cache hit whose files are not on this machine (another worker, a fresh checkout) is pulled from
  the run folder it was computed in (``pull_stage``): every listed file checked against its digest,
  the stats and tables against the cache record's.
- **Prefect's result storage** (``storage.results``): ``results_base`` is where the stage tasks
  persist their cache records (``tasks.common.result_storage``), so every worker that points at it
  shares the stage cache; ``remove_unless`` deletes a record there that is not mmpipe's.

Credentials and endpoints are fsspec's and the provider's own (``AWS_ACCESS_KEY_ID``,
``AWS_ENDPOINT_URL``, ``GOOGLE_APPLICATION_CREDENTIALS``, fsspec's config files): mmpipe never
stores them.
"""

from __future__ import annotations

import json
import os
import posixpath
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from mmcore import tables
from mmcore.base import StrictModel
from mmcore.digests import MIRROR_INDEX, mirror_index
from mmcore.errors import InputError, MMPipeError
from mmcore.layout import STATS_FILE, STATUS_FILE
from mmcore.locations import CACHE_ENV, as_local, cache_root, check_url, is_url, local_path, local_url, safe_key, url_of


class StorageConfig(StrictModel):
    """Where Prefect keeps the stage cache, and how a remote run folder's report is linked."""

    results: str | None = Field(
        None, description="Prefect's result storage for the stage cache records, as a URL (s3://bucket/prefect-results): "
        "workers and PREFECT_HOMEs that share it share the cache. Default: PREFECT_HOME's local storage.",
    )
    public_url: str | None = Field(
        None, description="A URL that serves the run folder over HTTP (https://reports.example.com/runs/demo): the "
        "report artifact links there. Default: a signed link to the object (s3) or its file:// path.",
    )
    link_expiry_s: int = Field(7 * 24 * 3600, ge=60, description="Validity of a signed report link (s3), in seconds.")

    @field_validator("results")
    @classmethod
    def _results(cls, v: str | None) -> str | None:
        return check_url(v, "storage.results") if is_url(v) else v  # a known protocol, a usable key: at load

    @field_validator("public_url")
    @classmethod
    def _public(cls, v: str | None) -> str | None:
        if v is not None and not v.lower().startswith(("http://", "https://")):
            raise ValueError(f"expected an http(s) URL that serves the run folder, got {v!r}")
        return v


def filesystem(url: str):
    """The fsspec filesystem of ``url`` and the path in it."""
    from fsspec.core import url_to_fs

    return url_to_fs(url)


def join(url: str, *parts: str) -> str:
    return posixpath.join(url.rstrip("/"), *parts)


# --------------------------------------------------------------------------- mirrors of inputs

_MIRROR_LOCK = threading.Lock()


@dataclass(frozen=True)
class MirrorStats:
    url: str
    local: str
    n_objects: int
    n_downloaded: int
    n_removed: int
    n_unsafe: int
    bytes_downloaded: int

    def line(self) -> str:
        return (f"{self.url}: {self.n_objects} object(s), {self.n_downloaded} downloaded ({self.bytes_downloaded:,} bytes), "
                f"{self.n_removed} removed{f', {self.n_unsafe} unsafe key(s) skipped' if self.n_unsafe else ''}")


def _stamp(info: dict[str, Any]) -> str:
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("mtime") or info.get("LastModified") or ""
    return f"{info.get('size')}:{str(etag).strip(chr(34))}"


def _download(fs, remote: str, dst: Path) -> None:
    """``remote`` to ``dst`` through a temporary name: a half-downloaded file is never at ``dst``."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.{threading.get_ident()}.part")
    try:
        fs.get_file(remote, str(tmp))
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def mirror(url: str, single: bool = False) -> MirrorStats:
    """Bring the local copy of ``url`` (a prefix, or with ``single`` one object) up to date.

    Objects are listed under ``url`` only; each is downloaded when its size or ETag differs from the
    index; local files whose object is gone are removed. Returns what was done. The provider's
    errors (no credentials, access denied, no such bucket) are one line naming the URL.
    """
    try:
        return _mirror(url, single)
    except InputError:
        raise
    except Exception as e:  # botocore's NoCredentialsError, ClientError, ...: what and where, in one line
        raise InputError(f"cannot mirror {url}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}") from None


def _mirror(url: str, single: bool) -> MirrorStats:
    fs, root = filesystem(url)
    local = local_path(url)
    with _MIRROR_LOCK:
        if single:
            try:
                info = fs.info(root)
            except FileNotFoundError:
                raise InputError(f"not found: {url}") from None
            if info.get("type") != "file":
                raise InputError(f"{url} is a folder, expected a file")
            stamp_file = local.with_name(f".{local.name}.mmpipe-stamp")
            want = _stamp(info)
            have = stamp_file.read_text() if stamp_file.is_file() and local.is_file() else None
            n = 0
            if have != want:
                _download(fs, root, local)
                stamp_file.write_text(want)
                n = 1
            return MirrorStats(url, str(local), 1, n, 0, 0, int(info.get("size") or 0) * n)
        try:
            listing = fs.find(root, detail=True)
        except FileNotFoundError:
            listing = {}
        if not listing and not fs.isdir(root):
            raise InputError(f"not found: {url} (no object under it)")
        old = mirror_index(str(local)) or {}
        new: dict[str, str] = {}
        n_down = n_bytes = n_unsafe = 0
        prefix = root.rstrip("/") + "/"
        for name, info in sorted(listing.items()):
            if info.get("type") != "file" or not name.startswith(prefix):
                continue
            rel = name[len(prefix):]
            if safe_key(rel) or rel == MIRROR_INDEX:
                n_unsafe += 1
                continue
            stamp = _stamp(info)
            dst = local / rel
            if old.get(rel) != stamp or not dst.is_file():
                _download(fs, name, dst)
                n_down += 1
                n_bytes += int(info.get("size") or 0)
            new[rel] = stamp
        removed = 0
        for rel in sorted(set(old) - set(new)):
            if not safe_key(rel):
                (local / rel).unlink(missing_ok=True)
                removed += 1
        local.mkdir(parents=True, exist_ok=True)
        tables.write_bytes(json.dumps({"url": url, "objects": new}, sort_keys=True).encode(), local / MIRROR_INDEX)
        return MirrorStats(url, str(local), len(new), n_down, removed, n_unsafe, n_bytes)


_SYNCED: set[tuple[str, str]] = set()  # (location, token) pairs this process has mirrored


def sync_inputs(data, token: str | None = None) -> list[MirrorStats]:
    """Mirror a data section's remote manifest and root (``data.image_root``) before a run: every
    object under the root, and the manifest when it lies elsewhere. Local inputs: nothing to do.
    ``token`` (a flow run's id): not again in a process that mirrored them for the same token (the
    stage tasks after the flow's own sync), but again for the next run (a long-lived Dask worker)."""
    todo: list[tuple[str, bool]] = []
    root = url_of(data.image_root)
    if root is not None:
        todo.append((root, False))
    manifest = url_of(data.manifest) if data.manifest is not None else None
    if manifest is not None and (root is None or not manifest.startswith(root.rstrip("/") + "/")):
        todo.append((manifest, True))
    done = []
    for url, single in todo:
        if token is not None and (url, token) in _SYNCED:
            continue
        done.append(mirror(url, single=single))
        if token is not None:
            _SYNCED.add((url, token))
    return done


# --------------------------------------------------------------------------- the run folder

def _put(fs, local: Path, remote: str) -> None:
    """One object, whole or not at all: object stores publish an upload when it completes; a local
    or mounted filesystem gets a temporary name and a rename."""
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        tmp = f"{remote}.{os.getpid()}.part"
        fs.makedirs(posixpath.dirname(remote), exist_ok=True)
        fs.put_file(str(local), tmp)
        fs.mv(tmp, remote)
    else:
        fs.put_file(str(local), remote)


def _files(folder: Path) -> list[Path]:
    if folder.is_file():
        return [folder]
    return sorted(f for f in folder.rglob("*") if f.is_file() and not f.is_symlink()) if folder.is_dir() else []


FILES_MANIFEST = "files.json"  # a pushed folder's files and their digests, uploaded just before its last file


def _digests(local_dir: Path, names: list[str]) -> dict[str, str]:
    from mmcore.digests import file_digest

    return {f.relative_to(local_dir).as_posix(): file_digest(f) for name in names for f in _files(local_dir / name)}


def push_files(local_dir: Path, url: str, names: list[str], last: str | None = None, exact: bool = False) -> int:
    """Upload ``names`` (files or folders) of ``local_dir`` to ``url``, ``last`` after every other one.

    The remote ``last`` is deleted first, so while the upload runs the remote folder reads as
    incomplete. ``exact``: also remove remote objects under ``url`` that are not uploaded now (a
    file an earlier result had and this one has not: a model's old matching head), and write
    ``FILES_MANIFEST`` (each file's digest) before ``last``, for ``pull_files`` to check. Returns
    the number of files uploaded."""
    fs, base = filesystem(url)
    if last is not None:
        try:
            fs.rm_file(posixpath.join(base, last))
        except FileNotFoundError:
            pass
    digests = _digests(local_dir, names)
    if exact:
        keep = {*digests, FILES_MANIFEST, *([last] if last else [])}
        try:
            remote = fs.find(base)
        except FileNotFoundError:
            remote = []
        prefix = base.rstrip("/") + "/"
        stale = [o for o in remote if o.startswith(prefix) and o[len(prefix):] not in keep
                 and o[len(prefix):].split("/")[0] in names]
        for o in stale:
            fs.rm_file(o)
    for rel in digests:
        _put(fs, local_dir / rel, posixpath.join(base, rel))
    n = len(digests)
    if exact:
        tmp = local_dir / f".{FILES_MANIFEST}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(digests, sort_keys=True))
        try:
            _put(fs, tmp, posixpath.join(base, FILES_MANIFEST))
        finally:
            tmp.unlink(missing_ok=True)
    if last is not None and (local_dir / last).is_file():
        _put(fs, local_dir / last, posixpath.join(base, last))
        n += 1
    return n


def read_remote(url: str, max_bytes: int = 16 << 20) -> bytes | None:
    """A small object's (or local file's) first ``max_bytes``, or None when it does not exist."""
    fs, path = filesystem(url)
    try:
        with fs.open(path, "rb") as f:
            return f.read(max_bytes)
    except FileNotFoundError:
        return None


def pull_files(url: str, local_dir: Path, names: list[str], extra: tuple[str, ...] = ()) -> int:
    """Download the files ``push_files(exact=True)`` listed in ``url``'s ``FILES_MANIFEST`` (those under
    ``names``), each checked against its digest, plus ``extra`` (checked by the caller); local files
    under ``names`` that the manifest does not list are removed. ``InputError`` when the manifest is
    missing, a key would leave ``local_dir`` or a file's bytes differ. Returns the number downloaded."""
    from mmcore.digests import file_digest

    fs, base = filesystem(url)
    blob = read_remote(join(url, FILES_MANIFEST))
    if blob is None:
        raise InputError(f"{url}: no {FILES_MANIFEST}: not a complete upload")
    try:
        listed = json.loads(blob)
        assert isinstance(listed, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in listed.items())
    except (ValueError, AssertionError):
        raise InputError(f"{url}: {FILES_MANIFEST} is not a file list") from None
    wanted = {rel: d for rel, d in listed.items() if rel.split("/")[0] in names}
    for rel in [*wanted, *extra]:
        if safe_key(rel):
            raise InputError(f"{url}: {safe_key(rel)}")
    for name in names:  # what an earlier result left here and this one has not
        for f in _files(local_dir / name):
            if f.relative_to(local_dir).as_posix() not in wanted:
                f.unlink()
    n = 0
    for rel, digest in sorted(wanted.items()):
        dst = local_dir / rel
        if not (dst.is_file() and file_digest(dst) == digest):
            _download(fs, posixpath.join(base, rel), dst)
            n += 1
            if file_digest(dst) != digest:
                raise InputError(f"{url}: {rel} is not the file the upload listed")
    for rel in extra:
        _download(fs, posixpath.join(base, rel), local_dir / rel)
        n += 1
    return n


def files_match(folder: Path, digests: Mapping[str, str]) -> bool:
    """Whether every file ``digests`` names (relative to ``folder``) is there with that digest."""
    from mmcore.digests import file_digest

    return (all((folder / rel).is_file() for rel in digests)
            and all(file_digest(folder / rel) == d for rel, d in digests.items()))


def push_stage(run_dir: str | os.PathLike, run_url: str, stage: str, files: list[str]) -> int:
    """Upload a stage folder of the local ``run_dir`` to the remote run folder ``run_url``: ``files``
    exactly (``push_files(exact=True)``), its ``stats.json`` deleted first and uploaded last, skipped
    when the remote stats are already these bytes (the same result); then its ``status.json``, if
    any. Returns the number of files uploaded."""
    local, remote = Path(run_dir) / stage, join(run_url, stage)
    n = 0
    if read_remote(join(remote, STATS_FILE)) != (local / STATS_FILE).read_bytes():
        n += push_files(local, remote, files, last=STATS_FILE, exact=True)
    if (local / STATUS_FILE).is_file():
        n += push_files(local, remote, [STATUS_FILE])
    return n


def pull_stage(run_url: str, stage: str, files: list[str], digests: Mapping[str, str]) -> Path | None:
    """The local copy of the remote run folder ``run_url`` (``local_path``) with ``stage``'s ``files``
    and stats pulled into it (``pull_files``) and those named in ``digests`` checked against them.

    None when the bucket does not hold them whole, or when ``run_url`` is not a clean URL (a cache
    record planted in shared result storage names a place outside the mirror: never followed).
    """
    try:
        if check_url(run_url, "location") != run_url:
            return None
        run_dir = local_path(run_url)
        pull_files(join(run_url, stage), run_dir / stage, files, extra=(STATS_FILE,))
    except (OSError, MMPipeError):
        return None
    return run_dir if files_match(run_dir / stage, digests) else None


def results_base(results: str) -> str:
    """Where ``storage.results`` keeps the cache records: its URL, checked, or an absolute local path
    (a path or a ``file://`` URL)."""
    return check_url(results, "storage.results") if is_url(results) else str(Path(local_url(results)).absolute())


def remove_unless(location: str, keep: Callable[[bytes], bool], max_bytes: int = 1 << 20) -> bool:
    """Delete the file or object at ``location`` (a local path or a URL) unless ``keep`` accepts its
    first ``max_bytes``. Returns whether it was deleted: False when there is none. Other read errors
    (access denied, a dropped connection) raise: what could not be checked is not passed as kept."""
    content = read_remote(location, max_bytes)
    if content is None or keep(content):
        return False
    fs, path = filesystem(location)
    try:
        fs.rm_file(path)
    except FileNotFoundError:  # removed meanwhile: gone either way
        pass
    return True


def report_link(run_url: str, rel: str, cfg: StorageConfig) -> str:
    """A link to ``rel`` of the remote run folder where its storage serves it: ``public_url`` when
    set, else the filesystem's own URL for it (a signed https link on s3), else the URL itself."""
    if cfg.public_url:
        return join(cfg.public_url, rel)
    fs, path = filesystem(join(run_url, rel))
    try:
        return fs.url(path, expires=cfg.link_expiry_s)
    except Exception:  # no url() (NotImplementedError), no credentials to sign with: the location names it
        return join(run_url, rel)


# The locations' helpers are storage's public face too (tasks and tests call storage.url_of, ...).
__all__ = ["CACHE_ENV", "MIRROR_INDEX", "MirrorStats", "StorageConfig", "as_local", "cache_root", "check_url",
           "files_match", "filesystem", "is_url", "join", "local_path", "local_url", "mirror", "pull_files",
           "pull_stage", "push_files", "push_stage", "read_remote", "remove_unless", "report_link", "results_base",
           "FILES_MANIFEST", "safe_key", "sync_inputs", "url_of"]
