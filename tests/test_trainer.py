"""The trainer with the real DeepSpeed launcher on CPU (DS_ACCELERATOR=cpu, gloo, 2 ranks): ZeRO 1/2/3 train,
checkpoint and resume; a SIGKILLed run resumed equals an uninterrupted one; signals to any process of the job, a
launcher killed or a rank failing end the whole job (saving where it can), and no checkpoint is taken for whole
that is not."""
import json
import math
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from helpers import (REPO, final_state, job_processes, kill_job, launch, launch_script, records, release_shm, wait_for,
                     write_config)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_train_checkpoint_and_resume(zero_run, stage):
    z = zero_run(stage)  # `--until-step 2`, then a resume to step 4 (conftest.zero_run)
    assert (z.at_step_2 / "checkpoints" / "latest").read_text().strip() == "step00000002"
    assert '"resumed"' not in z.first.stdout and '"resumed"' in z.second.stdout
    run = z.run
    recs = records(run)
    assert [x["step"] for x in recs] == [2, 4] and all(math.isfinite(x["loss"]) for x in recs)
    assert recs[-1]["images"] == 4 * 8
    client = final_state(run, "step00000004")
    assert client["step"] == 4 and len(client["positions"]) == 2 and set(client["ema"]["shadow"])
    assert (run / "config.yaml").exists()
    grids = sorted(p.name for p in (run / "samples").glob("*.png"))
    assert grids == ["step00000002.png", "step00000004.png"]  # at the end of each invocation
    if stage == 1:  # keep_last: 1
        assert sorted(p.name for p in (run / "checkpoints").glob("step*")) == ["step00000004"]
    if stage == 2:  # tensorboard: true
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0}).Reload()
        assert [e.step for e in events.Scalars("train/loss")] == [2, 4]
        assert [e.step for e in events.Images("samples")] == [2, 4]


# Checkpoints every 4 steps and a SIGKILL once `latest` names step 8 (its checkpoint may still be partial: then the
# resume takes step 4's). The 52 steps left (~2 s of training) keep the kill mid-run on a busy machine.
KILL_STEPS = 60


def test_sigkill_and_resume_equals_uninterrupted(tmp_path, train_shards):
    cfg, dsc = write_config(tmp_path, train_shards, steps=KILL_STEPS, ckpt_every=4, stage=1)
    # the reference's EMA cadence (averaging every 3rd step, copying up to step 5) must resume exactly too
    cfg.write_text(cfg.read_text().replace("train: {", "train: {ema_every: 3, ema_update_after: 5, "))
    launch(cfg, dsc, tmp_path / "ref")
    run = tmp_path / "killed"
    proc = launch(cfg, dsc, run, wait=False)
    latest = run / "checkpoints" / "latest"
    wait_for(lambda: latest.exists() and latest.read_text().strip() >= "step00000008", 300,
             "the checkpoint of step 8", alive=lambda: proc.poll() is None)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks, mid-run
    proc.wait()
    release_shm(proc.args[proc.args.index("--master_port") + 1])
    final = f"step{KILL_STEPS:08d}"
    assert latest.read_text().strip() != final
    launch(cfg, dsc, run)
    a, b = final_state(tmp_path / "ref", final), final_state(run, final)
    # CPU fp32, same ops in the same order: the resumed run is bit-identical (tolerance for safety only)
    for k in a["module"]:
        assert torch.allclose(a["module"][k], b["module"][k], atol=1e-6), k
    for k in a["ema"]["shadow"]:
        assert torch.allclose(a["ema"]["shadow"][k], b["ema"]["shadow"][k], atol=1e-6), k


def test_finetune_from_a_pretrained_run(tmp_path, zero_run):
    pre = zero_run(2)  # a 4-step ZeRO-2 pre-training run (mask rate 0.5)
    ft_cfg = tmp_path / "ft.yaml"
    ft_cfg.write_text(pre.cfg.read_text().replace("rate: 0.5", "rate: 0.0").replace("steps: 4", "steps: 2"))
    r = launch_script("finetune.py", ft_cfg, pre.dsc, tmp_path / "ft", "--init", pre.run)
    init = next(json.loads(line) for line in r.stdout.splitlines() if line.startswith('{"init"'))
    assert init["missing_keys"] == [] and init["unexpected_keys"] == []
    assert init["init_weights"] == "online"  # a training run: the online weights, as the reference fine-tunes
    assert [x["step"] for x in records(tmp_path / "ft")] == [2]
    bad = tmp_path / "bad.yaml"
    bad.write_text(ft_cfg.read_text().replace("dim: 32", "dim: 48"))
    # (one rank is enough: the weights are refused before the engine is built; one process less to start)
    r = launch_script("finetune.py", bad, pre.dsc, tmp_path / "ft2", "--init", pre.run, check=False, num_gpus=1)
    assert r.returncode != 0 and "do not fit the model" in r.stdout + r.stderr and "pos_embed" in r.stdout + r.stderr


