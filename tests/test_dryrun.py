"""pretrain.py --dry-run: the plan without DeepSpeed (batch arithmetic, shards per rank/worker, resume)."""
import re
from pathlib import Path

import pytest

from helpers import fake_checkpoint, identity_tree
from pipeline.shard import main as shard_main
from trainer.pretrain import main as pretrain_main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("dry")
    identity_tree(root / "src", identities=4, per_identity=5, size=40)
    shard_main(["folder", "--src", str(root / "src"), "--out", str(root / "shards"), "--size", "16", "--no-dwt",
                "--shard-size", "2"])  # 10 shards of 2
    return root / "shards"


def dry(capsys, shards, run_dir, *extra) -> str:
    pretrain_main(["--config", str(REPO / "configs/quickstart.yaml"),
                   "--deepspeed_config", str(REPO / "ds_configs/zero2_fp16.json"),
                   "--run-dir", str(run_dir), "--dry-run", "--set", f"data.sources=[{shards}]",
                   "--set", "train.global_batch=16", "--set", "train.micro_batch=2", *extra])
    return capsys.readouterr().out


def test_exact_epoch_plan_covers_every_shard_once(capsys, shards, tmp_path):
    out = dry(capsys, shards, tmp_path / "run", "--world-size", "2", "--set", "data.order=exact",
              "--set", "data.workers=2")
    assert "world size 2 x micro batch 2 x gradient accumulation 4 = global batch 16" in out
    assert "ZeRO stage 2, fp16 (dynamic loss scaling)" in out
    assert "10 shards, 20 samples" in out and "one epoch = 20 samples = 1.2 steps" in out
    rows = re.findall(r"rank (\d) worker (\d): (.*?); (\d+) samples", out)
    assert len(rows) == 4
    names = [n for row in rows for n in row[2].split(", ")]
    assert sorted(names) == [f"shard-{i:06d}.tar" for i in range(10)]  # each shard exactly once
    assert sum(int(r[3]) for r in rows) == 20
    assert "starts from scratch" in out


def test_resume_plan_and_bad_batch(capsys, shards, tmp_path):
    fake_checkpoint(tmp_path / "run" / "checkpoints", "step00000100", ranks=2)
    out = dry(capsys, shards, tmp_path / "run", "--world-size", "4")
    assert "written by 2 ranks" in out and "universal" in out
    out = dry(capsys, shards, tmp_path / "run", "--world-size", "2")
    assert "continues its data stream exactly" in out
    with pytest.raises(SystemExit, match="not a multiple"):
        dry(capsys, shards, tmp_path / "run", "--world-size", "3")


def test_readers_of_the_same_shards_make_one_line_and_a_warning(capsys, shards, tmp_path):
    """64 readers (16 ranks x 4 workers) of one tar: one summary line, and a word on what sharing means."""
    out = dry(capsys, f"{shards}/shard-000000.tar", tmp_path / "run", "--world-size", "16",
              "--set", "data.workers=4", "--set", "train.micro_batch=1")
    assert "slots 0-63 (rank 0 worker 0 to rank 15 worker 3, 64 readers): shard-000000.tar" in out
    assert not re.search(r"^rank \d+ worker \d+:", out, re.M)  # no per-slot line repeats it
    assert "fewer shards (1) than ranks x workers (64): the readers share shards" in out
    assert "same images reach several ranks" in out
    out = dry(capsys, shards, tmp_path / "run", "--world-size", "2", "--set", "data.workers=2")  # 10 shards, 4 slots
    assert "share shards" not in out and len(re.findall(r"^rank \d worker \d: ", out, re.M)) == 4


def test_pixel_model_on_shards_of_another_size_is_reported(capsys, shards, tmp_path):
    out = dry(capsys, shards, tmp_path / "run", "--set", "model.image_size=8")  # the set holds 16 px crops
    assert f"{shards}: 16 px crops, resized to the 8 px pixel-mode model on every sample" in out
    assert "resized" not in dry(capsys, shards, tmp_path / "run", "--set", "model.image_size=16")


@pytest.mark.parametrize("case, needles", [
    ("missing", ["no such folder"]),
    ("images", ["is a folder of images, not a shard set", "python -m pipeline.shard folder --src"]),
    ("interrupted", ["holds 10 .tar files but no manifest.json: an interrupted `python -m pipeline.shard` job",
                     "Re-run the same command"]),
])
def test_a_source_that_is_not_a_shard_set_says_what_it_is(capsys, shards, tmp_path, case, needles):
    import shutil

    source = tmp_path / case
    if case == "images":
        identity_tree(source, identities=2, per_identity=1, size=20)  # ID/IMAGE.jpg: images one level down
    elif case == "interrupted":
        shutil.copytree(shards, source)
        (source / "manifest.json").unlink()
    with pytest.raises(SystemExit) as e:
        dry(capsys, source, tmp_path / "run")
    assert f"{source}/manifest.json not found" in str(e.value) and all(n in str(e.value) for n in needles), e.value


def test_compute_estimate_reproduces_the_reference_baseline_rate():
    """The reference's DDPM baseline (L, split DWT tokens, 940k steps at batch 16) took 120 h on 8 V100s; the dry
    run's default rate is derived from it, so the estimate must give back those 40 GPU-days."""
    from trainer.train.config import ExperimentConfig
    from trainer.train.dryrun import compute

    cfg = ExperimentConfig.from_dict({"model": {"preset": "L", "input": "dwt", "image_size": 256, "dwt_tokens": "split"},
                                      "mask": {"rate": 0.0}, "train": {"steps": 940_000, "global_batch": 16}})
    c = compute(cfg)
    assert c["params"] == 233_399_488 and c["tokens"] == c["seen"] == 2048
    assert abs(c["forward_gflop"] - 1238.5) < 0.1 and abs(c["gpu_days"] - 120 * 8 / 24) < 0.5
    masked = compute(cfg.replace(mask=cfg.mask.__class__(kind="patch", rate=0.7)))
    assert masked["seen"] == 2 * 308 and masked["forward_gflop"] < c["forward_gflop"] / 3
