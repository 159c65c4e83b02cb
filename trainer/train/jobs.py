"""Jobs that chain the project's commands (`trainer.quickstart`): numbered stage banners with their elapsed times,
and running one command (`python -m MODULE ...`) in a child process, its command line printed first, a failure
ending the job with a message that says what failed, and running a child in a process group of its own that the
job's stop signals reach and that is waited for to its last process (`run_group`, for `trainer.schedule`).
(`trainer/train/launch.py` starts the training commands.)
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["Stages", "mmss", "run_module", "run_group", "REPO"]

REPO = Path(__file__).resolve().parents[2]


def mmss(seconds: float) -> str:
    """"4 min 07 s", or "52 s"."""
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"


def run_module(module: str, args: list, failure: str) -> None:
    """`python -m MODULE ARGS` in the repository root; SystemExit(`failure`) if it fails."""
    cmd = [sys.executable, "-m", module, *map(str, args)]
    print(f"  $ python {' '.join(cmd[1:])}", flush=True)
    if subprocess.run(cmd, cwd=REPO).returncode != 0:
        raise SystemExit(failure)


def run_group(cmd: list[str], env=None) -> tuple[int, int | None]:
    """Run `cmd` in a process group of its own; SIGTERM or SIGINT to this process is passed to every process of the
    group (as Slurm or a terminal would signal a whole job). Returns (the child's exit code, the signal passed on or
    None) once every process of the group has ended: a training's ranks outlive its launcher while they save, and
    whoever holds a lock for the child must hold it until then."""
    from trainer.train.distributed import group_processes

    child = subprocess.Popen(cmd, env=env, process_group=0)
    got: list = []

    def forward(signum, frame):
        got.append(signum)
        try:
            os.killpg(child.pid, signum)
        except ProcessLookupError:
            pass

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = child.wait()
        while group_processes(child.pid):
            time.sleep(0.2)
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    return code, got[0] if got else None


class Stages:
    """Numbered stage banners, each with its elapsed time and where its output went."""

    def __init__(self, total: int):
        self.total, self.i, self.start = total, 0, time.time()

    def run(self, name: str, what: str, fn, where) -> object:
        self.i += 1
        print(f"\n[{self.i}/{self.total}] {name}: {what}", flush=True)
        t0 = time.time()
        result = fn()
        print(f"[{self.i}/{self.total}] {name} done in {mmss(time.time() - t0)} -> {where}", flush=True)
        return result

    def elapsed(self) -> str:
        return mmss(time.time() - self.start)
