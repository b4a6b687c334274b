"""Reading image bytes with retries, and the test-only fault injector that proves they work.

Every stage reads image files through ``read_bytes`` (or ``open_binary`` to read part of one,
e.g. a header). Only regular files are read: a FIFO or folder fails at once, never blocks. Transient ``OSError``s (a flaky network
mount: ``EIO``, ``EAGAIN``, ``ETIMEDOUT``, ``ESTALE``, ``EINTR``) are retried with a short
backoff, each retry logged at WARNING on ``mmcore.io``; permanent ones (and transient ones that
outlast the retries) raise ``ReadError`` with a reason code the probe stage quarantines the row
with. A bad file costs its row, never the run.

Fault injection, for tests only, by environment (so it reaches worker processes too):

- ``MMPIPE_FAULT_RATE``: probability (0..1) that an attempt fails with ``EIO`` "injected fault",
  decided from (``MMPIPE_FAULT_SEED``, the path's last two parts, the attempt number), so a run
  is reproducible wherever the dataset sits.
- ``MMPIPE_FAULT_PERMANENT``: comma-separated path suffixes that fail on every attempt.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, TypeVar

log = logging.getLogger("mmcore.io")
T = TypeVar("T")

RATE_ENV = "MMPIPE_FAULT_RATE"
SEED_ENV = "MMPIPE_FAULT_SEED"
PERMANENT_ENV = "MMPIPE_FAULT_PERMANENT"

# Errors a retry may cure; anything else (missing file, no permission, a folder) will not pass.
TRANSIENT = frozenset({errno.EIO, errno.EAGAIN, errno.ETIMEDOUT, errno.ESTALE, errno.EINTR})

# Reason codes a stage quarantines an unreadable row with (merge into the stage's REASONS).
REASONS = {
    "missing_file": "the image file does not exist",
    "permission_denied": "the image file cannot be opened (permissions)",
    "read_error": "reading the image failed (I/O error, also after retries, or not a regular file)",
    "file_too_large": "the file is larger than the per-file byte limit (probe.max_file_bytes), refused unread",
}
_REASON_OF_ERRNO = {errno.ENOENT: "missing_file", errno.ENOTDIR: "missing_file", errno.EACCES: "permission_denied",
                    errno.EPERM: "permission_denied"}


class ReadError(OSError):
    """An image file that cannot be read; ``reason`` is a code from ``REASONS``."""

    def __init__(self, path: str | os.PathLike, reason: str, detail: str, err: int | None = None):
        super().__init__(err or errno.EIO, detail, str(path))
        self.path = str(path)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail} ({_short(self.path)})"

    def __reduce__(self):  # picklable across worker processes with its reason intact
        return (ReadError, (self.path, self.reason, self.detail, self.errno))


def _short(path: str | os.PathLike) -> str:
    """The path's last two parts ("images/00012.jpg"): stable across where a dataset sits."""
    return "/".join(Path(path).parts[-2:])


def injection() -> str:
    """The fault-injection settings in force ('' when none): a run with injected faults must never
    share cached results with a normal run, nor leave its results for one (the task layer keys on it)."""
    return ";".join(f"{k}={os.environ[k]}" for k in (RATE_ENV, SEED_ENV, PERMANENT_ENV) if os.environ.get(k))


def _injected(path: str | os.PathLike, attempt: int) -> OSError | None:
    """The fault the injector raises on this attempt, or None (always None unless the env asks)."""
    permanent = os.environ.get(PERMANENT_ENV, "")
    if permanent and any(s and str(path).endswith(s) for s in permanent.split(",")):
        return OSError(errno.EIO, "injected permanent fault", str(path))
    rate = float(os.environ.get(RATE_ENV, "0") or 0)
    if rate <= 0:
        return None
    seed = os.environ.get(SEED_ENV, "0")
    h = hashlib.sha256(f"{seed}\x00{_short(path)}\x00{attempt}".encode()).digest()
    if int.from_bytes(h[:8], "little") / 2**64 < rate:
        return OSError(errno.EIO, "injected fault", str(path))
    return None


def _open_fd(path: str | os.PathLike) -> tuple[int, os.stat_result]:
    """A descriptor and its stat for a regular file; anything else raises ``ReadError`` at once."""
    # O_NONBLOCK: a FIFO or device planted in the dataset must not hang the run on open.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            folder = stat.S_ISDIR(st.st_mode)
            raise ReadError(path, "read_error", "a folder" if folder else "not a regular file",
                            errno.EISDIR if folder else errno.EINVAL)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def _open_regular(path: str | os.PathLike) -> BinaryIO:
    fd, _ = _open_fd(path)
    try:
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _too_large(path: str | os.PathLike, size: int, max_bytes: int) -> ReadError:
    return ReadError(path, "file_too_large", f"{size} bytes > the limit of {max_bytes}", errno.EFBIG)


def _read_regular(path: str | os.PathLike, max_bytes: int | None = None) -> bytes:
    # os.read straight into one bytes object of the file's size: no buffered-reader layer.
    fd, st = _open_fd(path)
    try:
        # Refused by its size before a byte is read: a sparse 8 GB file costs nothing.
        if max_bytes is not None and st.st_size > max_bytes:
            raise _too_large(path, st.st_size, max_bytes)
        os.set_blocking(fd, True)  # a FUSE mount may honour O_NONBLOCK even on a regular file
        parts = [os.read(fd, st.st_size + 1)]
        total = len(parts[0])
        while parts[-1]:  # until end of file, should the file have grown since the stat
            if max_bytes is not None and total > max_bytes:  # ... but never past the limit
                raise _too_large(path, total, max_bytes)
            parts.append(os.read(fd, 1 << 20))
            total += len(parts[-1])
        return b"".join(parts) if len(parts) > 2 else parts[0]
    finally:
        os.close(fd)


def reason_of(err: OSError) -> str:
    """The quarantine reason code of an error that reading a file raised."""
    if isinstance(err, ReadError):
        return err.reason
    return _REASON_OF_ERRNO.get(err.errno, "read_error")


def _retrying(path: str | os.PathLike, action: Callable[[str | os.PathLike], T], attempts: int, backoff: float) -> T:
    for attempt in range(1, attempts + 1):
        try:
            fault = _injected(path, attempt)
            if fault is not None:
                raise fault
            return action(path)
        except ReadError:
            raise
        except OSError as e:
            msg = e.strerror or str(e)
            if e.errno not in TRANSIENT:
                raise ReadError(path, reason_of(e), msg, e.errno) from None
            if attempt == attempts:
                raise ReadError(path, "read_error", f"{msg} (after {attempts} attempts)", e.errno) from None
            log.warning("retry %d/%d reading %s: %s", attempt + 1, attempts, _short(path), msg)
            time.sleep(min(1.0, backoff * 2 ** (attempt - 1)))
    raise AssertionError("unreachable")  # pragma: no cover


def read_bytes(path: str | os.PathLike, attempts: int = 5, backoff: float = 0.02, max_bytes: int | None = None) -> bytes:
    """A file's bytes; transient errors retried ``attempts`` times in all, others raise ``ReadError``.

    Args:
        backoff: seconds before the first retry, doubling after each (capped at 1 s).
        max_bytes: a larger file raises ``ReadError`` with reason ``file_too_large`` before it is read.
    """
    return _retrying(path, lambda p: _read_regular(p, max_bytes), attempts, backoff)


def open_binary(path: str | os.PathLike, attempts: int = 5, backoff: float = 0.02) -> BinaryIO:
    """A regular file opened for reading (for callers that read only part of it), with ``read_bytes``'s retries."""
    return _retrying(path, _open_regular, attempts, backoff)
