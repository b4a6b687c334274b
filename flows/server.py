"""Prefect's temporary API server must not outlive the run that started it.

Without ``PREFECT_API_URL`` Prefect starts a temporary server in a child process and stops it at
exit (``atexit``). A run killed outright (SIGKILL, the kernel's out-of-memory killer) never gets
there: the server is orphaned, keeps its port and its memory, and the next run starts another one.
``temporary_server`` starts the server before the flow, hands its pid to a small watchdog process,
which stops the server once the run's process is gone, however it ended, and points the run's
settings at it, so that Dask workers report to this one server instead of each starting its own.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prefect.server.api.server import SubprocessASGIServer

# Runs in its own process: polls its parent once a second; when the parent has gone (the watchdog
# is re-parented, so getppid() changes; a dead parent's pid may be reused, its ppid link may not),
# it terminates the server, then kills it after 5 s. The server is known by its pid and its start
# time (a reused pid, even another run's Prefect server, has a later one).
_WATCHDOG = r"""
import os, signal, sys, time
parent, server = int(sys.argv[1]), int(sys.argv[2])
def started():
    try:
        with open(f"/proc/{server}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19]  # field 22: start time in clock ticks
    except (OSError, IndexError):
        return None
birth = started()
def alive_server():
    return birth is not None and started() == birth
while os.getppid() == parent:
    if not alive_server():
        sys.exit(0)
    time.sleep(1.0)
for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
    if not alive_server():
        break
    os.kill(server, sig)
    t = time.monotonic()
    while alive_server() and time.monotonic() - t < wait:
        time.sleep(0.1)
"""


@contextlib.contextmanager
def temporary_server() -> Iterator[None]:
    """Inside: Prefect's temporary server (if this process uses one) is running, watched, and the
    API URL of every flow and task run, Dask workers' included."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = start_temporary_server()
    if server is None:
        yield
        return
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield


def start_temporary_server() -> SubprocessASGIServer | None:
    """Start Prefect's temporary server now (if this process uses one) and watch it; the server, or None.

    Does nothing with a configured ``PREFECT_API_URL`` (a real server is not ours to stop) or where
    ``/proc`` is missing (the watchdog needs it to tell the server from a reused pid).
    """
    from prefect.client.orchestration import get_client
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value() or not os.path.isdir("/proc"):
        return None
    with get_client(sync_client=True) as client:  # the first client starts the temporary server
        client.api_healthcheck()
    server = next((s for s in SubprocessASGIServer._instances.values() if s.server_process is not None), None)
    if server is not None:
        subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(server.server_process.pid)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C to the run's terminal does not stop the watchdog first
        )
    return server
