"""pretrain.py --dry-run: the plan without DeepSpeed (batch arithmetic, shards per rank/worker, resume)."""
import re
from pathlib import Path

import pytest

from pipeline.shard import main as shard_main
from pipeline_data import identity_tree
from test_checkpoints import fake_checkpoint
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
