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


def launch(cfg, dsc, run_dir, *extra, wait=True, check=True):
    return launch_script("pretrain.py", cfg, dsc, run_dir, *extra, wait=wait, check=check)


def launch_script(script, cfg, dsc, run_dir, *extra, wait=True, check=True, num_gpus=2):
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_gpus),
           "--master_port", str(free_port()),
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
    if stage == 2:  # and TensorBoard
        cfg.write_text(cfg.read_text().replace("sample_steps: 3", "sample_steps: 3, tensorboard: true"))
    if stage == 1:  # and pruning
        cfg.write_text(cfg.read_text().replace("sample_steps: 3", "sample_steps: 3, keep_last: 1"))
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
    if stage == 1:
        assert sorted(p.name for p in (run / "checkpoints").glob("step*")) == ["step00000004"]
    if stage == 2:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0}).Reload()
        assert [e.step for e in events.Scalars("train/loss")] == [2, 4]
        assert [e.step for e in events.Images("samples")] == [2, 4]


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


def fp32_weights(run_dir, tag):
    """The consolidated fp32 weights of a ZeRO checkpoint (any stage, any world size)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    return get_fp32_state_dict_from_zero_checkpoint(str(Path(run_dir) / "checkpoints"), tag=tag)


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_on_another_world_size_through_a_universal_checkpoint(tmp_path, shards, stage):
    from trainer.models import build_model

    cfg, dsc = write_config(tmp_path, shards, steps=4, ckpt_every=2, stage=stage)
    run = tmp_path / "run"
    launch(cfg, dsc, run, "--until-step", 2)                       # 2 ranks
    # 1 rank, and another seed: weights that were not loaded would be a fresh init of that seed
    r = launch_script("pretrain.py", cfg, dsc, run, "--set", "train.seed=12345", num_gpus=1)
    assert "restarts with seed" in r.stdout and '"universal": true' in r.stdout
    assert (run / "checkpoints" / "step00000002_universal" / "zero").is_dir()
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert [x["step"] for x in records(run)] == [2, 4]
    w2, w4 = fp32_weights(run, "step00000002"), fp32_weights(run, "step00000004")
    torch.manual_seed(12345)
    fresh = build_model("tiny", 3, 16, 4, dim=32, heads=2).state_dict()
    assert max((w2[k] - fresh[k]).abs().max().item() for k in w2) > 0.05  # the seed does change the init
    # two AdamW steps at lr 1e-3 (betas 0.99, 0.99) move no weight by more than ~2e-3
    assert max((w4[k] - w2[k]).abs().max().item() for k in w2) < 5e-3
    client = final_state(run, "step00000004")
    assert client["step"] == 4 and len(client["positions"]) == 1 and client["data_seed"] != 12345


def _cpu_fp16_works() -> bool:
    try:
        a = torch.ones(4, 4, dtype=torch.float16)
        return bool(torch.isfinite(torch.nn.functional.layer_norm(a @ a, (4,))).all())
    except RuntimeError:
        return False


@pytest.mark.skipif(not _cpu_fp16_works(), reason="this CPU/torch build has no fp16 kernels")
def test_fp16_overflow_skips_the_step_and_the_ema(tmp_path, shards):
    cfg, dsc = write_config(tmp_path, shards, steps=4, ckpt_every=3, stage=1)
    ds = json.loads(dsc.read_text())
    ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 8, "hysteresis": 1, "min_loss_scale": 1}
    dsc.write_text(json.dumps(ds))
    cfg.write_text(cfg.read_text().replace("log_every: 2", "log_every: 1"))
    run = tmp_path / "run"
    os.environ["MASKDM_INJECT_NONFINITE"] = "3"  # the 4th step: an infinite loss on rank 0
    try:
        launch(cfg, dsc, run)
    finally:
        del os.environ["MASKDM_INJECT_NONFINITE"]
    recs = records(run)
    assert [x["skipped_steps"] for x in recs] == [0, 0, 0, 1]
    assert recs[3]["loss_scale"] == recs[2]["loss_scale"] / 2
    s3, s4 = final_state(run, "step00000003"), final_state(run, "step00000004")
    assert s4["step"] == 4
    for k in s3["ema"]["shadow"]:  # neither the weights nor the EMA moved in the skipped step
        assert torch.equal(s3["ema"]["shadow"][k], s4["ema"]["shadow"][k]), k
    for k in s3["module"]:
        assert torch.equal(s3["module"][k], s4["module"][k]), k
    moved = [k for k in s3["ema"]["shadow"] if not torch.equal(s3["ema"]["shadow"][k], s3["ema"]["shadow"][k] * 0)]
    assert moved  # (the EMA is not trivially zero)


def test_nonfinite_loss_without_loss_scaling_saves_and_stops(tmp_path, shards):
    cfg, dsc = write_config(tmp_path, shards, steps=4, ckpt_every=100, stage=2)
    os.environ["MASKDM_INJECT_NONFINITE"] = "2"
    try:
        r = launch(cfg, dsc, tmp_path / "run", check=False)
    finally:
        del os.environ["MASKDM_INJECT_NONFINITE"]
    assert r.returncode != 0 and "non-finite loss at step 2" in r.stdout + r.stderr
    client = final_state(tmp_path / "run", "nonfinite-step00000002")
    assert client["step"] == 2


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path, shards):
    cfg, dsc = write_config(tmp_path, shards, steps=100_000, ckpt_every=7, stage=2)
    run = tmp_path / "run"
    proc = launch(cfg, dsc, run, wait=False)
    latest = run / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while not latest.exists():
        assert proc.poll() is None, "the run ended before it could be stopped"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)  # every process of the job, as Slurm's time limit or scancel does
    proc.wait(timeout=60)
    deadline = time.monotonic() + 120
    while True:  # the ranks outlive the runner while they save
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "the ranks did not stop"
        time.sleep(0.1)
    release_shm(proc.args[proc.args.index("--master_port") + 1])
    stopped = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "stopped" in r]
    assert len(stopped) == 1
    step = stopped[0]["step"]
    assert latest.read_text().strip() == f"step{step:08d}" and final_state(run, f"step{step:08d}")["step"] == step
