"""Where image bytes come from: one interface for every input form.

A row's image column holds a *reference*; an ``ImageSource`` turns a reference into bytes. Every
stage that reads images (probe, quality, training shards, evaluate, the report's thumbnails, the
spot-check sheet, export, decontamination) reads through ``of(data)``, so content digests, every
check and every reason code work the same whatever the input form:

- ``FileSource`` (``data.format: manifest``, ``coco``, ``karpathy``): the reference is a path under ``data.root``.
- ``TarSource`` (``webdataset``): ``<shard path under data.root>::<member name>``; the member is read
  in place at its offset (one ``pread``), never extracted.
- ``ParquetSource`` (``parquet``): ``<file under data.root>::<row index>``; one row group's image
  column at a time.

A source is a small picklable value (it is passed to worker processes); what it opens is cached
per process and never pickled. Errors are the ones a row is quarantined with: ``images.UnsafePath``
(a reference that leaves the root) and ``faults.ReadError`` (with its reason code).
"""

from __future__ import annotations

import io
import os
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mmcore import errors, faults, images
from mmcore.base import DataConfig
from mmcore.digests import files_fingerprint
from mmcore.errors import InputError

SEP = "::"  # between the file and the member (or row) in a reference
# Shard indexes (~170 bytes a member) and Parquet footers kept per process: at most this many files,
# and this many members in all (one shard of MAX_TAR_MEMBERS fits).
_MAX_OPEN_INDEXES = 256
_MAX_CACHED_MEMBERS = 1 << 20
# A shard of more members is refused before its index grows: a member can be a bare 512-byte header,
# so a 1 GB tar of empty members holds 2 million (each ~20 µs to read and ~170 bytes to keep). An
# img2dataset shard of 10,000 samples has 30,000 members.
MAX_TAR_MEMBERS = 1 << 20
# A row group's image column is read whole: one larger than this is refused (file_too_large).
MAX_ROW_GROUP_BYTES = 1 << 30
# Per process, never pickled: shard indexes, Parquet footers, and the row group read last.
# A shard refused whole (not a tar, too many members) is cached as its error, so it is read once.
_TAR_INDEXES: dict[str, tuple[tuple[int, int, int], dict[str, Member] | str]] = {}
# Thread-safe: several threads of one process may read (a Dask worker with threads). Shard indexes
# are shared under a lock; open Parquet files and the row group read last are per thread.
_LOCK = threading.Lock()
_LOCAL = threading.local()  # .parquet_files: {path: (stamp, ParquetFile, row starts)}, .row_group: (key, column)


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