def test_init_weights_online_are_the_optimised_weights_and_ema_the_average(zero_run):
    from trainer.weights.load import is_training_run, load_pretrained

    pre = zero_run(2)
    tag = (pre.run / "checkpoints" / "latest").read_text().strip()
    online, ema = load_pretrained(pre.run, "online"), load_pretrained(pre.run, "ema")
    master = fp32_weights(pre.run, tag)
    assert online.keys() == ema.keys() == master.keys()
    assert all(torch.equal(online[k], master[k].float()) for k in online)
    shadow = final_state(pre.run, tag)["ema"]["shadow"]
    assert all(torch.equal(ema[k], shadow[k]) for k in ema)
    assert any(not torch.allclose(online[k], ema[k]) for k in online)  # 4 steps: the EMA lags the weights
    assert is_training_run(pre.run) and not is_training_run(pre.run / "config.yaml")


def test_decay_groups():
    from trainer.core.models import build_model
    from trainer.train.loop import param_groups

    model = build_model("tiny", 3, 16, qv_bias=True)
    names = {id(p): n for n, p in model.named_parameters()}
    matrices, rest = param_groups(model, 0.03, "matrices")
    assert matrices["weight_decay"] == 0.03 and rest["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in matrices["params"])
    skipped = {names[id(p)] for p in rest["params"]}
    assert "pos_embed" in skipped and "head.bias" in skipped and "in_blocks.0.attn.q_bias" in skipped
    assert "in_blocks.0.norm1.weight" in skipped and "patch_embed.weight" not in skipped
    (every,) = param_groups(model, 0.03, "all")  # the reference: AdamW over model.parameters()
    assert every["weight_decay"] == 0.03 and len(every["params"]) == len(list(model.parameters()))
    assert len(matrices["params"]) + len(rest["params"]) == len(every["params"])
    with pytest.raises(ValueError, match="optim.decay"):
        param_groups(model, 0.03, "biases")


def fp32_weights(run_dir, tag):
    """The consolidated fp32 weights of a ZeRO checkpoint (any stage, any world size)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    return get_fp32_state_dict_from_zero_checkpoint(str(Path(run_dir) / "checkpoints"), tag=tag)


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_on_another_world_size_through_a_universal_checkpoint(tmp_path, zero_run, stage):
    from trainer.core.models import build_model

    z = zero_run(stage)
    run = tmp_path / "run"
    shutil.copytree(z.at_step_2, run)                              # 2 ranks trained it to step 2
    # 1 rank, and another seed: weights that were not loaded would be a fresh init of that seed
    r = launch_script("pretrain.py", z.cfg, z.dsc, run, "--set", "train.seed=12345", num_gpus=1)
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


def test_resume_with_other_data_workers_restarts_the_stream_and_says_how_to_keep_it(tmp_path, zero_run):
    z = zero_run(1)
    run = tmp_path / "run"
    shutil.copytree(z.at_step_2, run)  # 2 ranks, data.workers 0, to step 2
    before = final_state(run, "step00000002")
    r = launch(z.cfg, z.dsc, run, "--set", "data.workers=2")
    assert ("data.workers is 2 but the checkpoint's stream was read by 0 workers per rank (resume with "
            "--set data.workers=0 to continue it exactly): the data stream restarts with seed") in r.stdout
    assert [x["step"] for x in records(run)] == [2, 4]
    after = final_state(run, "step00000004")
    assert after["data_seed"] != before["data_seed"]
    assert before["data_workers"] == 0 and after["data_workers"] == 2
    assert all(set(p["chunks"]) <= {"0", "1"} for p in after["positions"])


def test_fp16_overflow_skips_the_step_and_the_ema(tmp_path, train_shards, cpu_fp16, monkeypatch):
    cfg, dsc = write_config(tmp_path, train_shards, steps=4, ckpt_every=3, stage=1)
    ds = json.loads(dsc.read_text())
    ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 8, "hysteresis": 1, "min_loss_scale": 1}
    dsc.write_text(json.dumps(ds))
    cfg.write_text(cfg.read_text().replace("log_every: 2", "log_every: 1"))
    run = tmp_path / "run"
    monkeypatch.setenv("MASKDM_INJECT_NONFINITE", "3")  # the 4th step: an infinite loss on rank 0 (the launch
    launch(cfg, dsc, run)                                 # environment is built from os.environ)
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


def test_nonfinite_loss_without_loss_scaling_saves_and_stops(tmp_path, train_shards, monkeypatch):
    cfg, dsc = write_config(tmp_path, train_shards, steps=4, ckpt_every=100, stage=2)
    monkeypatch.setenv("MASKDM_INJECT_NONFINITE", "2")  # seen by the launched ranks (environment from os.environ)
    r = launch(cfg, dsc, tmp_path / "run", check=False)
    assert r.returncode != 0 and "non-finite loss at step 2" in r.stdout + r.stderr
    client = final_state(tmp_path / "run", "nonfinite-step00000002")
    assert client["step"] == 2


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path, train_shards):
    cfg, dsc = write_config(tmp_path, train_shards, steps=100_000, ckpt_every=7, stage=2)
    run = tmp_path / "run"
    proc = launch(cfg, dsc, run, wait=False)
    latest = run / "checkpoints" / "latest"
    wait_for(latest.exists, 300, "the first checkpoint", alive=lambda: proc.poll() is None)
    os.killpg(proc.pid, signal.SIGTERM)  # every process of the job, as Slurm's time limit or scancel does

    def ranks_gone():  # the ranks outlive the runner while they save
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return True
        return False

    proc.wait(timeout=60)
    wait_for(ranks_gone, 120, "the ranks to stop", poll=0.1)
    release_shm(proc.args[proc.args.index("--master_port") + 1])
    stopped = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "stopped" in r]
    assert len(stopped) == 1
    step = stopped[0]["step"]
    assert latest.read_text().strip() == f"step{step:08d}" and final_state(run, f"step{step:08d}")["step"] == step


def test_reference_dwt_settings_train_and_sample(tmp_path, train_shards):
    """The reference's DWT recipe through the real launcher: split tokens with independent patch masks, the bands
    loss, decay on every parameter, ema-pytorch's cadence, no clipping; then RGB samples. A DWT model refuses
    shards of another crop size (DWT bands are never resized) instead of gathering tokens off the wrong grid."""
    import numpy as np
    from PIL import Image

    from trainer.sample import main as sample_main

    cfg, dsc = write_config(tmp_path, train_shards, steps=4, ckpt_every=4, stage=1)
    text = cfg.read_text().replace("input: pixel, image_size: 16, patch_size: 4",
                                   "input: dwt, image_size: 16, patch_size: 2, dwt_tokens: split")
    text = text.replace("kind: block, rate: 0.5, block: 2", "kind: patch, rate: 0.5")
    text = text.replace("optim: {lr: 1.0e-3}", "optim: {lr: 1.0e-3, decay: all}\nloss: {dwt_weighting: bands}")
    cfg.write_text(text.replace("train: {", "train: {ema_every: 2, ema_update_after: 1, "))
    dsc.write_text((REPO / "ds_configs" / "cpu_fp32_noclip.json").read_text())
    launch(cfg, dsc, tmp_path / "run")
    losses = [x["loss"] for x in records(tmp_path / "run")]
    assert len(losses) == 2 and all(math.isfinite(v) and v > 1.0 for v in losses)  # two means of ~1 each at init
    state = final_state(tmp_path / "run", "step00000004")
    assert state["ema"]["every"] == 2 and state["ema"]["updates"] == 4
    assert state["module"]["pos_embed"].shape[1] == 1 + 2 * 16  # 2 token sets of a 4x4 grid
    sample_main(["--ckpt", str(tmp_path / "run"), "--n", "2", "--steps", "2", "--out", str(tmp_path / "s")])
    images = [np.asarray(Image.open(p)) for p in sorted((tmp_path / "s" / "images").glob("*.png"))]
    assert [im.shape for im in images] == [(16, 16, 3)] * 2
    r = launch_script("pretrain.py", cfg, dsc, tmp_path / "wrong", "--set", "model.image_size=32", check=False,
                      num_gpus=1)
    assert r.returncode != 0 and "holds 16 px crops" in r.stdout + r.stderr and "model.image_size" in r.stdout


def test_skipped_samples_are_summed_over_workers_and_ranks(tmp_path, train_shards):
    """4 shards (one per slot: 2 ranks x 2 workers), each starting with 2 corrupt samples before 4 good ones; with
    micro-batches of 4 every worker's first batch has counted its 2 corrupt samples. Step 1 sees worker 0 of each
    rank (2 x 2 = 4 skipped), step 2 worker 1 too (8): the run's figure, not rank 0's last batch (2)."""
    import io
    import tarfile

    src, bad = sorted(Path(train_shards).glob("*.tar"))[:4], tmp_path / "bad"
    bad.mkdir()
    for i, shard in enumerate(src):
        with tarfile.open(shard) as tin, tarfile.open(bad / f"bad-{i:06d}.tar", "w") as tout:
            for k in range(2):  # corrupt samples first: the tar order is the read order (buffer 1, one shard a chunk)
                data = b"not a jpeg"
                info = tarfile.TarInfo(f"000corrupt{i}{k}.jpg")
                info.size = len(data)
                tout.addfile(info, io.BytesIO(data))
            for member in tin:
                tout.addfile(member, tin.extractfile(member))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"""name: test
model: {{preset: tiny, input: pixel, image_size: 16, patch_size: 4, overrides: {{dim: 32, heads: 2}}}}
mask: {{kind: block, rate: 0.5, block: 2}}
data: {{sources: ["{bad}/bad-{{000000..000003}}.tar"], order: exact, workers: 2, buffer: 1, shards_per_chunk: 1,
        flip: false}}
train: {{steps: 2, global_batch: 8, micro_batch: 4, log_every: 1, ckpt_every: 2, sample_every: 1000, sample_n: 2,
        sample_steps: 2}}
""")
    _, dsc = write_config(tmp_path, train_shards, steps=2, ckpt_every=2, stage=1, name="zero1")  # its DeepSpeed JSON
    launch(cfg, dsc, tmp_path / "run")
    assert [(r["step"], r["skipped_samples"]) for r in records(tmp_path / "run")] == [(1, 4), (2, 8)]


def test_too_many_lost_samples_stop_every_rank_with_a_checkpoint(tmp_path, train_shards):
    """2 of the 8 shards gone (a quarter of the samples), data.max_skip_fraction 0.01: at a record past one
    shard's worth of losses every rank stops together (the count is all-reduced), after saving a checkpoint, with
    one line naming the lost shards; no rank is left waiting."""
    data = tmp_path / "shards"
    shutil.copytree(train_shards, data)
    gone = sorted(data.glob("*.tar"))[:2]
    for shard in gone:
        shard.unlink()
    cfg, dsc = write_config(tmp_path, data, steps=40, ckpt_every=100, stage=1)
    r = launch(cfg, dsc, tmp_path / "run", check=False)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "over data.max_skip_fraction 0.01" in out, out[-3000:]
    line = next(x for x in out.splitlines() if "over data.max_skip_fraction" in x)
    assert any(str(shard) in line for shard in gone) and "unreadable shard" in line
    step = records(tmp_path / "run")[-1]["step"]
    assert step < 40 and final_state(tmp_path / "run", f"step{step:08d}")["step"] == step


def _stopped_with_a_checkpoint(run):
    """The run's one "stopped" record names the step whose checkpoint is whole and is the latest."""
    from trainer.train.checkpoints import is_complete, latest_tag

    stopped = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "stopped" in r]
    assert len(stopped) == 1
    tag = f"step{stopped[0]['step']:08d}"
    assert latest_tag(run / "checkpoints") == tag and is_complete(run / "checkpoints" / tag)
    assert final_state(run, tag)["step"] == stopped[0]["step"]


