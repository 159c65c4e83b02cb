"""Jobs that chain the project's commands (`trainer.quickstart`): numbered stage banners with their elapsed times,
and running one command (`python -m MODULE ...`) in a child process, its command line printed first, a failure
ending the job with a message that says what failed. (`trainer/train/launch.py` starts the training commands.)
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

__all__ = ["Stages", "mmss", "run_module", "REPO"]

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
