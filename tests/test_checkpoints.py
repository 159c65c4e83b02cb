"""Choosing the checkpoint to resume from, saving one durably, converting one (trainer/train/checkpoints.py),
without launching DeepSpeed."""
from pathlib import Path

import pytest

from helpers import fake_checkpoint
from trainer.train.checkpoints import (COMPLETE, SAVING, begin_save, checkpoint_world, latest_tag, mark_complete,
                                       plan_resume, prune, stream_mismatch, sync_rank_files)


def test_plan_resume(tmp_path):
    ckpt = tmp_path / "checkpoints"
    assert plan_resume(ckpt, "auto", 2) == (None, False)           # a new run
    fake_checkpoint(ckpt, "step00000010", ranks=2)
    assert checkpoint_world(ckpt / "step00000010") == 2
    assert plan_resume(ckpt, "auto", 2) == ("step00000010", False)
    assert plan_resume(ckpt, "none", 2) == (None, False)
    assert plan_resume(ckpt, "auto", 4) == ("step00000010_universal", True)
    assert plan_resume(ckpt, "step00000010", 1) == ("step00000010_universal", True)
    with pytest.raises(SystemExit, match="--resume step00000099.*have \\['step00000010'\\]"):
        plan_resume(ckpt, "step00000099", 2)


def test_prune_keeps_the_newest_and_what_latest_names(tmp_path):
    ckpt = tmp_path / "checkpoints"
    for step in (10, 20, 30, 40):
        fake_checkpoint(ckpt, f"step{step:08d}", ranks=1)
    (ckpt / "step00000010_universal").mkdir()
    (ckpt / "nonfinite-step00000041").mkdir()
    (ckpt / "latest").write_text("step00000020")  # e.g. resumed from an older tag
    assert prune(ckpt, 2) == ["step00000010"]
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == [
        "nonfinite-step00000041", "step00000020", "step00000030", "step00000040"]
    assert prune(ckpt, 0) == []


def test_latest_complete_checkpoint_wins_over_a_partial_one(tmp_path):
    """A job killed while the ranks save: DeepSpeed's `latest` already names the new tag, whose other partitions
    are missing; resuming takes the newest checkpoint every rank finished."""
    ckpt = tmp_path / "checkpoints"
    fake_checkpoint(ckpt, "step00000004", ranks=2)
    mark_complete(ckpt / "step00000004", 4, 2)
    fake_checkpoint(ckpt, "step00000008", ranks=1)  # rank 1's partition never written; no marker
    assert (ckpt / "latest").read_text() == "step00000008"
    assert latest_tag(ckpt) == "step00000004"
    assert plan_resume(ckpt, "auto", 2) == ("step00000004", False)  # not a world-size change
    mark_complete(ckpt / "step00000008", 8, 2)
    assert latest_tag(ckpt) == "step00000008" and checkpoint_world(ckpt / "step00000008") == 2


def test_stream_positions_continue_on_the_same_slots_only():
    def client(ranks, workers, stored=True):
        positions = [{"chunks": {str(w): [3, 5] for w in range(max(1, workers))}, "batches": 9}] * ranks
        return {"positions": positions, **({"data_workers": workers} if stored else {})}

    assert stream_mismatch(client(2, 4), 2, 4) is None
    assert stream_mismatch(client(2, 0), 2, 1) is None and stream_mismatch(client(2, 1), 2, 0) is None  # one slot
    assert stream_mismatch(client(2, 4), 1, 4) == "resumed on 1 ranks from a 2-rank checkpoint"
    assert stream_mismatch(client(2, 4), 2, 2) == (
        "data.workers is 2 but the checkpoint's stream was read by 4 workers per rank "
        "(resume with --set data.workers=4 to continue it exactly)")
    assert "read by 0 workers" in stream_mismatch(client(2, 0), 2, 3)
    # written before the count was stored: resumes as before unless a position names a worker this run lacks
    assert stream_mismatch(client(2, 4, stored=False), 2, 4) is None
    assert stream_mismatch(client(2, 4, stored=False), 2, 8) is None  # not visible: continues as before
    assert "read by at least 4 workers" in stream_mismatch(client(2, 4, stored=False), 2, 2)
    assert stream_mismatch({"positions": [{"chunks": {}, "batches": 0}]}, 1, 0) is None

def test_a_tag_saved_over_is_not_whole_until_every_rank_has_saved_it_again(tmp_path):
    """`--resume none` or `--resume OLDER_TAG` in a run directory, or a repeated nonfinite-stepN, saves over an
    existing tag: from the start of that save until its end the tag is not whole (a kill between leaves a mix of
    two saves); a kill before any rank wrote leaves the old checkpoint whole."""
    ckpt = tmp_path / "checkpoints"
    for step in (2, 4):
        fake_checkpoint(ckpt, f"step{step:08d}", ranks=2)
        mark_complete(ckpt / f"step{step:08d}", step, 2)
    begin_save(ckpt / "step00000004")
    assert latest_tag(ckpt) == "step00000002"
    mark_complete(ckpt / "step00000004", 4, 2)
    assert latest_tag(ckpt) == "step00000004" and not (ckpt / "step00000004" / SAVING).exists()
    (ckpt / "step00000004" / SAVING).write_text("{}")  # killed after the new marker, before the old one went
    assert latest_tag(ckpt) == "step00000004"


