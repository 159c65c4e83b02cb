"""An opt-in record of the samples each rank trained on (`data.record_keys: true`), for checking the data stream's
exactness from outside (bench/soak.py: every sample of a finished epoch read once, across kills and resumes).

RUN_DIR/keys/rankR.jsonl holds one line per optimiser step of rank R, written after the step and before its
checkpoint: {"step": s, "batches": [{"worker": w, "epoch": e, "keys": [...]}, ...]}, one entry per micro-batch
(the logical DataLoader worker that read it, the epoch of its chunk, the sample keys). A killed run leaves lines for
the steps after its last checkpoint, which the resumed run trains and writes again: a reader keeps each step's
last line (`read_key_records` returns them all, in order, so a check can also compare the repeats).
"""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["KeyRecord", "read_key_records"]


class KeyRecord:
    def __init__(self, path: str | Path):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a+b")
        if self.file.tell():  # a line cut by a kill: end it, so the next record starts on its own line
            self.file.seek(-1, 2)
            if self.file.read(1) != b"\n":
                self.file.write(b"\n")
        self.batches: list[dict] = []

    def add(self, batch: dict) -> None:
        self.batches.append({"worker": int(batch["pos"][0]), "epoch": int(batch.get("epoch", 0)),
                             "keys": list(batch["keys"])})

    def write(self, step: int) -> None:
        self.file.write((json.dumps({"step": step, "batches": self.batches}) + "\n").encode())
        self.file.flush()
        self.batches = []

    def close(self) -> None:
        self.file.close()


def read_key_records(path: str | Path) -> dict[int, list[list[dict]]]:
    """{step: [batches of each line written for it, oldest first]}; lines cut by a kill are left out."""
    out: dict[int, list[list[dict]]] = {}
    for line in Path(path).read_text().splitlines() if Path(path).is_file() else []:
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        out.setdefault(int(r["step"]), []).append(r["batches"])
    return out