def test_sigterm_to_the_deepspeed_command_alone_saves_and_stops_the_job(tmp_path, train_shards):
    """The README's promise for the `deepspeed` command's PID too (the runner, which has no SIGTERM handler on one
    node and ends at once): its ranks notice, finish the step, save and stop, and nothing of the job is left.
    Meanwhile a second training in the same run directory is refused, naming the first."""
    cfg, dsc = write_config(tmp_path, train_shards, steps=100_000, ckpt_every=7, stage=2)
    run = tmp_path / "run"
    proc = launch(cfg, dsc, run, wait=False)
    try:
        wait_for((run / "checkpoints" / "latest").exists, 300, "the first checkpoint",
                 alive=lambda: proc.poll() is None)
        second = launch_script("pretrain.py", cfg, dsc, run, "--until-step", 1, check=False, num_gpus=1)
        out = second.stdout + second.stderr
        assert second.returncode != 0 and f"error: run directory {run} is in use by another training (host " in out
        assert "pretrain.py" in out.split("is in use by another training")[1].splitlines()[0]  # the holder's command
        proc.send_signal(signal.SIGTERM)  # the runner only
        proc.wait(timeout=60)
        wait_for(lambda: not job_processes(proc.pid), 120, "every process of the job to end", poll=0.1)
    finally:
        kill_job(proc)
    _stopped_with_a_checkpoint(run)


