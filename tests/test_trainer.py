"""The trainer with the real DeepSpeed launcher on CPU (DS_ACCELERATOR=cpu, gloo, 2 ranks): ZeRO 1/2/3 train,
checkpoint and resume; a SIGKILLed run resumed equals an uninterrupted one."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import free_port, release_shm, run_launcher
from pipeline.shard import main as shard_main
from pipeline_data import identity_tree

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    identity_tree(root / "src", identities=4, per_identity=8, size=48)
    shard_main(["folder", "--src", str(root / "src"), "--out", str(root / "shards"), "--size", "16", "--no-dwt",
                "--shard-size", "4"])
    return root / "shards"


def write_config(tmp_path, shards, steps, ckpt_every, stage):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"""name: test
model: {{preset: tiny, input: pixel, image_size: 16, patch_size: 4, overrides: {{dim: 32, heads: 2}}}}
mask: {{kind: block, rate: 0.5, block: 2}}
data: {{sources: [{shards}], order: resampled, workers: 0, buffer: 8}}
optim: {{lr: 1.0e-3}}
train: {{steps: {steps}, global_batch: 8, micro_batch: 2, log_every: 2, ckpt_every: {ckpt_every},
        sample_every: 1000, sample_n: 4, sample_steps: 3}}
""")
    ds = json.loads((REPO / "ds_configs" / "cpu_fp32.json").read_text())
    ds["zero_optimization"]["stage"] = stage
    dsc = tmp_path / f"ds{stage}.json"
    dsc.write_text(json.dumps(ds))
    return cfg, dsc


def launch(cfg, dsc, run_dir, *extra, wait=True):
    return launch_script("pretrain.py", cfg, dsc, run_dir, *extra, wait=wait)


def launch_script(script, cfg, dsc, run_dir, *extra, wait=True, check=True):
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           str(REPO / "trainer" / script), "--config", str(cfg), "--deepspeed_config", str(dsc),
           "--run-dir", str(run_dir), *map(str, extra)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    r = run_launcher(cmd, env, timeout=600)
    assert r.returncode == 0 or not check, r.stdout[-4000:] + r.stderr[-4000:]
    return r


def records(run_dir):
    """The training records of metrics.jsonl (not the sample-grid entries)."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def final_state(run_dir, tag):
    """Rank 0's model-states file (ZeRO-3 names it per rank): module weights (not under ZeRO-3) + client state."""
    folder = Path(run_dir) / "checkpoints" / tag
    names = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
    path = next(folder / n for n in names if (folder / n).exists())
    return torch.load(path, weights_only=False)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_train_checkpoint_and_resume(tmp_path, shards, stage):
    cfg, dsc = write_config(tmp_path, shards, steps=4, ckpt_every=2, stage=stage)
    run = tmp_path / "run"
    launch(cfg, dsc, run, "--until-step", 2)
    assert (run / "checkpoints" / "latest").read_text().strip() == "step00000002"
    r = launch(cfg, dsc, run)  # --resume auto
    assert '"resumed"' in r.stdout
    recs = records(run)
    assert [x["step"] for x in recs] == [2, 4] and all(x["loss"] == x["loss"] for x in recs)  # finite
    assert recs[-1]["images"] == 4 * 8
    client = final_state(run, "step00000004")
    assert client["step"] == 4 and len(client["positions"]) == 2 and set(client["ema"]["shadow"])
    assert (run / "config.yaml").exists()
    grids = sorted(p.name for p in (run / "samples").glob("*.png"))
    assert grids == ["step00000002.png", "step00000004.png"]  # at the end of each invocation


def test_sigkill_and_resume_equals_uninterrupted(tmp_path, shards):
    cfg, dsc = write_config(tmp_path, shards, steps=60, ckpt_every=4, stage=1)
    launch(cfg, dsc, tmp_path / "ref")
    run = tmp_path / "killed"
    proc = launch(cfg, dsc, run, wait=False)
    latest = run / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while not (latest.exists() and latest.read_text().strip() >= "step00000008"):
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks, mid-run
    proc.wait()
    release_shm(proc.args[proc.args.index("--master_port") + 1])
    assert latest.read_text().strip() != "step00000060"
    launch(cfg, dsc, run)
    a, b = final_state(tmp_path / "ref", "step00000060"), final_state(run, "step00000060")
    # CPU fp32, same ops in the same order: the resumed run is bit-identical (tolerance for safety only)
    for k in a["module"]:
        assert torch.allclose(a["module"][k], b["module"][k], atol=1e-6), k
    for k in a["ema"]["shadow"]:
        assert torch.allclose(a["ema"]["shadow"][k], b["ema"]["shadow"][k], atol=1e-6), k


def test_finetune_from_a_pretrained_run(tmp_path, shards):
    cfg, dsc = write_config(tmp_path, shards, steps=2, ckpt_every=2, stage=2)
    launch(cfg, dsc, tmp_path / "pre")
    ft_cfg = tmp_path / "ft.yaml"
    ft_cfg.write_text(cfg.read_text().replace("rate: 0.5", "rate: 0.0"))
    r = launch_script("finetune.py", ft_cfg, dsc, tmp_path / "ft", "--init", tmp_path / "pre")
    init = next(json.loads(line) for line in r.stdout.splitlines() if line.startswith('{"init"'))
    assert init["missing_keys"] == [] and init["unexpected_keys"] == []
    assert [x["step"] for x in records(tmp_path / "ft")] == [2]
    bad = tmp_path / "bad.yaml"
    bad.write_text(ft_cfg.read_text().replace("dim: 32", "dim: 48"))
    r = launch_script("finetune.py", bad, dsc, tmp_path / "ft2", "--init", tmp_path / "pre", check=False)
    assert r.returncode != 0 and "do not fit the model" in r.stdout + r.stderr and "pos_embed" in r.stdout + r.stderr