class _Window(io.RawIOBase):
    """A read-only, seekable view of ``size`` bytes at ``offset`` of an open file (a tar member)."""

    def __init__(self, f: BinaryIO, offset: int, size: int):
        self._f, self._offset, self._size, self._pos = f, offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self._size - self._pos))
        if n == 0:
            return 0
        data = os.pread(self._f.fileno(), n, self._offset + self._pos)
        b[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._f.close()
        super().close()


def split_ref(ref: str) -> tuple[str, str]:
    """``"<file>::<member or row>"`` -> (file, member); ``images.UnsafePath`` when there is no ``::``."""
    file, sep, inner = str(ref).partition(SEP)
    if not sep or not file or not inner:
        raise images.UnsafePath(f"reference {ref!r} is not '<file>{SEP}<member>'")
    return file, inner


def unsafe_member(name: str) -> str:
    """Why a tar member name is unsafe ('' when it is safe): absolute, ``..``, NUL or backslash."""
    if name.startswith("/") or (len(name) > 2 and name[0].isalpha() and name[1] == ":" and name[2] in "/\\"):
        return f"absolute member name {name!r}"
    if ".." in name.split("/") or "\\" in name or "\x00" in name:
        return f"member name {name!r} leaves the shard (..)"
    return ""


@dataclass(frozen=True, slots=True)
class Member:
    """A tar member's place in its shard: where its data starts, its size, and its kind."""

    name: str
    offset: int
    size: int
    kind: str  # "file", "dir", "symlink", "hardlink", "device", "fifo", "sparse", "other"


@dataclass(frozen=True)
class TarIndex:
    """Every member of one shard in archive order, read from the headers alone.

    ``damage`` says why the archive does not end as a tar must ('' when whole): a member whose data
    runs past the end of the file (``cut`` names it), or bytes after the last member that are no
    tar header (truncated inside a header, or garbage).
    """

    members: tuple[Member, ...]
    size: int
    damage: str = ""
    cut: str = ""

    def by_name(self) -> dict[str, Member]:
        return {m.name: m for m in self.members}  # a repeated name: the last wins, as tar extracts


_KINDS = {tarfile.REGTYPE: "file", tarfile.AREGTYPE: "file", tarfile.CONTTYPE: "file", tarfile.DIRTYPE: "dir",
          tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hardlink", tarfile.CHRTYPE: "device",
          tarfile.BLKTYPE: "device", tarfile.FIFOTYPE: "fifo"}
# Long names and pax headers are read into memory by tarfile: a hostile one may not be large. Each is
# held until its member's header is read, one recursion deeper per header: a chain of them may not be long
# (a real tar has at most a global pax header, a pax header, a long name and a long link in a row).
# tarfile applies the global pax keywords to every later member, one by one: a few are real (git
# archive writes one), 50,000 cost 4 ms a member.
_MAX_META_BYTES = 1 << 20
_MAX_META_CHAIN = 8
_MAX_GLOBAL_PAX_KEYS = 64
_META_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
               tarfile.SOLARIS_XHDTYPE)


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile's header reader within bounds: extended headers, their chains and sparse maps."""

    def _proc_member(self, tarfile_):  # tarfile's hook for every header
        if getattr(tarfile_, "_mmpipe_refused", ""):  # tarfile reads on after a bad header it took for the end
            raise tarfile.InvalidHeaderError(tarfile_._mmpipe_refused)
        if self.type not in _META_TYPES:
            return super()._proc_member(tarfile_)
        depth = getattr(tarfile_, "_mmpipe_meta_depth", 0) + 1
        if self.size > _MAX_META_BYTES:
            _refuse(tarfile_, f"a {self.size}-byte extended header")
        if depth > _MAX_META_CHAIN:
            _refuse(tarfile_, f"more than {_MAX_META_CHAIN} extended headers in a row")
        tarfile_._mmpipe_meta_depth = depth
        try:
            member = super()._proc_member(tarfile_)
        finally:
            tarfile_._mmpipe_meta_depth = depth - 1
        if len(tarfile_.pax_headers) > _MAX_GLOBAL_PAX_KEYS:
            _refuse(tarfile_, f"more than {_MAX_GLOBAL_PAX_KEYS} global pax keywords")
        return member

    # A sparse member is never read (special_member), so its map of regions is skipped, not kept: GNU's
    # old format chains 512-byte blocks of 21 regions (tarfile keeps them all, and fails at the end of
    # the file with an IndexError); pax sparse 1.0 keeps its map in the data blocks (tarfile parses it
    # whole, a short one is a ValueError). The next header's place does not depend on the map.
    def _proc_sparse(self, tarfile_):
        _, extended, real_size = self._sparse_structs
        del self._sparse_structs
        while extended:
            block = tarfile_.fileobj.read(tarfile.BLOCKSIZE)
            if len(block) < tarfile.BLOCKSIZE:
                raise tarfile.TruncatedHeaderError("a sparse member's map is cut off")
            extended = block[504]
        self.sparse = []
        self.offset_data = tarfile_.fileobj.tell()
        tarfile_.offset = self.offset_data + self._block(self.size)
        self.size = real_size
        return self

    def _skip_sparse_map(self, next_, *_):
        next_.sparse = []

    _proc_gnusparse_00 = _proc_gnusparse_01 = _proc_gnusparse_10 = _skip_sparse_map


def _refuse(tarfile_: tarfile.TarFile, why: str) -> None:
    """Stop reading headers. tarfile takes a bad header after the first for the end of the archive, so
    ``why`` is also kept for ``read_tar_index`` to report as the damage."""
    tarfile_._mmpipe_refused = why
    raise tarfile.InvalidHeaderError(why)


