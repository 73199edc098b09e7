"""Running ``midtrain`` as a separate process in tests: its environment, and a SIGKILL mid-run.

Shared by the resume tests of sft and vla and the DDP tests (accelerate launch).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import midtrain

SRC = str(Path(midtrain.__file__).parents[1])  # the sources the tests import, for the subprocess too


def cli_env() -> dict:
    """The test process's environment for a child ``midtrain``: these sources, one thread, offline, quiet."""
    return {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "MIDTRAIN_PROGRESS": "off", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip


def kill_at_checkpoint(cmd: list[str], run_root: Path, stage: str, step: int, timeout_s: float = 300) -> Path:
    """Start ``cmd``, SIGKILL it as soon as checkpoint ``step`` of ``stage`` exists (in the stage
    folder or, while it runs, its ``.partial`` folder); return the folder that holds the checkpoints.
    Fails if the process ends first."""
    proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    in_progress = [run_root / stage, run_root / ".partial" / stage]  # where a running stage writes
    deadline = time.time() + timeout_s
    while not any((d / "checkpoints" / f"step-{step:06d}").exists() for d in in_progress):
        assert proc.poll() is None and time.time() < deadline, f"the run ended before its checkpoint at step {step}"
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return next(d for d in in_progress if (d / "checkpoints").exists())


def kill_launch_at_checkpoint(cmd: list[str], run_root: Path, stage: str, step: int, timeout_s: float = 300) -> Path:
    """As :func:`kill_at_checkpoint` for a launcher (``accelerate launch``, ``torchrun``): the launcher
    and its workers (each in a session of its own) are SIGKILLed together."""
    import psutil

    proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    in_progress = [run_root / stage, run_root / ".partial" / stage]
    deadline = time.time() + timeout_s
    while not any((d / "checkpoints" / f"step-{step:06d}").exists() for d in in_progress):
        assert proc.poll() is None and time.time() < deadline, f"the run ended before its checkpoint at step {step}"
        time.sleep(0.002)
    procs = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
    for p in procs:
        p.send_signal(signal.SIGKILL)
    proc.wait()
    psutil.wait_procs(procs, timeout=60)  # gone (reaped), so a rerun finds the stage lock's holder dead
    return next(d for d in in_progress if (d / "checkpoints").exists())
