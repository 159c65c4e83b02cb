"""The training loop for masked pre-training and fine-tuning, written out (nanoGPT style, DeepSpeed calls in view):

    load batch -> mask -> MSM loss -> engine.backward -> engine.step   (x gradient accumulation)
    -> EMA (only if engine.was_step_applied()) -> log -> sample grid (EMA, rank 0) -> checkpoint

One call, `training_loop(cfg, ds_config=..., run_dir=...)`, from the thin CLIs `trainer/pretrain.py` and
`trainer/finetune.py`, launched by `deepspeed`. Progress is counted in optimiser steps and images, never epochs.
Checkpoints (`engine.save_checkpoint`) carry the client state needed to continue exactly: step, EMA, each rank's
stream position and RNG state, and the resolved config.

The loop body keeps the DeepSpeed calls in view; what surrounds them has a name: `_resume` (load a checkpoint's
client state), `_stop_nonfinite` (the save-and-stop of a non-finite loss), `_Records` (metrics.jsonl, TensorBoard,
the progress bar: `log_step` all-reduces the loss and the data counts of every rank's workers).

Host syncs. t, the masks and the noise are drawn on the device from a per-rank device generator (its state is in
the checkpoint), and the noise only for the visible patches (`msm_loss`). The loss sum and the non-finite count
stay on the device; the one host read per optimiser step is the all-reduce of three flags (non-finite losses in
the step, a stop signal, --time-limit) at its last micro-batch, after the backward and before `engine.step()`
(before issue 14: one per micro-batch). A record reads its sums every `train.log_every` steps.

Non-finite losses. All ranks agree, once per step, on whether a loss of the step was non-finite. With fp16
dynamic loss scaling a non-finite loss is an overflow: DeepSpeed skips the step (and the loop the EMA), the loss
scale drops, and only `train.max_nonfinite` consecutive such steps stop the run. Without a loss scaler (fp32,
bf16) the first one stops it. Stopping saves a checkpoint `nonfinite-stepN` (weights from before the bad step).
Fault injection for tests: MASKDM_INJECT_NONFINITE=3,7 makes rank 0's loss infinite at steps 3 and 7 (0-based).
"""
from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from trainer.core.diffusion import alphas_cumprod, make_betas, msm_loss
from trainer.core.masking import num_visible, visible_indices
from trainer.core.models import attention_kernel
from trainer.core.settings import DECAY_GROUPS
from trainer.data.shards import to_model_input
from trainer.data.stream import (DataCounts, ShardStream, StreamConfig, StreamPosition, buffer_warning, skip_message,
                                  too_many_skipped)
from trainer.train.checkpoints import (UNIVERSAL_SUFFIX, begin_save, convert_to_universal, mark_complete, plan_resume,
                                       prune, stream_mismatch, sync_rank_files)
from trainer.train.config import ExperimentConfig, batch_arithmetic
from trainer.train.distributed import (LauncherWatch, announce_cpu_comm_build, init_distributed_quietly,
                                       quiet_known_noise, release_shm)
from trainer.train.ema import EMA
from trainer.train.keyrecord import KeyRecord
from trainer.train.rundir import RunDir, lock_run, step_tag
from trainer.train.safeload import weights_only_loads

__all__ = ["training_loop", "param_groups", "adamw_fused", "Phases"]


def adamw_fused(device: torch.device) -> bool:
    """Whether torch's fused AdamW kernel serves `device` (CUDA, and CPU from torch 2.4): one pass over each
    parameter, where the per-tensor update allocates several parameter-sized temporaries (on CPU, under ZeRO's one
    flat fp32 partition, each is fresh memory to fault in: bench/optimizer_step.py, docs/performance.md)."""
    return torch.device(device).type in ("cuda", "cpu")


