"""The run directory: where everything of one training run lives. Every command asks `RunDir` for a path instead
of joining names or walking `.parent`s itself.

    RUN_DIR/
        config.yaml                 the resolved experiment config (rank 0, at every start)
        metrics.jsonl               training, sample-grid, stop and evaluation records, one JSON object per line
        checkpoints/                DeepSpeed tags stepNNNNNNNN/ (+ _universal forms, nonfinite-stepN/), `latest`
        samples/stepNNNNNNNN.png    the EMA sample grids of training
        keys/rankR.jsonl            data.record_keys: true: each step's sample keys, per rank
        tensorboard/                train.tensorboard: true
        eval/<tag>-<sampling>/      trainer.evaluate --ckpt: images/, metrics.json
        export/<tag>/               trainer.schedule's exports (model.safetensors, README.md, .sha256)
        published.json              trainer.schedule: milestone -> published URL and sha256
        schedule.lock               trainer.schedule: one invocation at a time
        run.lock                    held by the training's rank 0 for the run's life: one training at a time

A checkpoint is named by its tag folder, RUN_DIR/checkpoints/TAG; `RunDir.of_checkpoint` goes back from one.
"""
from __future__ import annotations

import fcntl
import json
import os
import shlex
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["RunDir", "step_tag", "tag_step", "lock_run", "run_locked", "lock_schedule"]


def step_tag(step: int) -> str:
    """The tag of the periodic checkpoint at `step`: step00001000."""
    return f"step{step:08d}"


def tag_step(tag: str | None) -> int:
    """1000 for "step00001000"; 0 for None or a tag that is not a periodic checkpoint's."""
    return int(tag.removeprefix("step")) if tag and tag.startswith("step") and tag[4:].isdigit() else 0


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root))

    @classmethod
    def of_checkpoint(cls, tag_dir: str | Path) -> "RunDir":
        """The run a checkpoint tag folder (RUN_DIR/checkpoints/TAG) belongs to."""
        return cls(Path(tag_dir).parent.parent)

    # --- paths ----------------------------------------------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, tag: str) -> Path:
        return self.checkpoints / tag

    @property
    def latest(self) -> Path:
        """DeepSpeed's `latest` file: the tag of the last checkpoint rank 0 saved (`latest_tag` checks it)."""
        return self.checkpoints / "latest"

    def keys(self, rank: int) -> Path:
        """data.record_keys: the sample keys rank `rank` trained on, per step (trainer/train/keyrecord.py)."""
        return self.root / "keys" / f"rank{rank}.jsonl"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    def grid(self, step: int) -> Path:
        return self.samples / f"{step_tag(step)}.png"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    def eval_dir(self, name: str) -> Path:
        return self.root / "eval" / name

    def export_weights(self, tag: str) -> Path:
        return self.root / "export" / tag / "model.safetensors"

    @property
    def published_file(self) -> Path:
        return self.root / "published.json"

    @property
    def schedule_lock(self) -> Path:
        return self.root / "schedule.lock"

    @property
    def lock(self) -> Path:
        return self.root / "run.lock"

    # --- contents -------------------------------------------------------------------------------------------------
    def read_metrics(self) -> list[dict]:
        """The records of metrics.jsonl, skipping a line torn by a killed run; [] when there is none."""
        records = []
        for line in self.metrics.read_text().splitlines() if self.metrics.is_file() else []:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(r, dict):
                records.append(r)
        return records

    def append_metrics(self, record: dict) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")

    def published(self) -> dict:
        """published.json: {str(step): {"url", "sha256", "time"}}; {} when nothing is published."""
        return json.loads(self.published_file.read_text()) if self.published_file.is_file() else {}

    def record_published(self, step: int, record: dict) -> None:
        published = {**self.published(), str(step): record}
        tmp = self.published_file.with_suffix(".json.tmp")
        with open(tmp, "w") as f:
            f.write(json.dumps(published, indent=1))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.published_file)
        fd = os.open(self.root, os.O_RDONLY)  # the rename itself
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --- the run lock -----------------------------------------------------------------------------------------------

def lock_run(run: RunDir) -> tuple[object | None, str | None]:
    """Take the run directory's lock for this process's life: (open lock file, None), or (None, the one-line
    refusal naming the holder: host, pid, start time, command). An exclusive `flock` on RUN_DIR/run.lock, taken
    by rank 0 only: the kernel (or the NFS server, for a shared file system) drops it when the process ends however
    it ends, so a killed job never leaves a stale lock, and the ranks of one job do not exclude each other on a
    shared file system. The other ranks of a job cannot outlive rank 0 by long: the launcher ends them when a rank
    fails, and they stop when their launcher is gone. A file system without locks (Lustre without its `flock`
    mount option) gives (None, None): the run goes on unlocked."""
    run.root.mkdir(parents=True, exist_ok=True)
    fd = os.open(run.lock, os.O_RDWR | os.O_CREAT, 0o644)  # not truncated: it names the holder
    f = os.fdopen(fd, "r+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = f.read().strip() or "{}"
        f.close()
        return None, f"error: run directory {run.root} is in use by another training ({_describe(holder)}); wait " \
                     f"for it to end, or use another --run-dir"
    except OSError:
        f.close()
        return None, None
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                        "start": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": shlex.join(sys.argv)}))
    f.flush()
    return f, None


def _describe(holder: str) -> str:
    try:
        h = json.loads(holder)
    except json.JSONDecodeError:
        h = {}
    command = h.get("command", "?")
    command = command if len(command) <= 200 else command[:197] + "..."
    return f"host {h.get('host', '?')}, pid {h.get('pid', '?')}, started {h.get('start', '?')}: {command}"


def run_locked(run: RunDir) -> str | None:
    """Who holds the run's lock ("host H, pid P, started T: COMMAND"), or None when no training holds it."""
    if not run.lock.is_file():
        return None
    with open(run.lock, "r") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _describe(f.read().strip() or "{}")
        except OSError:
            return None
    return None


def lock_schedule(run: RunDir) -> tuple[object | None, str | None]:
    """trainer.schedule's lock, RUN_DIR/schedule.lock (one invocation at a time): (open lock file, None), or
    (None, why not: another invocation holds it, or a training holds the run directory)."""
    lock = open(run.schedule_lock, "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        return None, f"another invocation holds {run.schedule_lock}"
    if holder := run_locked(run):
        lock.close()
        return None, f"a training holds {run.lock} ({holder})"
    return lock, None
