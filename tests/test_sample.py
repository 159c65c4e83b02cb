"""trainer.sample: per-image seeds (same images on 1 or 2 ranks, any batch size), resumable output, DWT models."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import REPO, fake_run, free_port, launcher_env, run_launcher
from trainer.sample import main as sample_main


def pixels(folder: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for p in sorted((folder / "images").glob("*.png"))]


@pytest.mark.slow
def test_same_images_on_one_or_two_ranks_and_any_batch(tmp_path):
    run = fake_run(tmp_path / "run")
    common = ["--ckpt", str(run), "--steps", "4", "--eta", "1.0", "--seed", "7"]
    sample_main([*common, "--n", "5", "--batch", "2", "--out", str(tmp_path / "one")])
    one = pixels(tmp_path / "one")
    assert len(one) == 5 and one[0].shape == (16, 16, 3) and (tmp_path / "one" / "grid.png").exists()
    assert json.loads((tmp_path / "one" / "sample.json").read_text())["model_step"] == 3
    assert any(not np.array_equal(one[0], x) for x in one[1:])  # different seeds, different images
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           str(REPO / "trainer" / "sample.py"), *common, "--num-images", "5", "--batch", "3",
           "--out", str(tmp_path / "two")]
    r = run_launcher(cmd, launcher_env(), timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    two = pixels(tmp_path / "two")
    assert len(two) == 5 and all(np.array_equal(a, b) for a, b in zip(one, two))


def test_resumes_missing_images_and_refuses_other_settings(tmp_path):
    run = fake_run(tmp_path / "run")
    out = tmp_path / "out"
    args = ["--ckpt", str(run), "--n", "4", "--steps", "3", "--out", str(out)]
    sample_main(args)
    before = pixels(out)
    (out / "images" / "000001.png").unlink()
    (out / "images" / "000003.png").unlink()
    sample_main(args)  # draws the two missing ones, with their own seeds
    assert all(np.array_equal(a, b) for a, b in zip(before, pixels(out)))
    with pytest.raises(SystemExit, match="other settings"):
        sample_main([*args[:-2], "--seed", "1", "--out", str(out)])
    record = json.loads((out / "sample.json").read_text())
    assert (record["eta"], record["clip_mode"]) == (1.0, "rederive")  # the defaults, recorded
    with pytest.raises(SystemExit, match="other settings"):
        sample_main([*args, "--clip-mode", "reference"])
    ref = tmp_path / "ref"
    sample_main([*args[:-1], str(ref), "--clip-mode", "reference", "--eta", "0"])
    assert (json.loads((ref / "sample.json").read_text())["clip_mode"], json.loads((ref / "sample.json").read_text())
            ["eta"]) == ("reference", 0.0)
    (out / "sample.json").write_text(json.dumps({k: v for k, v in record.items() if k != "clip_mode"}))
    sample_main(args)  # a folder from before --clip-mode existed was drawn in rederive mode: still accepted


def test_dwt_model_gives_rgb_at_twice_the_model_side(tmp_path):
    run = fake_run(tmp_path / "run", input_mode="dwt")
    sample_main(["--ckpt", str(run), "--n", "2", "--steps", "2", "--out", str(tmp_path / "out")])
    assert [x.shape for x in pixels(tmp_path / "out")] == [(16, 16, 3)] * 2  # 12 x 8 x 8 bands -> 16 x 16 RGB