def read_tar_index(path: str | os.PathLike) -> TarIndex:
    """The member index of an uncompressed tar, from its headers (the data is skipped by seek).

    Raises ``errors.InputError`` (one line) for a file that is not an uncompressed tar at all
    (empty, compressed, garbage) or holds more than ``MAX_TAR_MEMBERS`` members (refused at the one
    past it); a tar that is damaged later gives the members before the damage and says why in ``damage``.
    """
    members: list[Member] = []
    damage = ""
    with faults.open_binary(path) as f:
        size = os.fstat(f.fileno()).st_size
        try:
            tf = tarfile.open(fileobj=f, mode="r:", tarinfo=_BoundedTarInfo)
        except tarfile.TarError as e:
            raise InputError(f"data.shards: cannot read {_short(path)}: not an uncompressed tar ({e}); expected a "
                             "webdataset .tar shard") from None
        with tf:
            while True:
                try:
                    ti = tf.next()
                except tarfile.TarError as e:  # "unexpected end of data": a member cut off
                    damage = f"damaged after {len(members)} members: {e}"
                    break
                if ti is None:
                    break
                tf.members.clear()  # tarfile keeps every TarInfo it read (~400 bytes each): keep only ours
                if len(members) == MAX_TAR_MEMBERS:
                    raise InputError(f"data.shards: cannot read {_short(path)}: more than {MAX_TAR_MEMBERS} members "
                                     "(a member-count bomb, or not one shard); expected a webdataset shard of at most "
                                     f"{MAX_TAR_MEMBERS}: split it")
                kind = "sparse" if ti.sparse is not None else _KINDS.get(ti.type, "other")
                members.append(Member(ti.name, ti.offset_data, ti.size, kind))
            end = tf.offset
            if not damage and getattr(tf, "_mmpipe_refused", ""):
                damage = f"damaged after {len(members)} members: {tf._mmpipe_refused}"
        cut = next((m.name for m in members if m.kind == "file" and m.offset + m.size > size), "")
        if cut:
            damage = f"truncated at byte {size}: member {cut!r} runs past the end"
        elif not damage:
            # A tar ends with two zero blocks; tarfile stops silently at anything else it cannot read.
            tail = os.pread(f.fileno(), 1024, end)
            if len(tail) < 1024 or tail.count(0) != 1024:
                damage = (f"truncated at byte {size}: no end-of-archive marker after {len(members)} members"
                          if not tail.strip(b"\0") else f"unreadable bytes at {end} after {len(members)} members")
    return TarIndex(tuple(members), size, damage, cut)


def _short(path: str | os.PathLike) -> str:
    return "/".join(Path(path).parts[-2:])


class _ShardSource(ImageSource):
    """Files under a root, each holding many images; a reference is ``<file relative to root>::<inner>``."""

    def __init__(self, root: str | os.PathLike):
        self.root = str(root)
        self._resolver: images.Resolver | None = None

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.root!r})"

    def file(self, ref: str) -> tuple[str, str]:
        """The real path of the reference's file and the inner part; ``images.UnsafePath`` outside the root."""
        rel, inner = split_ref(ref)
        if self._resolver is None:
            self._resolver = images.Resolver(self.root)
        return self._resolver(rel), inner

    def fingerprint(self, refs: list[str]) -> str:
        files = []
        for r in set(refs):
            file, sep, _ = str(r).partition(SEP)
            files.append(file if sep else f"{r}\0no-file")  # a malformed reference: probe quarantines it
        return files_fingerprint(self.root, files)

    def key(self) -> str:
        return f"{self.kind}:{os.path.realpath(self.root)}"