def test_a_first_save_interrupted_leaves_no_checkpoint_to_resume(tmp_path):
    ckpt = tmp_path / "checkpoints"
    fake_checkpoint(ckpt, "step00000002", ranks=1)   # rank 1's partition never written
    (ckpt / "latest").write_text("")                 # killed while DeepSpeed rewrote `latest`
    assert latest_tag(ckpt) is None and plan_resume(ckpt, "auto", 2) == (None, False)
    (ckpt / "latest").write_text("step00000002")
    begin_save(ckpt / "step00000002")                # the loop marks a tag in progress before any rank writes
    assert latest_tag(ckpt) is None
    (ckpt / "step00000002" / SAVING).unlink()        # a run from before the markers: `latest` as it stands
    assert latest_tag(ckpt) == "step00000002"


def test_the_checkpoint_path_is_fsynced(tmp_path, monkeypatch):
    """Each rank's files, then the marker, its folder and `latest`; published.json too."""
    import os

    from trainer.train.rundir import RunDir

    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    ckpt = tmp_path / "checkpoints"
    tag = ckpt / "step00000004"
    fake_checkpoint(ckpt, "step00000004", ranks=2)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"")
    sync_rank_files(tag, 1)
    assert synced == [str(tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt")]
    synced.clear()
    sync_rank_files(tag, 0)
    assert sorted(synced) == [str(tag / "mp_rank_00_model_states.pt"),
                              str(tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")]
    synced.clear()
    mark_complete(tag, 4, 2)
    assert {str(tag), str(tag / f".{COMPLETE}.tmp"), str(ckpt / "latest"), str(ckpt)} <= set(synced)
    assert synced.index(str(tag / f".{COMPLETE}.tmp")) < synced.index(str(ckpt / "latest"))
    synced.clear()
    run = RunDir(tmp_path)
    run.record_published(4, {"url": "s3://b/m/step00000004"})
    assert synced == [str(run.published_file.with_suffix(".json.tmp")), str(tmp_path)]


def test_two_universal_conversions_at_once_keep_each_others_work(tmp_path, monkeypatch):
    """A job and `python -m trainer.checkpoints` (or two jobs) converting the same tag: the second to start must
    not delete the first one's temporary folder, and the second to finish keeps the first one's result."""
    import subprocess

    from trainer.train import checkpoints

    ckpt = tmp_path / "checkpoints"
    fake_checkpoint(ckpt, "step00000004", ranks=2)
    calls = []

    def converter(cmd, **kw):  # stands in for ds_to_universal: writes its output folder in two parts
        out = Path(cmd[cmd.index("--output_folder") + 1])
        calls.append(out)
        (out / "zero").mkdir(parents=True)
        if len(calls) == 1:  # the other conversion starts and ends while this one runs
            assert checkpoints.convert_to_universal(ckpt, "step00000004", log=lambda *a: None)
        if not out.is_dir():
            return subprocess.CompletedProcess(cmd, 1, "", f"FileNotFoundError: {out}")
        (out / "done").write_text("")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(checkpoints.subprocess, "run", converter)
    assert checkpoints.convert_to_universal(ckpt, "step00000004", log=lambda *a: None) == "step00000004_universal"
    assert calls[0] != calls[1] and (ckpt / "step00000004_universal" / "done").is_file()
    assert not list(ckpt.glob(".tmp-*")) and (ckpt / "latest_universal").read_text() == "step00000004_universal"


def test_one_training_at_a_time_per_run_directory(tmp_path):
    """rank 0 holds RUN_DIR/run.lock for the run's life; a second training is refused with one line naming the
    holder; the lock goes with the holder (closed here; the kernel drops it when a process ends however it ends)."""
    import os
    import socket

    from trainer.train.rundir import RunDir, lock_run, run_locked

    run = RunDir(tmp_path / "run")
    assert run_locked(run) is None
    held, refusal = lock_run(run)
    assert held is not None and refusal is None
    again, refusal = lock_run(run)  # another open file: refused as another process would be
    assert again is None and refusal.startswith(f"error: run directory {run.root} is in use by another training")
    assert f"host {socket.gethostname()}, pid {os.getpid()}, started " in refusal and "\n" not in refusal
    assert run_locked(run).startswith(f"host {socket.gethostname()}")
    held.close()
    assert run_locked(run) is None
    held, refusal = lock_run(run)
    assert held is not None and refusal is None
    held.close()
