"""`trainer/pretrain.py --dry-run` (and finetune.py): what a launch would do, without DeepSpeed or training.

    python trainer/pretrain.py --config configs/vggface2_pretrain_S.yaml --deepspeed_config ds_configs/zero2_fp16.json \
        --run-dir runs/S --dry-run --world-size 16

Prints the resolved config, the batch arithmetic per rank, the data sets (shards, samples, steps per epoch,
epochs over the run), which shards each rank and DataLoader worker reads, the DeepSpeed settings that matter
(ZeRO stage, precision, clipping), the compute of the run and what `--resume` would load. The world size comes
from --world-size, else from the launcher's WORLD_SIZE, else 1. Reads only manifests (local or bucket), never a shard.

Compute: parameters, tokens the network sees per image (visible tokens of every token set), forward FLOPs per
image (`trainer.core.models.flops_per_image`), the run's training FLOPs (3 x forward x images: backward is ~2x forward)
and GPU-days at a sustained rate per GPU (`--gpu-tflops`). The default rate, 16.2 TFLOP/s, is what the reference
implementation achieved on V100s: its DDPM baseline (L, split DWT tokens, 1,238.5 GFLOP per forward, 940k steps at
batch 16) took 120 h on 8 V100s (its README's errata), i.e. 13% of the V100's 125 TFLOP/s fp16 tensor peak. An
estimate: measure your own rate with bench/train_step.py.
"""
from __future__ import annotations

from pathlib import Path

from trainer.data.stream import ShardStream, StreamConfig
from trainer.train.checkpoints import checkpoint_world, plan_resume
from trainer.train.config import ExperimentConfig, batch_arithmetic
from trainer.train.rundir import RunDir

__all__ = ["dry_run", "compute", "REFERENCE_V100_TFLOPS"]

REFERENCE_V100_TFLOPS = 16.2  # sustained training TFLOP/s per V100 of the reference's L-DWT baseline (see docstring)


def compute(cfg: ExperimentConfig, tflops: float = REFERENCE_V100_TFLOPS) -> dict:
    """The run's size: params, tokens seen per image, forward GFLOP per image, training PFLOP, GPU-days at `tflops`."""
    import torch

    from trainer.core.masking import num_visible
    from trainer.core.models import flops_per_image

    m, t = cfg.model, cfg.train
    with torch.device("meta"):  # shapes only: an L model costs nothing to build
        model = m.build()
    grid = model.cfg.grid
    seen = num_visible(cfg.mask.kind, grid, cfg.mask.rate, cfg.mask.block) * model.cfg.token_sets
    forward = flops_per_image(model.cfg, seen)
    total = 3 * forward * t.steps * t.global_batch
    return {"params": sum(p.numel() for p in model.parameters()), "tokens": model.cfg.num_tokens, "seen": seen,
            "forward_gflop": forward / 1e9, "train_pflop": total / 1e15,
            "gpu_days": total / (tflops * 1e12) / 86400, "tflops": tflops}


def _precision(ds: dict) -> str:
    if ds.get("fp16", {}).get("enabled"):
        return "fp16 (dynamic loss scaling)" if ds["fp16"].get("loss_scale", 0) == 0 else "fp16 (static scale)"
    if ds.get("bf16", {}).get("enabled"):
        return "bf16"
    return "fp32"


def _clipping(ds: dict) -> str:
    clip = ds.get("gradient_clipping")
    return "off (gradient_clipping 0)" if clip == 0 else f"at norm {clip}" if clip is not None else "DeepSpeed's default"


def _describe(a: dict) -> str:
    names = a["shards"]
    shown = ", ".join(names[:6]) + (f", ... ({len(names)} shards)" if len(names) > 6 else "")
    return shown + (f"; {a['samples']:,} samples" if a["samples"] is not None else "")


def _runs(texts: list[str]) -> list[tuple[int, int, str]]:
    """(first slot, last slot, text) of each run of consecutive slots that read the same: 64 readers of one shard
    make one line, not 64 identical ones."""
    runs = []
    for slot, text in enumerate(texts):
        if runs and runs[-1][2] == text:
            runs[-1] = (runs[-1][0], slot, text)
        else:
            runs.append((slot, slot, text))
    return runs


def _slot(slot: int, workers: int) -> str:
    rank, worker = divmod(slot, workers)
    return f"rank {rank} worker {worker}"