class TarSource(_ShardSource):
    """Members of uncompressed tar shards (webdataset, img2dataset) read in place by offset, never extracted.

    A reference is ``<shard path relative to root>::<member name>``. Each shard's member index is
    built from its headers once per process (``read_tar_index``) and never pickled.
    """

    kind = "tar"

    def __init__(self, root: str | os.PathLike, max_member_bytes: int | None = None):
        super().__init__(root)
        self.max_member_bytes = max_member_bytes

    def member(self, ref: str) -> tuple[str, Member, int]:
        """The shard's real path, the member and the shard's size; ``UnsafePath`` or ``faults.ReadError``
        when it cannot be read."""
        path, name = self.file(ref)
        if why := unsafe_member(name):
            raise images.UnsafePath(f"{why} in {ref!r}")
        try:
            st = os.stat(path)
        except OSError as e:
            raise faults.ReadError(path, faults.reason_of(e), e.strerror or str(e), e.errno) from None
        stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
        with _LOCK:
            cached = _TAR_INDEXES.get(path)
        if cached is None or cached[0] != stamp:
            try:
                cached = (stamp, read_tar_index(path).by_name())
            except InputError as e:
                cached = (stamp, str(e))
            _cache_index(path, cached)
        if isinstance(cached[1], str):
            raise faults.ReadError(path, "read_error", cached[1])
        m = cached[1].get(name)
        if m is None:
            raise faults.ReadError(ref, "missing_file", f"no member {name!r} in the shard")
        if m.kind != "file":
            raise faults.ReadError(ref, "read_error", f"member {name!r} is a {m.kind}, not a regular file")
        if m.offset + m.size > st.st_size:
            raise faults.ReadError(ref, "read_error", f"member {m.name!r} is cut off: the shard is truncated")
        return path, m, st.st_size

    def open(self, ref: str) -> tuple[BinaryIO, int]:
        path, m, _ = self.member(ref)
        if self.max_member_bytes is not None and m.size > self.max_member_bytes:
            raise faults.ReadError(ref, "file_too_large", f"{m.size} bytes > data.max_member_bytes {self.max_member_bytes}")
        f = faults.open_binary(path)  # retries transient errors, as for a loose file
        return io.BufferedReader(_Window(f, m.offset, m.size), buffer_size=1 << 16), m.size

    def read(self, ref: str, max_bytes: int | None = None) -> bytes:
        path, m, _ = self.member(ref)
        limit = min(x for x in (max_bytes, self.max_member_bytes, m.size + 1) if x is not None)
        if m.size > limit:
            raise faults.ReadError(ref, "file_too_large", f"{m.size} bytes > the limit of {limit}")
        with faults.open_binary(path) as f:  # retries transient errors, as for a loose file
            data = os.pread(f.fileno(), m.size, m.offset)  # one read at the member's offset: nothing is extracted
        if len(data) != m.size:
            raise faults.ReadError(ref, "read_error", f"member {m.name!r} is cut off: the shard is truncated")
        return data


def _cache_index(path: str, entry: tuple[tuple[int, int, int], dict[str, Member] | str]) -> None:
    """Keep a shard's index, dropping the oldest while too many shards or members are kept."""
    def members(e) -> int:
        return len(e[1]) if isinstance(e[1], dict) else 0

    with _LOCK:
        _TAR_INDEXES.pop(path, None)
        while _TAR_INDEXES and (len(_TAR_INDEXES) >= _MAX_OPEN_INDEXES or members(entry) + sum(
                map(members, _TAR_INDEXES.values())) > _MAX_CACHED_MEMBERS):
            _TAR_INDEXES.pop(next(iter(_TAR_INDEXES)))
        _TAR_INDEXES[path] = entry


