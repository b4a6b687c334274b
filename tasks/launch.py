"""Several training processes from inside a flow: the train task runs ``torchrun`` as a subprocess.

With ``train.gpus > 1`` the train task does not train in its own process: it starts
``python -m torch.distributed.run --standalone --nproc_per_node=N -m mmpipe train RUN_DIR``, one
process per GPU (gloo processes on CPU), and waits. Rank 0 writes the stage's artifacts with the
same digests as an in-process run (``mmpipe.trainer`` calls ``mmcore.execute.run_stage``), so the
task returns the usual ``StageOutput`` and a scheduled deployment trains on every GPU of its worker
with no manual step. The processes share the task's environment (``CUDA_VISIBLE_DEVICES`` picks
the GPUs) and run in a process group of their own: a timeout, a cancelled run or a failed task
stops every rank, so none is left holding a GPU. Their output goes to the task's log.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

log = logging.getLogger("mmpipe.launch")


def torchrun_command(run_dir: str | os.PathLike, nproc: int) -> list[str]:
    """The command line of a DDP training run of ``run_dir`` on ``nproc`` processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={int(nproc)}",
            "-m", "mmpipe", "train", str(Path(run_dir).resolve())]


def _stop_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM to the whole group (torchrun and its ranks), then SIGKILL to what is left."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def torchrun(run_dir: str | os.PathLike, nproc: int, timeout: float | None = None) -> None:
    """Train ``run_dir``'s model on ``nproc`` processes and wait; raises with the end of their output
    on failure or after ``timeout`` seconds (every rank stopped either way)."""
    cmd = torchrun_command(run_dir, nproc)
    log.info("training on %d processes: %s", nproc, " ".join(cmd))
    tail: deque[str] = deque(maxlen=40)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)

    def pump() -> None:  # a thread: the deadline below is kept however quiet the ranks are
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line.rstrip())
            log.info("%s", line.rstrip())

    reader = threading.Thread(target=pump, name="torchrun-output", daemon=True)
    reader.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while proc.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"train: torchrun on {nproc} processes ran past {timeout:.0f} s")
            time.sleep(0.2)
    except BaseException:  # a timeout, a cancelled flow run (KeyboardInterrupt), anything: stop every rank
        _stop_group(proc)
        raise
    finally:
        reader.join(timeout=5)
    if proc.returncode != 0:
        raise RuntimeError(f"train: torchrun on {nproc} processes exited with {proc.returncode}:\n" + "\n".join(tail))