def param_groups(model: torch.nn.Module, weight_decay: float, decay: str = "matrices") -> list[dict]:
    """AdamW groups (config optim.decay). "matrices": decay on weight matrices, none on biases, norms, q/v biases
    and the positional embedding; "all": decay on every parameter (the reference: AdamW over model.parameters())."""
    if decay == "all":
        return [{"params": list(model.parameters()), "weight_decay": weight_decay}]
    if decay != "matrices":
        raise ValueError(f"optim.decay {decay!r}: choose {' or '.join(DECAY_GROUPS)}")
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    matrices, rest = [], []
    for name, p in model.named_parameters():
        (rest if p.ndim < 2 or name in skip else matrices).append(p)
    return [{"params": matrices, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def sample_grid(cfg: ExperimentConfig, ema: EMA, path: Path, device="cpu") -> Path:
    """The EMA weights' sample grid: `train.sampling` (DDIM, `train.sample_steps`, `train.sample_eta`,
    `train.sample_n` images) from one generator seeded 0, as one PNG, drawn on `device` (rank 0's GPU in training:
    on a CPU a large model would keep the other ranks waiting for minutes)."""
    from trainer.core.images import save_grid, to_rgb_uint8
    from trainer.core.sampling import make_clip, sample

    m, s = cfg.model, cfg.train.sampling
    model = m.build().eval()
    ema.copy_to(model)
    model.to(device)
    x = sample(model, (s.n, m.in_channels, m.model_size, m.model_size), alphas_cumprod(make_betas(cfg.train.schedule)),
               sampler=s.sampler, steps=s.steps, eta=s.eta, clip=make_clip(m.input), clip_mode=s.clip_mode,
               generator=torch.Generator().manual_seed(s.seed), device=device)
    del model
    return save_grid(to_rgb_uint8(x, m.input), path)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def _catch_stop_signals() -> tuple[list, dict]:
    """SIGTERM (Slurm's time limit, scancel, the DeepSpeed launcher stopping) and SIGUSR1 (`sbatch --signal=USR1@300`)
    ask the loop to finish its step, save a checkpoint and stop; every rank learns of it at the end of the step
    (the flags all-reduce), so the collective save never deadlocks. Returns ([signal or None], old handlers)."""
    got: list = [None]

    def handler(signum, frame):
        got[0] = signum

    return got, {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers ignore the stop signals: their rank finishes its step and shuts them down."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _gather(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class _Records:
    """Rank 0's outputs of a run: metrics.jsonl, TensorBoard (train.tensorboard) and the progress bar. Other ranks
    hold one too and only take part in the all-reduce of `log_step`."""

    def __init__(self, cfg: ExperimentConfig, run: RunDir, rank: int, step: int, until: int, device, log):
        self.cfg, self.rank, self.device, self.log = cfg, rank, device, log
        self.file = open(run.metrics, "a") if rank == 0 else None
        self.board = self._tensorboard(run) if rank == 0 and cfg.train.tensorboard else None
        self.bar = tqdm(total=until, initial=step, unit="step", desc=cfg.name, disable=rank != 0, dynamic_ncols=True)
        self.start, self.start_step = time.time(), step

    @staticmethod
    def _tensorboard(run: RunDir):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise SystemExit("error: train.tensorboard: true needs the tensorboard package: pip install tensorboard "
                             "(or set train.tensorboard: false; metrics.jsonl has the same records)") from None
        return SummaryWriter(str(run.tensorboard))

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def log_step(self, step: int, loss_sum: torch.Tensor, finite_n: torch.Tensor, skipped_steps: int,
                 counts: DataCounts, lr: float, train_s: float, loss_scale: float | None) -> int:
        """One training record (all ranks call this: the loss and the data counts are summed over ranks). Returns
        the run's skipped samples in this session (the same on every rank)."""
        totals = torch.stack([loss_sum.float(), finite_n.float(),
                              *(torch.tensor(float(x), device=self.device) for x in counts.totals())])
        dist.all_reduce(totals)
        loss = (totals[0] / totals[1]).item() if totals[1] else float("nan")
        skipped, retries = totals[2:].tolist()
        record = {"step": step, "images": step * self.cfg.train.global_batch, "loss": loss, "lr": lr,
                  "img_per_s": (step - self.start_step) * self.cfg.train.global_batch / (time.time() - self.start),
                  "train_s": round(train_s, 2), "skipped_steps": skipped_steps,
                  "skipped_samples": int(skipped), "bucket_retries": int(retries)}
        if loss_scale is not None:
            record["loss_scale"] = loss_scale
        if self.rank != 0:
            return int(skipped)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['img_per_s']:.1f}",
                             **({"scale": loss_scale} if loss_scale is not None else {}))
        self.log(json.dumps(record))
        self.write(record)
        if self.board is not None:
            for key, value in record.items():
                if key not in ("step", "images"):
                    self.board.add_scalar(f"train/{key}", value, step)
            self.board.flush()
        return int(skipped)

    def grid(self, step: int, png: Path) -> None:
        self.write({"step": step, "samples": str(png)})
        if self.board is not None:
            self.board.add_image("samples", np.asarray(Image.open(png).convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.board is not None:
            self.board.close()


def _resume(engine, ema: EMA, gen: torch.Generator, run: RunDir, tag: str, resume: str, universal: bool,
            cfg: ExperimentConfig, rank: int, world: int, log) -> tuple[int, float, int, StreamPosition]:
    """Load checkpoint `tag` into the engine, the EMA and this rank's generator; returns (step, training seconds
    so far, data seed, this rank's stream position). On another world size or worker count the positions do not
    carry over (`stream_mismatch`): the stream restarts with a seed drawn from (seed, step), not a replay of the
    run's beginning."""
    with weights_only_loads():  # DeepSpeed's checkpoint engine unpickles without restriction
        path, client = engine.load_checkpoint(str(run.checkpoints), tag=tag)
    if path is None:
        raise SystemExit(f"error: could not load checkpoint {run.checkpoint(tag)} (--resume {resume})")
    step = client["step"]
    ema.load_state_dict(client["ema"])
    data_seed, position = client.get("data_seed", cfg.train.seed), StreamPosition()
    fresh_seed = (cfg.train.seed * 1_000_003 + step) % 2**31
    if len(client["positions"]) == world:
        _restore_rng(gen, client["rng"][rank], fresh_seed * 100_003 + rank, rank, log)
    else:
        gen.manual_seed(fresh_seed * 100_003 + rank)
    if (mismatch := stream_mismatch(client, world, cfg.data.workers)) is None:
        position = StreamPosition.from_state_dict(client["positions"][rank])
    else:
        data_seed = fresh_seed
        if rank == 0:
            log(json.dumps({"warning": f"{mismatch}: the data stream restarts with seed {data_seed}"}))
    if rank == 0:
        log(json.dumps({"resumed": path, "step": step, "universal": universal}))
    return step, client.get("train_s", 0.0), data_seed, position


class Phases:
    """Where a run's time goes, for `bench/trainer_overhead.py`: `training_loop(..., phases=Phases(device))` adds
    the wall time of each phase of each micro-batch (data wait, host prep, H2D, forward, backward, step), of the
    one agreement of the ranks per optimiser step (sync: the flags all-reduce and its host read) and of each
    optimiser step's EMA and logging to `totals`, synchronising the device at each boundary so that a phase's kernels
    are counted in it (which slows the run: take end-to-end rates from a run with `detail=False`, whose marks only
    record when each step ended). Without a `Phases` the loop's marks cost nothing."""

    NAMES = ("data", "prep", "h2d", "forward", "backward", "sync", "step", "ema", "log")

    def __init__(self, device, detail: bool = True, warmup: int = 0):
        """`warmup`: steps whose phases are left out of `totals` (worker start-up, first kernels, optimizer state);
        `step_ends` records every step."""
        self.device, self.detail, self.warmup = torch.device(device), detail, warmup
        self.totals = dict.fromkeys(self.NAMES, 0.0)
        self.step_ends: list[float] = []
        self._t = time.perf_counter()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def mark(self, name: str) -> None:
        if self.detail:
            self._sync()
            now = time.perf_counter()
            self.totals[name] += now - self._t
            self._t = now

    def step_end(self) -> None:
        self.mark("log")
        self.step_ends.append(time.perf_counter())
        if len(self.step_ends) == self.warmup:
            self.totals = dict.fromkeys(self.NAMES, 0.0)


class _NoPhases:
    def mark(self, name: str) -> None:
        pass

    def step_end(self) -> None:
        pass


def _restore_rng(gen: torch.Generator, state, seed: int, rank: int, log) -> None:
    """This rank's generator from its checkpointed state; a state of another device's generator (a checkpoint from
    a CPU run resumed on GPUs, or one from before the generators moved to the device) reseeds it instead."""
    try:
        gen.set_state(torch.as_tensor(state).cpu())
    except (RuntimeError, ValueError):
        gen.manual_seed(seed)
        if rank == 0:
            log(json.dumps({"warning": f"the checkpoint's random state is not a {gen.device.type} generator's: t, "
                                       f"noise and masks continue from a fresh seed"}))


def _workers_warning(workers: int, local_ranks: int) -> str | None:
    """A word when the DataLoader workers of this machine's ranks outnumber its cores: they then take cores from
    the training processes (on a CPU-only machine, from the model itself)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if workers == 0 or workers * local_ranks <= cores:
        return None
    fit = max(0, cores // local_ranks - 1)
    return (f"data.workers {workers} x {local_ranks} ranks = {workers * local_ranks} loader processes on {cores} cores: "
            f"they compete with training for the cores; set data.workers={fit} (0: load in the training process)")


def _memory_bytes() -> int:
    """This machine's memory, or the container's limit (cgroup v2) where lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        return min(total, int(Path("/sys/fs/cgroup/memory.max").read_text()))
    except (OSError, ValueError):  # no cgroup v2, or "max"
        return total


def _stop_skipped(save: Callable[[str], None], step: int, counts: DataCounts, skipped: int, trained: int,
                  max_fraction: float) -> None:
    """Too many samples skipped (all ranks agree: the count is all-reduced): save step N and stop, naming the
    shards that lost samples on any rank."""
    reasons, shards = Counter(), Counter()
    for r, s in _gather(counts.by_reason_and_shard()):
        reasons.update(r)
        shards.update(s)
    save(step_tag(step))
    raise SystemExit(skip_message(skipped, trained, max_fraction, reasons, shards, step_tag(step)))

def _lock_run_dir(run: RunDir, rank: int, device):
    """Rank 0 takes the run directory's lock (`lock_run`) and every rank learns whether it got it, so a refused
    job ends on every rank with rank 0's one-line message instead of ranks waiting for a rank 0 that has left."""
    lock, refusal = lock_run(run) if rank == 0 else (None, None)
    refused = torch.tensor([float(refusal is not None)], device=device)
    dist.all_reduce(refused)
    if refused.item():
        raise SystemExit(refusal if rank == 0 else 1)
    return lock


def _stop_nonfinite(save: Callable[[str], None], step: int, message: str) -> None:
    """Save checkpoint nonfinite-stepN (all ranks) and stop the run with `message`."""
    save(f"nonfinite-step{step:08d}")
    raise SystemExit(message)


def training_loop(cfg: ExperimentConfig, *, ds_config: dict, run_dir: str | Path, resume: str = "auto",
                  until_step: int | None = None, time_limit: float | None = None, init_model=None,
                  log=print, phases: Phases | None = None) -> dict:
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    # --- distributed set-up and batch arithmetic ------------------------------------------------------------
    quiet_known_noise()
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        announce_cpu_comm_build(log)  # a first CPU launch compiles DeepSpeed's comm op: say so before it starts
    init_distributed_quietly()
    rank, world = dist.get_rank(), dist.get_world_size()
    accumulation = batch_arithmetic(cfg.train.global_batch, cfg.train.micro_batch, world)
    ds = {**ds_config, "train_batch_size": cfg.train.global_batch,
          "train_micro_batch_size_per_gpu": cfg.train.micro_batch, "gradient_accumulation_steps": accumulation}
    device = torch.device(get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", "0"))))
    run = RunDir(run_dir)
    run_lock = _lock_run_dir(run, rank, device)  # before anything is written into the run directory
    if rank == 0:
        run.checkpoints.mkdir(parents=True, exist_ok=True)
        run.config.write_text(cfg.to_yaml())
    tag, universal = plan_resume(run.checkpoints, resume, world)
    if universal:  # another world size than the checkpoint's: load its universal form (trainer/train/checkpoints.py)
        if rank == 0:
            convert_to_universal(run.checkpoints, tag.removesuffix(UNIVERSAL_SUFFIX), log=log)
        dist.barrier()
        ds["checkpoint"] = {**ds.get("checkpoint", {}), "load_universal": True}

    # --- model, optimiser, engine, EMA ----------------------------------------------------------------------
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    m = cfg.model
    model = m.build(grad_checkpoint=m.grad_checkpoint)
    if init_model is not None:
        init_model(model)  # fine-tuning: load pre-trained weights before the engine takes the model
    fused = adamw_fused(device)  # torch's fused AdamW kernel: one pass per parameter, no temporaries
    optimizer = torch.optim.AdamW(param_groups(model.to(device), cfg.optim.weight_decay, cfg.optim.decay),
                                  lr=cfg.optim.lr, betas=cfg.optim.betas, fused=fused)
    warmup = max(1, cfg.optim.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer,
                                                           lr_scheduler=scheduler, config=ds)
    if m.compile:  # torch.compile in place: the module keeps its parameter names (checkpoints, exports)
        engine.compile()
    ema = EMA(engine.module, cfg.train.ema_decay, warmup=cfg.train.ema_warmup, every=cfg.train.ema_every,
              after=cfg.train.ema_update_after)
    ab = alphas_cumprod(make_betas(cfg.train.schedule)).to(device)
    dtype = next(engine.module.parameters()).dtype
    if rank == 0:  # the attention kernel this model gets here, and a warning when it is the slow math one
        ucfg, k = engine.module.cfg, cfg.mask
        amp = torch.bfloat16 if engine.bfloat16_enabled() else torch.float16 if engine.fp16_enabled() else dtype
        seen = num_visible(k.kind, ucfg.grid, k.rate, k.block) * m.token_sets if k.rate > 0 else None
        kernel, warning = attention_kernel(ucfg, amp, device, seen)
        log(json.dumps({"attention": kernel, "head_dim": ucfg.dim // ucfg.heads, "fused_adamw": fused,
                        "compiled": m.compile, **({"warning": warning} if warning else {})}))
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)  # torchrun / deepspeed
    if rank == 0 and (warning := _workers_warning(cfg.data.workers, local_ranks)):
        log(json.dumps({"warning": warning}))
    gen = torch.Generator(device).manual_seed(cfg.train.seed * 100_003 + rank)  # this rank's t, noise, masks
    step, trained_s, data_seed, position = 0, 0.0, cfg.train.seed, StreamPosition()
    if tag is not None:  # trained_s: training time of the earlier sessions of this run, --time-limit's clock
        step, trained_s, data_seed, position = _resume(engine, ema, gen, run, tag, resume, universal, cfg, rank,
                                                       world, log)

    # --- data ---------------------------------------------------------------------------------------------
    stream = ShardStream(StreamConfig.from_experiment(cfg, data_seed), rank, world, cfg.data.workers, position)
    if m.input == "dwt" and (other := stream.sources_not_at(m.image_size)):
        src, size = other[0]
        raise SystemExit(f"error: data source {src} holds {size} px crops (DWT bands {size // 2}x{size // 2}) but "
                         f"model.image_size is {m.image_size}: DWT input is not resized; set model.image_size: {size} "
                         f"or shard the images at --size {m.image_size}")
    if rank == 0 and (warning := buffer_warning(stream.sample_bytes(), cfg.data.buffer, cfg.data.workers, local_ranks,
                                                _memory_bytes())):
        log(json.dumps({"warning": warning}))
    loader = DataLoader(stream, batch_size=None, num_workers=cfg.data.workers,
                        pin_memory=device.type == "cuda", persistent_workers=cfg.data.workers > 0,
                        prefetch_factor=cfg.data.prefetch if cfg.data.workers > 0 else None,
                        worker_init_fn=_ignore_stop_signals)  # pinned batches: to_model_input copies non-blocking
    batches, counts = iter(loader), DataCounts()
    keys = KeyRecord(run.keys(rank)) if cfg.data.record_keys else None  # each step's sample keys (checks)

    def train_s() -> float:  # training time summed over this run's sessions (set-up and loading excluded)
        return trained_s + time.time() - start

    def save(tag: str) -> None:
        client = {"step": step, "train_s": train_s(), "ema": ema.state_dict(), "config": cfg.to_dict(),
                  "data_seed": data_seed, "data_workers": cfg.data.workers,
                  "positions": _gather(position.state_dict()), "rng": _gather(gen.get_state())}
        if rank == 0:
            begin_save(run.checkpoint(tag))  # a tag saved over (--resume none or an older tag) is not whole now
        dist.barrier()
        engine.save_checkpoint(str(run.checkpoints), tag=tag, client_state=client)
        sync_rank_files(run.checkpoint(tag), rank)  # this rank's part on the disk, not only in the page cache
        dist.barrier()  # every rank has written its part: only now is the checkpoint whole
        if rank == 0:
            mark_complete(run.checkpoint(tag), step, world)
            if cfg.train.keep_last:
                prune(run.checkpoints, cfg.train.keep_last)

    # --- the loop --------------------------------------------------------------------------------------------
    until = min(until_step or cfg.train.steps, cfg.train.steps)
    records = _Records(cfg, run, rank, step, until, device, log)
    mask, grid = cfg.mask, engine.module.cfg.grid
    start, loss_sum, finite_n = records.start, torch.zeros((), device=device), torch.zeros((), device=device)
    inject = {int(x) for x in os.environ.get("MASKDM_INJECT_NONFINITE", "").split(",") if x.strip()}
    stop_signal, previous_handlers = _catch_stop_signals()
    launcher = LauncherWatch()  # a launcher gone (SIGTERM/SIGKILL to the `deepspeed` command) stops the run too
    nonfinite = skipped = 0  # consecutive steps with a non-finite loss; steps skipped since the last record
    ph = phases or _NoPhases()  # bench/trainer_overhead.py's breakdown; no-ops otherwise
    while step < until:
        bad = torch.zeros((), device=device)  # non-finite losses this step: summed on the device, read once
        for micro in range(accumulation):
            batch = next(batches)                                       # load
            ph.mark("data")
            position.update(batch)
            counts.update(batch)
            if keys is not None:
                keys.add(batch)
            ph.mark("prep")
            x0 = to_model_input(batch, m.input, device, dtype)         # (B, C, H, W)
            ph.mark("h2d")
            B = x0.shape[0]
            t = torch.randint(0, len(ab), (B,), generator=gen, device=device)
            visible = (visible_indices(mask.kind, grid, mask.rate, B, mask.block, gen, sets=m.token_sets)
                       if mask.rate > 0 else None)                      # mask: (B, S) visible tokens, on the device
            ph.mark("prep")
            # loss: MSM, the noise drawn on the device for the visible patches only
            loss = msm_loss(engine, x0, t, None, ab, visible, cfg.loss.dwt_weighting, generator=gen)
            if step in inject and rank == 0 and micro == 0:            # fault injection (tests)
                loss = loss * float("inf")
            finite = torch.isfinite(loss.detach())
            bad += ~finite
            loss_sum += torch.where(finite, loss.detach().float(), 0.0)
            finite_n += finite
            ph.mark("forward")
            engine.backward(loss)  # fp16: a non-finite loss makes non-finite gradients; the scaler skips the step
            ph.mark("backward")
            if micro == accumulation - 1:  # the step boundary: one agreement of all ranks, one host read per step
                out_of_time = time_limit is not None and train_s() >= time_limit
                if launcher.gone() and stop_signal[0] is None:
                    stop_signal[0] = "launcher"
                host = torch.tensor([float(stop_signal[0] is not None), float(out_of_time)])
                flags = torch.cat([bad.float().view(1), host.to(device, non_blocking=True)])
                dist.all_reduce(flags)
                bad_n, stopping, timed_out = flags.tolist()
                ph.mark("sync")
                stopping, bad_step = stopping or timed_out, bad_n > 0
                if bad_step and not engine.fp16_enabled():              # nothing to skip it: stop, keep state
                    _stop_nonfinite(save, step, f"non-finite loss at step {step}; checkpoint nonfinite-step{step:08d} "
                                                f"saved (weights from before the step)")
            engine.step()
            ph.mark("step")
        step += 1
        if keys is not None:  # before the step's checkpoint: a checkpointed step always has its line
            keys.write(step)
        if engine.was_step_applied():                                   # an fp16 overflow skips the EMA too
            if bad_step:  # cannot happen with DeepSpeed's overflow check; never train on a non-finite loss
                _stop_nonfinite(save, step, f"step {step} was applied despite a non-finite loss; checkpoint saved")
            ema.update(engine.module)  # averages on every train.ema_every-th call (trainer/train/ema.py)
        else:
            skipped += 1
        ph.mark("ema")
        nonfinite = nonfinite + 1 if bad_step else 0
        if nonfinite >= cfg.train.max_nonfinite:
            _stop_nonfinite(save, step, f"{nonfinite} consecutive steps with a non-finite loss (train.max_nonfinite) "
                                        f"up to step {step}; checkpoint nonfinite-step{step:08d} saved")
        if step % cfg.train.log_every == 0 or step == until or stopping:  # log (all ranks reduce)
            lost = records.log_step(step, loss_sum, finite_n, skipped, counts, scheduler.get_last_lr()[0], train_s(),
                                    optimizer.cur_scale if engine.fp16_enabled() else None)
            loss_sum.zero_()
            finite_n.zero_()
            skipped = 0
            trained = (step - records.start_step) * cfg.train.global_batch  # this session's: counts restart too
            if too_many_skipped(lost, trained, cfg.data.max_skip_fraction, stream.largest_shard()):
                _stop_skipped(save, step, counts, lost, trained, cfg.data.max_skip_fraction)
        records.bar.update(1)
        ph.step_end()
        if rank == 0 and (step % cfg.train.sample_every == 0 or step == until):   # sample grid (EMA)
            records.grid(step, sample_grid(cfg, ema, run.grid(step), device=device))
        if step % cfg.train.ckpt_every == 0 or step == until or stopping:  # checkpoint (also to stop: a signal on
            save(step_tag(step))                                         # some rank, or --time-limit reached)
        if stopping:
            if rank == 0:
                why = (f"--time-limit {time_limit:g} s of training reached" if timed_out else
                       "a stop signal (SIGTERM/SIGUSR1) reached a rank, or a rank's launcher is gone")
                record = {"stopped": why, "step": step, "train_s": round(train_s(), 2),
                          "checkpoint": str(run.checkpoint(step_tag(step))), "resume": "run the same command again"}
                log(json.dumps(record))
                records.write(record)
            break
    for sig, old in previous_handlers.items():
        signal.signal(sig, old)
    records.close()
    if keys is not None:
        keys.close()
    dist.barrier()  # every rank is done communicating: the shared-memory buffers can go
    release_shm(os.environ.get("MASTER_PORT"), os.environ.get("MASTER_ADDR", "127.0.0.1"), engine.local_rank)
    # without this a gloo worker thread can still be finishing the barrier at interpreter shutdown: it is killed
    # holding no GIL and C++ aborts ("terminate called without an active exception", exit -6) after a finished run
    dist.destroy_process_group()
    if run_lock is not None:
        run_lock.close()
    return {"step": step, "images": step * cfg.train.global_batch}
