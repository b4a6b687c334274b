"""Prefect's temporary API server must not outlive the run that started it.

Without ``PREFECT_API_URL`` Prefect starts a temporary server in a child process and stops it at
exit (``atexit``). A run killed outright (SIGKILL, the kernel's out-of-memory killer) never gets
there: the server is orphaned, keeps its port and its memory, and the next run starts another one.
``start_temporary_server`` starts the server before the flow and hands its pid to a small watchdog
process, which stops the server once the run's process is gone, however it ended.
"""

from __future__ import annotations

import os
import subprocess
import sys

# Runs in its own process: polls its parent once a second; when the parent has gone (the watchdog
# is re-parented, so getppid() changes; a dead parent's pid may be reused, its ppid link may not),
# it terminates the server if that pid is still Prefect's uvicorn, then kills it after 5 s.
_WATCHDOG = r"""
import os, signal, sys, time
parent, server = int(sys.argv[1]), int(sys.argv[2])
def alive_server():
    try:
        with open(f"/proc/{server}/cmdline", "rb") as f:
            return b"prefect.server.api.server" in f.read()
    except OSError:
        return False
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


def start_temporary_server() -> int | None:
    """Start Prefect's temporary server now (if this process uses one) and watch it; its pid, or None.

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
    servers = [s.server_process for s in SubprocessASGIServer._instances.values() if s.server_process is not None]
    for proc in servers:
        subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(proc.pid)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C to the run's terminal does not stop the watchdog first
        )
    return servers[0].pid if servers else None