def test_a_sigkilled_launcher_leaves_no_orphan_rank(tmp_path, train_shards):
    """SIGKILL to DeepSpeed's per-node launcher (deepspeed.launcher.launch): its ranks, re-parented, finish the
    step, save and stop."""
    cfg, dsc = write_config(tmp_path, train_shards, steps=100_000, ckpt_every=7, stage=1)
    run = tmp_path / "run"
    proc = launch(cfg, dsc, run, wait=False)
    try:
        wait_for((run / "checkpoints" / "latest").exists, 300, "the first checkpoint",
                 alive=lambda: proc.poll() is None)
        (launcher,) = [pid for pid in job_processes(proc.pid)
                       if b"deepspeed.launcher.launch" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        os.kill(launcher, signal.SIGKILL)
        wait_for(lambda: not job_processes(proc.pid), 120, "the orphaned ranks to end", poll=0.1)
    finally:
        kill_job(proc)
    _stopped_with_a_checkpoint(run)


def test_a_rank_that_fails_mid_step_ends_the_whole_job(tmp_path, train_shards, monkeypatch):
    """Rank 1 raises in its 3rd micro-batch while rank 0 goes on into the gradient all-reduce; with a DataLoader
    worker per rank (whose join at exit used to keep the failed rank alive, and the job hanging forever). The
    failed rank exits at once and DeepSpeed's launcher ends the other (SIGTERM, then SIGKILL after its 30 s)."""
    cfg, dsc = write_config(tmp_path, train_shards, steps=100_000, ckpt_every=1000, stage=2)
    monkeypatch.setenv("MASKDM_TEST_FAULT", "raise-mid-step")  # read by tests/fault_rank.py only
    log = tmp_path / "log.txt"
    proc = launch_script(REPO / "tests" / "fault_rank.py", cfg, dsc, tmp_path / "run", "--set", "data.workers=1",
                         wait=False, output=log)
    try:
        wait_for(lambda: proc.poll() is not None, 180, "the job to end")
        wait_for(lambda: not job_processes(proc.pid), 60, "every process of the job to end", poll=0.1)
    finally:
        kill_job(proc)
    assert proc.returncode != 0 and "RuntimeError: injected fault: rank 1 fails mid-step" in log.read_text()


def test_a_tag_saved_over_and_interrupted_is_not_taken_for_whole(tmp_path, zero_run, monkeypatch):
    """`--resume none` in a run directory saves over its step-2 checkpoint; rank 1 dies before writing its
    partition, after rank 0 wrote its files and `latest`: the tag now mixes two saves and must not be resumed."""
    from trainer.train.checkpoints import latest_tag

    z = zero_run(2)
    run = tmp_path / "run"
    shutil.copytree(z.at_step_2, run)
    assert latest_tag(run / "checkpoints") == "step00000002"
    monkeypatch.setenv("MASKDM_TEST_FAULT", "die-in-save")
    r = launch_script(REPO / "tests" / "fault_rank.py", z.cfg, z.dsc, run, "--resume", "none", "--until-step", 2,
                      check=False)
    assert r.returncode != 0
    assert latest_tag(run / "checkpoints") is None
