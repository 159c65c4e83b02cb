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
import secrets
import shutil
import socket
import subprocess
import sys
from pathlib import Path

__all__ = ["latest_tag", "begin_save", "sync_rank_files", "mark_complete", "is_complete", "checkpoint_world",
           "plan_resume", "convert_to_universal", "prune", "fsync_path", "divergence", "stream_mismatch", "UNIVERSAL_SUFFIX", "COMPLETE",
           "SAVING"]

UNIVERSAL_SUFFIX = "_universal"


COMPLETE = "maskdm_complete.json"  # written by rank 0 once every rank has saved its part of a checkpoint
SAVING = "maskdm_saving.json"      # written by rank 0 before any rank writes into a tag (a first save or a re-save)


def fsync_path(path: str | Path) -> None:
    """Flush a file's or a directory's (its entries') data to the disk: a marker on disk whose checkpoint data is
    not would survive a node or power loss as a whole checkpoint."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, text: str) -> None:
    """Write `path` under a temporary name, fsync it, rename it into place and fsync its folder."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def begin_save(tag_dir: str | Path) -> None:
    """Rank 0, before any rank writes into `tag_dir`: the tag stops counting as whole (a tag saved over keeps
    another save's files until each rank has replaced its own). The new marker is written before the old one
    goes, so a kill in between leaves the old, untouched checkpoint marked whole."""
    tag_dir = Path(tag_dir)
    tag_dir.mkdir(parents=True, exist_ok=True)
    _write_durably(tag_dir / SAVING, "{}")
    (tag_dir / COMPLETE).unlink(missing_ok=True)
    fsync_path(tag_dir)


def sync_rank_files(tag_dir: str | Path, rank: int) -> None:
    """fsync the files data-parallel rank `rank` wrote into a DeepSpeed checkpoint (by DeepSpeed's names: its
    optimizer partition `*zero_pp_rank_R_*`, and rank 0's `mp_rank_*_model_states.pt`), before the barrier after
    which rank 0 marks the checkpoint whole. Each rank syncs its own files: on a shared file system an fsync only
    flushes what this client wrote."""
    for p in Path(tag_dir).iterdir():
        if p.is_file() and (f"zero_pp_rank_{rank}_" in p.name or rank == 0 and p.name.startswith("mp_rank_")):
            fsync_path(p)


def mark_complete(tag_dir: str | Path, step: int, world: int) -> None:
    """Mark a checkpoint whole (rank 0, after every rank has saved and synced its part). DeepSpeed's rank 0 writes
    `latest` as soon as its own files are saved, before the other ranks' partitions are, so a job killed in between
    leaves `latest` naming a partial checkpoint. The folder's entries, the marker and `latest` are synced."""
    tag_dir = Path(tag_dir)
    fsync_path(tag_dir)
    _write_durably(tag_dir / COMPLETE, json.dumps({"step": step, "world": world}))
    (tag_dir / SAVING).unlink(missing_ok=True)
    fsync_path(tag_dir)
    latest = tag_dir.parent / "latest"
    if latest.is_file():
        fsync_path(latest)
    fsync_path(tag_dir.parent)


def is_complete(tag_dir: str | Path) -> bool:
    return (Path(tag_dir) / COMPLETE).is_file()


def latest_tag(ckpt_dir: str | Path) -> str | None:
    """The newest complete checkpoint: the tag `latest` names if it is complete, else the complete tag with the
    highest step (a kill during a save); None when no checkpoint is whole (a first save interrupted). Runs whose
    checkpoints carry no marker at all (written before the markers existed) fall back to `latest` as it stands."""
    ckpt_dir = Path(ckpt_dir)
    latest = ckpt_dir / "latest"
    named = (latest.read_text().strip() or None) if latest.is_file() else None  # empty: killed while written
    if named is not None and is_complete(ckpt_dir / named):
        return named
    tags = [p for p in ckpt_dir.iterdir() if p.is_dir() and not p.name.endswith(UNIVERSAL_SUFFIX)] \
        if ckpt_dir.is_dir() else []
    complete = sorted((json.loads((p / COMPLETE).read_text())["step"], p.name) for p in tags if is_complete(p))
    if complete:
        return complete[-1][1]
    if any((p / SAVING).is_file() for p in tags):
        return None
    return named


def divergence(ckpt_dir: str | Path) -> str | None:
    """When a non-finite loss stopped the run (its latest checkpoint is nonfinite-stepN): one line saying so, which
    checkpoint holds it and how to resume (from the newest whole periodic checkpoint before N, at a lower rate)."""
    ckpt_dir = Path(ckpt_dir)
    tag = latest_tag(ckpt_dir)
    if not (tag and tag.startswith("nonfinite-step")):
        return None
    step = int(tag.removeprefix("nonfinite-step"))
    good = sorted(t for t in (p.parent.name for p in ckpt_dir.glob(f"step[0-9]*/{COMPLETE}"))
                  if t[4:].isdigit() and int(t[4:]) < step)
    return (f"error: {ckpt_dir.parent} diverged: a non-finite loss stopped training at step {step} (checkpoint "
            f"{ckpt_dir / tag}, weights from before the step); a diverged run is not continued automatically. Resume "
            f"it by hand, e.g. at a lower optim.lr: deepspeed trainer/pretrain.py ... --run-dir {ckpt_dir.parent} "
            f"--resume {good[-1] if good else tag} --set optim.lr=...; the schedule continues from its next checkpoint")


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
    worker pools); written under a temporary name of this process's own and renamed, so a half-written conversion
    is never loaded and two conversions at once (two jobs, or a job and `python -m trainer.checkpoints`) never
    remove each other's work: the second to finish drops its copy. Returns the new tag; does nothing if it exists."""
    ckpt_dir = Path(ckpt_dir)
    out_tag = tag + UNIVERSAL_SUFFIX
    out = ckpt_dir / out_tag
    if out.is_dir():
        return out_tag
    _remove_stale_conversions(ckpt_dir, out_tag)
    tmp = ckpt_dir / f".tmp-{out_tag}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
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
    try:
        os.rename(tmp, out)
    except OSError:  # another conversion renamed its copy first (a folder is never renamed over a full one)
        if not out.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    # the converter points `latest_universal` at its output folder's (temporary) name: point it at the real one
    _write_durably(ckpt_dir / "latest_universal", out_tag)
    return out_tag


def _remove_stale_conversions(ckpt_dir: Path, out_tag: str) -> None:
    """Remove the temporary folders of conversions to `out_tag` killed on this host (their process is gone)."""
    prefix = f".tmp-{out_tag}-{socket.gethostname()}-"
    for p in ckpt_dir.glob(f"{prefix}*"):
        pid = p.name[len(prefix):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
