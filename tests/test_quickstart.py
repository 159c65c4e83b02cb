"""CPU smoke of the quickstart (the main job), the synthetic image set and the image helpers."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.synthetic import synthetic_faces
from trainer import quickstart
from trainer.core.dwt import dwt2, normalize_bands
from trainer.core.images import save_grid, to_rgb_uint8


def test_synthetic_faces_are_deterministic():
    a, b, c = synthetic_faces(4, 32, seed=1), synthetic_faces(4, 32, seed=1), synthetic_faces(4, 32, seed=2)
    assert a.shape == (4, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.std() > 20  # not blank


def test_to_rgb_inverts_both_input_modes(tmp_path):
    faces = synthetic_faces(3, 16)
    px = torch.from_numpy(faces).permute(0, 3, 1, 2).float() / 255
    assert np.array_equal(to_rgb_uint8(px * 2 - 1, "pixel").numpy(), faces)
    assert np.array_equal(to_rgb_uint8(normalize_bands(dwt2(px)), "dwt").numpy(), faces)
    path = save_grid(faces, tmp_path / "g.png", nrow=2)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 * 18 + 2, 2 * 18 + 2, 3)
    assert np.array_equal(grid[2:18, 20:36], faces[1])


@pytest.mark.slow
def test_quickstart_runs_end_to_end(tmp_path):
    """The README's main job with tiny step counts: shard, 2-rank DeepSpeed pre-training and fine-tuning, a grid of
    samples (as many as data.png shows: quickstart.GRID) beside one of training crops."""
    quickstart.main(["--out", str(tmp_path), "--images", str(quickstart.GRID), "--pretrain-steps", "2",
                     "--finetune-steps", "2", "--sample-steps", "2"])
    assert Image.open(tmp_path / "samples.png").size == Image.open(tmp_path / "data.png").size
    assert json.loads((tmp_path / "shards" / "manifest.json").read_text())["totals"]["samples"] == quickstart.GRID
    for stage in ("pretrain", "finetune"):
        records = [json.loads(line) for line in open(tmp_path / stage / "metrics.jsonl")]
        train = [r for r in records if "loss" in r]  # (sample-grid entries carry no loss)
        assert [r["step"] for r in train][-1:] == [2], records
        assert all(math.isfinite(r["loss"]) for r in train), train
    assert (tmp_path / "pretrain" / "checkpoints" / "latest").exists()
