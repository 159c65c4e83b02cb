"""Which checkpoint a run resumes from, and resuming on another number of GPUs (universal checkpoints).

A DeepSpeed ZeRO checkpoint is cut into one optimizer partition per data-parallel rank, so it only loads on the
world size that wrote it. DeepSpeed's universal checkpoint (`deepspeed.checkpoint.ds_to_universal`) re-cuts it
into one file per parameter that loads on any world size (`"checkpoint": {"load_universal": true}`). The trainer
does this by itself: `--resume auto` on a world size other than the checkpoint's converts `checkpoints/TAG` into
`checkpoints/TAG_universal` once (rank 0; other ranks wait) and loads that. To convert ahead of time (e.g. on a
login node for a large model): `python -m trainer.checkpoints RUN_DIR [--tag TAG]`.

`train.keep_last: N` keeps only the newest N periodic checkpoints (`prune`, after each save).

After a change of world size or of `data.workers` the data stream cannot continue where it was (`stream_mismatch`:
its positions are per rank and worker): it restarts with a seed drawn from (seed, step), so it does not replay the
samples of the run's beginning, and rank 0 warns with the setting that continues it exactly.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

__all__ = ["latest_tag", "mark_complete", "is_complete", "checkpoint_world", "plan_resume",
           "convert_to_universal", "prune", "stream_mismatch", "UNIVERSAL_SUFFIX", "COMPLETE"]

UNIVERSAL_SUFFIX = "_universal"


COMPLETE = "maskdm_complete.json"  # written by rank 0 once every rank has saved its part of a checkpoint


def mark_complete(tag_dir: str | Path, step: int, world: int) -> None:
    """Mark a checkpoint whole. DeepSpeed's rank 0 writes `latest` as soon as its own files are saved, before the
    other ranks' partitions are, so a job killed in between leaves `latest` naming a partial checkpoint."""
    tag_dir = Path(tag_dir)
    tmp = tag_dir / f".{COMPLETE}.tmp"
    tmp.write_text(json.dumps({"step": step, "world": world}))
    os.replace(tmp, tag_dir / COMPLETE)


def is_complete(tag_dir: str | Path) -> bool:
    return (Path(tag_dir) / COMPLETE).is_file()


def latest_tag(ckpt_dir: str | Path) -> str | None:
    """The newest complete checkpoint: the tag `latest` names if it is complete, else the complete tag with the
    highest step (a kill during a save). Runs whose checkpoints carry no completeness marker at all (written
    before it existed) fall back to `latest` as it stands."""
    ckpt_dir = Path(ckpt_dir)
    latest = ckpt_dir / "latest"
    named = latest.read_text().strip() if latest.is_file() else None
    if named is None or is_complete(ckpt_dir / named):
        return named
    complete = sorted((json.loads(p.read_text())["step"], p.parent.name) for p in ckpt_dir.glob(f"*/{COMPLETE}")
                      if not p.parent.name.endswith(UNIVERSAL_SUFFIX))
    if complete:
        return complete[-1][1]
    return named


def checkpoint_world(tag_dir: str | Path) -> int | None:
    """Data-parallel ranks that wrote a ZeRO checkpoint (from its completeness marker, else one optimizer
    partition per rank); None without ZeRO files."""
    n = len(list(Path(tag_dir).glob("*zero_pp_rank_*_optim_states.pt")))
    marker = Path(tag_dir) / COMPLETE
    if n and marker.is_file():
        return json.loads(marker.read_text())["world"]
    return n or None


def plan_resume(ckpt_dir: str | Path, resume: str, world: int) -> tuple[str | None, bool]:
    """(tag to load or None, whether it is a universal checkpoint) for `--resume auto|none|TAG` on `world` ranks.
    Raises SystemExit naming the flag when the tag does not exist."""
    ckpt_dir = Path(ckpt_dir)
    if resume == "none":
        return None, False
    tag = latest_tag(ckpt_dir) if resume == "auto" else resume
    if tag is None:
        return None, False
    if not (ckpt_dir / tag).is_dir():
        have = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir()) if ckpt_dir.is_dir() else []
        raise SystemExit(f"error: --resume {resume}: no checkpoint {ckpt_dir / tag}; have {have}")
    if tag.endswith(UNIVERSAL_SUFFIX):
        return tag, True
    saved = checkpoint_world(ckpt_dir / tag)
    if saved is None or saved == world:
        return tag, False
    return tag + UNIVERSAL_SUFFIX, True


