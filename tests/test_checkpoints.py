"""Choosing the checkpoint to resume from (trainer/train/checkpoints.py), without launching DeepSpeed."""
import pytest

from helpers import fake_checkpoint
from trainer.train.checkpoints import checkpoint_world, latest_tag, mark_complete, plan_resume, prune, stream_mismatch


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