class ParquetSource(_ShardSource):
    """Image bytes in a Parquet column (binary, or a ``{bytes, path}`` struct as Hugging Face writes).

    A reference is ``<file relative to root>::<row index in the file>``. One row group's image column
    is read at a time and the last one is kept per process, so reading rows in order reads each
    group once and memory stays bounded by a row group (one over ``MAX_ROW_GROUP_BYTES`` is refused).
    """

    kind = "parquet"

    def __init__(self, root: str | os.PathLike, column: str = "image"):
        super().__init__(root)
        self.column = column

    def _file(self, path: str) -> tuple[tuple[int, int], pq.ParquetFile, np.ndarray]:
        try:
            st = os.stat(path)
        except OSError as e:
            raise faults.ReadError(path, faults.reason_of(e), e.strerror or str(e), e.errno) from None
        stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
        files = getattr(_LOCAL, "parquet_files", None)
        if files is None:
            files = _LOCAL.parquet_files = {}
        cached = files.get(path)
        if cached is None or cached[0] != stamp:
            try:
                pf = pq.ParquetFile(path)
            except Exception as e:  # not Parquet, or damaged metadata
                raise faults.ReadError(path, "read_error", errors.row_detail(e, "not a readable Parquet file: ")) from None
            starts = np.cumsum([0] + [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)])
            if len(files) >= _MAX_OPEN_INDEXES:
                files.pop(next(iter(files)))
            cached = files[path] = (stamp, pf, starts)
        return cached

    def _cell(self, ref: str) -> bytes:
        path, inner = self.file(ref)
        try:
            row = int(inner)
        except ValueError:
            raise faults.ReadError(ref, "missing_file", f"row {inner!r} is not a row index") from None
        stamp, pf, starts = self._file(path)
        if not 0 <= row < starts[-1]:
            raise faults.ReadError(ref, "missing_file", f"no row {row} in a file of {starts[-1]} rows")
        g = int(np.searchsorted(starts, row, side="right") - 1)
        here = (path, stamp, g, self.column)
        current = getattr(_LOCAL, "row_group", None)
        if current is None or current[0] != here:
            current = _LOCAL.row_group = None  # the previous group is freed before the next is read
            col_idx = pf.schema_arrow.get_field_index(self.column)
            if col_idx < 0:
                raise faults.ReadError(ref, "read_error", f"no column {self.column!r} in the file")
            rg = pf.metadata.row_group(g)
            leaves = [rg.column(i) for i in range(rg.num_columns)
                      if rg.column(i).path_in_schema.split(".")[0] == self.column]
            nbytes = sum(c.total_uncompressed_size for c in leaves)
            if nbytes > MAX_ROW_GROUP_BYTES:
                raise faults.ReadError(ref, "file_too_large",
                                       f"row group {g} holds {nbytes} bytes of images > {MAX_ROW_GROUP_BYTES}")
            try:
                col = pf.read_row_group(g, columns=[self.column]).column(0).combine_chunks()
                if pa.types.is_struct(col.type):  # Hugging Face's {bytes, path}: a null struct has no bytes
                    col = pc.struct_field(col, "bytes")
            except Exception as e:
                raise faults.ReadError(ref, "read_error", errors.row_detail(e, f"row group {g}: ")) from None
            current = _LOCAL.row_group = (here, col)
        value = current[1][row - int(starts[g])]
        data = value.as_py() if value.is_valid else None
        if not isinstance(data, bytes):
            raise faults.ReadError(ref, "missing_file", f"no image bytes in row {row}")
        return data

    def open(self, ref: str) -> tuple[BinaryIO, int]:
        data = self._cell(ref)
        return io.BytesIO(data), len(data)

    def read(self, ref: str, max_bytes: int | None = None) -> bytes:
        data = self._cell(ref)
        if max_bytes is not None and len(data) > max_bytes:
            raise faults.ReadError(ref, "file_too_large", f"{len(data)} bytes > the limit of {max_bytes}")
        return data


def of(data: DataConfig) -> ImageSource:
    """The image source of a data config."""
    if data.format == "webdataset":
        return TarSource(data.image_root, data.max_member_bytes)
    if data.format == "parquet":
        return ParquetSource(data.image_root, data.image_column)
    return FileSource(data.image_root)


def as_source(where: ImageSource | str | os.PathLike) -> ImageSource:
    """A source as given, or the files under a root folder given as a path (older callers)."""
    return where if isinstance(where, ImageSource) else FileSource(where)


def read_checked(source: ImageSource, ref: str, policy: images.DecodePolicy = images.DEFAULT_POLICY) -> bytes:
    """``DecodePolicy.read`` through a source: refused unread over the byte limit, ``file_changed`` when
    the bytes are not the size the probe read."""
    try:
        data = source.read(ref, max_bytes=policy.max_bytes)
    except faults.ReadError as e:
        if e.reason == "file_too_large" and policy.file_bytes is not None:  # grew since the probe
            raise images.RefusedImage("file_changed", f"{e.detail}, the probe read {policy.file_bytes}") from None
        raise
    return policy.accept(data)


def load_rgb(source: ImageSource, ref: str, max_side: int | None = None,
             policy: images.DecodePolicy = images.DEFAULT_POLICY) -> images.Image.Image:
    """``images.load_rgb`` for a reference of ``source``: only what ``policy`` accepts is decoded."""
    if isinstance(source, FileSource):  # a file: images.load_rgb itself, as every reader of files did
        return images.load_rgb(source.path(ref), max_side=max_side, policy=policy)
    return images.load_rgb_bytes(read_checked(source, ref, policy), max_side, policy)


__all__ = ["FileSource", "ImageSource", "ParquetSource", "TarSource", "as_source", "load_rgb", "of", "read_checked",
           "read_tar_index", "split_ref"]