def convert_to_universal(ckpt_dir: str | Path, tag: str, log=print) -> str:
    """checkpoints/TAG -> checkpoints/TAG_universal with DeepSpeed's converter (in a subprocess: it runs its own
    worker pools); written under a temporary name and renamed, so a half-written conversion is never loaded.
    Returns the new tag; does nothing if it exists."""
    ckpt_dir = Path(ckpt_dir)
    out_tag = tag + UNIVERSAL_SUFFIX
    out = ckpt_dir / out_tag
    if out.is_dir():
        return out_tag
    tmp = ckpt_dir / f".tmp-{out_tag}"
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"converting {ckpt_dir / tag} to a universal checkpoint {out} (DeepSpeed ds_to_universal)")
    # DeepSpeed's converter with weights-only loading, from this checkout (as the launched scripts import it)
    cmd = [sys.executable, "-m", "trainer.train.to_universal", "--input_folder", str(ckpt_dir / tag),
           "--output_folder", str(tmp), "--inject_missing_state", "--num_extract_workers", "2"]
    repo = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        refused = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
        if refused:  # a checkpoint file refused by the weights-only guard: its one line
            raise SystemExit(refused[-1])
        raise SystemExit(f"error: converting {ckpt_dir / tag} to a universal checkpoint failed:\n"
                         f"{r.stdout[-3000:]}{r.stderr[-3000:]}")
    os.replace(tmp, out)
    # the converter points `latest_universal` at its output folder's (temporary) name: point it at the real one
    (ckpt_dir / "latest_universal").write_text(out_tag)
    return out_tag


def prune(ckpt_dir: str | Path, keep: int) -> list[str]:
    """Delete all but the newest `keep` periodic checkpoints (`stepNNNNNNNN`, with their `_universal` forms);
    never the one `latest` names, nor others (nonfinite-*, user tags). Returns the deleted tags."""
    ckpt_dir = Path(ckpt_dir)
    steps = sorted(p.name for p in ckpt_dir.glob("step[0-9]*") if p.is_dir() and p.name[4:].isdigit())
    current = latest_tag(ckpt_dir)
    gone = [t for t in steps[:-keep] if t != current] if keep > 0 else []
    for tag in gone:
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
        shutil.rmtree(ckpt_dir / (tag + UNIVERSAL_SUFFIX), ignore_errors=True)
    return gone


def stream_mismatch(client: dict, world: int, workers: int) -> str | None:
    """Why a checkpoint's data stream positions (its client state) cannot continue on `world` ranks with
    `workers` DataLoader workers each, or None. A position belongs to a slot (rank * W + worker, W = max(1,
    workers)) whose chunks depend on the slot count (trainer/data/stream.py): positions carry over to the same
    world size and W only, as no other slots replay the same samples. A checkpoint written before the worker
    count was stored shows another count only by a position of a worker this run lacks."""
    if len(client["positions"]) != world:
        return f"resumed on {world} ranks from a {len(client['positions'])}-rank checkpoint"
    if "data_workers" in client:
        saved = client["data_workers"]
        if max(1, saved) == max(1, workers):  # 0 workers read as one slot per rank, like 1
            return None
        return (f"data.workers is {workers} but the checkpoint's stream was read by {saved} workers per rank "
                f"(resume with --set data.workers={saved} to continue it exactly)")
    seen = max((int(w) for p in client["positions"] for w in p["chunks"]), default=0) + 1
    if seen <= max(1, workers):
        return None
    return (f"data.workers is {workers} but the checkpoint's stream was read by at least {seen} workers per rank "
            f"(resume with --set data.workers=N, its count then, to continue it exactly)")