def dry_run(cfg: ExperimentConfig, ds: dict, run_dir: str | Path, world: int, resume: str = "auto",
            max_slots: int = 64, tflops: float = REFERENCE_V100_TFLOPS) -> str:
    """The report as text (also the return value of the CLI's --dry-run)."""
    t, m = cfg.train, cfg.model
    lines = ["# resolved config", cfg.to_yaml().rstrip(), ""]
    try:
        acc = batch_arithmetic(t.global_batch, t.micro_batch, world)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    lines += ["# batch arithmetic",
              f"world size {world} x micro batch {t.micro_batch} x gradient accumulation {acc} = global batch "
              f"{t.global_batch}",
              f"per rank and optimiser step: {t.micro_batch * acc} images in {acc} micro-batches; "
              f"{t.steps} steps = {t.steps * t.global_batch:,} images",
              f"model: {m.preset}, input {m.input} {m.in_channels}x{m.model_size}x{m.model_size}, patch "
              f"{m.patch_size}; mask {cfg.mask.kind} rate {cfg.mask.rate} (block {cfg.mask.block})",
              f"deepspeed: ZeRO stage {ds.get('zero_optimization', {}).get('stage', 0)}, {_precision(ds)}, "
              f"gradient clipping {_clipping(ds)}", ""]
    c = compute(cfg, tflops)
    sets = " (2 token sets: cA, details)" if m.token_sets == 2 else ""
    lines += ["# compute (an estimate)",
              f"{c['params']:,} parameters; {c['seen']} of {c['tokens']} tokens{sets} seen per image; forward "
              f"{c['forward_gflop']:,.1f} GFLOP per image",
              f"the run: 3 x forward x {t.steps * t.global_batch:,} images = {c['train_pflop']:,.0f} PFLOP = "
              f"{c['gpu_days']:,.1f} GPU-days at {tflops:g} TFLOP/s per GPU ({c['gpu_days'] / world:,.1f} days on "
              f"{world}); 16.2 is the reference's V100 rate, set yours with --gpu-tflops", ""]

    stream = ShardStream(StreamConfig.from_experiment(cfg), 0, world, cfg.data.workers)
    lines.append(f"# data ({cfg.data.order} order, {cfg.data.workers} workers per rank)")
    total = 0
    for i, (src, shards) in enumerate(zip(cfg.data.sources, stream.sources)):
        n = sum(sh.samples or 0 for sh in shards) if all(sh.samples is not None for sh in shards) else None
        total = None if n is None or total is None else total + n
        weight = f", weight {cfg.data.weights[i]}" if cfg.data.weights else ""
        lines.append(f"{src}: {len(shards)} shards, {f'{n:,}' if n is not None else 'unknown'} samples{weight}")
    if total:
        per_epoch = total / t.global_batch
        lines.append(f"one epoch = {total:,} samples = {per_epoch:,.1f} steps; the run ({t.steps} steps) = "
                     f"{t.steps / per_epoch:,.2f} epochs")
    S = world * stream.W
    for src, size in stream.sources_not_at(m.image_size) if m.input == "dwt" else []:
        lines.append(f"{src}: {size} px crops, but this DWT model takes {m.image_size} px ones: training would refuse "
                     f"(DWT bands are not resized; set model.image_size: {size} or shard at --size {m.image_size})")
    for src, size in stream.resized_sources():
        lines.append(f"{src}: {size} px crops, resized to the {m.image_size} px pixel-mode model on every sample")
    if cfg.data.order == "exact" and len(stream.all_shards) < S:
        lines.append(f"fewer shards ({len(stream.all_shards)}) than ranks x workers ({S}): every reader reads "
                     f"all shards and keeps 1/{S} of the samples (correct, but reads {S}x the data: make more, "
                     f"smaller shards)")
    elif len(stream.all_shards) < S:
        lines.append(f"fewer shards ({len(stream.all_shards)}) than ranks x workers ({S}): the readers share "
                     f"shards, so the same images reach several ranks at about the same time (less varied global "
                     f"batches than the set allows; each reader shuffles only within its buffer). Make at least "
                     f"{S} shards (pipeline.shard --shard-size), or run fewer data.workers")
    what = "epoch 0" if cfg.data.order == "exact" else "first chunk of an endless weighted draw"
    lines += ["", f"# shard assignment per rank and worker ({what})"]
    assignments = [stream.assignment(slot) for slot in range(S)]
    groups = _runs([_describe(a) for a in assignments])
    for first, last, text in groups[:max_slots]:
        lines.append(f"{_slot(first, stream.W)}: {text}" if first == last else
                     f"slots {first}-{last} ({_slot(first, stream.W)} to {_slot(last, stream.W)}, "
                     f"{last - first + 1} readers): {text}")
    if len(groups) > max_slots:
        lines.append(f"... ({len(groups) - max_slots} more lines, slots {groups[max_slots][0]}-{S - 1})")
    if cfg.data.order == "exact":
        counts = [a["samples"] for a in assignments]
        if all(c is not None for c in counts) and counts:
            lines.append(f"samples per reader in an epoch: min {min(counts):,}, max {max(counts):,}")

    ckpt_dir = RunDir(run_dir).checkpoints
    lines += ["", "# resume"]
    try:
        tag, universal = plan_resume(ckpt_dir, resume, world)
    except SystemExit as e:
        lines.append(str(e))
    else:
        if tag is None:
            lines.append(f"starts from scratch ({ckpt_dir} has no checkpoint, or --resume none)")
        elif universal:
            base = tag.removesuffix("_universal")
            lines.append(f"loads {ckpt_dir / base} (written by {checkpoint_world(ckpt_dir / base)} ranks) through "
                         f"its universal form {tag} (converted at start if missing); the data stream restarts")
        else:
            lines.append(f"loads {ckpt_dir / tag} and continues its data stream exactly")
    lines.append(f"logs: {RunDir(run_dir).metrics}; checkpoints every {t.ckpt_every} steps; samples every "
                 f"{t.sample_every}")
    return "\n".join(lines)
