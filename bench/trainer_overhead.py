"""End-to-end trainer throughput against the bare model step on the same settings, and where a micro-batch's time
goes.

    python bench/trainer_overhead.py                                     # CPU: presets tiny and S, fp32, 90% masked
    python bench/trainer_overhead.py --presets S --zero 0 1 --workers 0 1            # CPU: ZeRO-0 vs ZeRO-1
    python bench/trainer_overhead.py --device cuda --presets S B L --dtype fp16 bf16 --batch 64 --workers 8

For each preset, dtype and mask rate:
1. shards: synthetic faces at the preset's input (tiny and S: 64 px pixel mode; B: 256 px pixel; L: 256 px DWT,
   the dwt.f16 member read as stored), made once with `pipeline.shard folder` under --out;
2. the real loop: `trainer.train.loop.training_loop` as a one-rank DeepSpeed run in a spawned process (the machine's
   DeepSpeed JSON: ZeRO-1 fp32 on CPU, ZeRO-2 bf16/fp16 on GPUs; --zero for other stages) streaming those shards
   with --workers DataLoader workers, global batch = micro batch = --batch; run twice: once plain (the end-to-end
   rate, from the step end times after --warmup steps) and once with the phase marks (`Phases(detail=True)`: the
   device is synchronised at each phase boundary, so each phase's kernels are counted in it) for the breakdown;
3. the bare step: bench/train_step.py's `Case`, the same model, batch, rate and dtype: forward, loss, backward,
   AdamW, no data, no DeepSpeed; timed in the plain run's process just before and just after its loop.
Columns: the ZeRO stage, loop and model img/s, their ratio (the target is >= 90%), and ms per micro-batch of each
phase of the instrumented run after the warm-up steps: data (waiting for the DataLoader), prep (stream position, t
and mask draws), h2d (batch to the device, DWT of JPEG-only samples), fwd (noise for the visible patches, q_sample,
forward, loss), bwd, sync (the flags all-reduce and its host read, once per optimiser step), step (engine.step),
ema, log (the rest: records, bar). `host %` = (prep + h2d) / the model step.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PRESETS = {"tiny": ("pixel", 64), "S": ("pixel", 64), "B": ("pixel", 256), "L": ("dwt", 256)}


def make_shards(out: Path, size: int, dwt: bool, n: int) -> Path:
    """n synthetic faces as JPEG files, sharded at `size` px (with the DWT member when `dwt`); kept once made."""
    import numpy as np
    from PIL import Image

    from pipeline.synthetic import synthetic_faces

    shards = out / f"shards-{size}{'-dwt' if dwt else ''}"
    if (shards / "manifest.json").is_file():
        return shards
    src = out / f"faces-{size}"
    if not src.is_dir():
        for i, face in enumerate(synthetic_faces(n, size=size, seed=0)):
            path = src / f"id{i % 16:02d}" / f"{i:05d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.asarray(face)).save(path, quality=95)
    import subprocess

    cmd = [sys.executable, "-m", "pipeline.shard", "folder", "--src", str(src), "--out", str(shards), "--size",
           str(size), "--shard-size", "256", *([] if dwt else ["--no-dwt"])]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    return shards


def _bare_step_s(preset: str, dtype: str, batch: int, rate: float, device: str, steps: int) -> float:
    """Seconds per step of bench/train_step.py's `Case` (median of 2 x steps/2 after one untimed step)."""
    import torch

    from train_step import Case  # bench/ is the script's folder
    from trainer.core.settings import torch_dtype

    case = Case(preset, torch_dtype(dtype), batch, rate, torch.device(device))
    case.timed(1)
    sec = statistics.median(case.timed(max(1, steps // 2)) for _ in range(2))
    del case
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return sec


def _loop_child(cfg, ds: dict, run_dir: Path, detail: bool, device: str, warmup: int, bare: tuple | None):
    """One training_loop call as a one-rank DeepSpeed job (in a `spawned` process): its Phases' totals and step end times, and with `bare` (preset, dtype, batch, rate, steps) the
    bare step's seconds, timed in this process just before and just after the loop (their mean): the two rates of
    the ratio share the process, its memory and the minute (these machines are shared and noisy)."""
    import contextlib
    import io

    from trainer.train.loop import Phases, training_loop

    before = _bare_step_s(*bare[:4], device, bare[4]) if bare else None
    phases = Phases(device, detail=detail, warmup=warmup)
    with contextlib.redirect_stdout(io.StringIO()):  # the loop's JSON records
        training_loop(cfg, ds_config=ds, run_dir=run_dir, resume="none", phases=phases, log=lambda *a: None)
    model_s = (before + _bare_step_s(*bare[:4], device, bare[4])) / 2 if bare else None
    return phases.totals, phases.step_ends, model_s


def _child(queue, fn, args) -> None:
    from trainer.train.distributed import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    queue.put(fn(*args))


def spawned(fn, *args, env: dict | None = None):
    """fn(*args) in a spawned process set up as a one-rank job (not daemonic: a DataLoader there may have workers;
    a fresh process: DeepSpeed keeps its process groups per process), with `env` added to its environment."""
    import multiprocessing

    saved = dict(os.environ)
    os.environ.update(env or {})  # what the child starts with (its C library reads MALLOC_* at start)
    try:
        ctx = multiprocessing.get_context("spawn")
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(queue, fn, args))
        proc.start()
        result = queue.get()
        proc.join()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return result


def loop_run(cfg, ds: dict, run_dir: Path, detail: bool, device, warmup: int, bare: tuple | None = None):
    """`_loop_child` in a spawned process."""
    from types import SimpleNamespace

    totals, ends, model_s = spawned(_loop_child, cfg, ds, run_dir, detail, str(device), warmup, bare)
    return SimpleNamespace(totals=totals, step_ends=ends, model_s=model_s)


def run(preset: str, dtype: str, rate: float, zero: int | None, workers: int, args, out: Path, device) -> str:
    from trainer.train.cli import load_ds_config
    from trainer.train.config import ExperimentConfig

    mode, size = PRESETS[preset]
    shards = make_shards(out, size, mode == "dwt", args.images)
    steps = args.warmup + args.steps
    cfg = ExperimentConfig.from_dict({
        "name": "overhead",
        "model": {"preset": preset, "input": mode, "image_size": size, "patch_size": 4},
        "mask": {"kind": "block", "rate": rate, "block": 4},  # as bench/train_step.py
        "data": {"sources": [str(shards)], "order": "resampled", "workers": workers, "buffer": 256},
        "train": {"steps": steps, "global_batch": args.batch, "micro_batch": args.batch, "log_every": steps,
                  "sample_every": 10**9, "ckpt_every": 10**9, "sample_n": 1, "sample_steps": 1}})
    if device.type == "cuda" and dtype != "fp32":  # the asked precision: ZeRO-2 in fp16 (loss scaling) or bf16
        ds = load_ds_config(REPO / "ds_configs" / f"zero2_{dtype}.json")
    else:
        ds = load_ds_config(REPO / "ds_configs" / "cpu_fp32.json")  # fp32, ZeRO-1
    if zero is not None:  # --zero: another ZeRO stage than the JSON's
        ds = {**ds, "zero_optimization": {**ds.get("zero_optimization", {}), "stage": zero}}
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        plain = loop_run(cfg, ds, Path(tmp) / "plain", False, device, args.warmup,
                         bare=(preset, dtype, args.batch, rate, args.steps))
        marked = loop_run(cfg, ds, Path(tmp) / "marked", True, device, args.warmup)
    ends = plain.step_ends[args.warmup - 1:]
    loop_ips = args.batch * (len(ends) - 1) / (ends[-1] - ends[0])
    model_s = plain.model_s
    model_ips = args.batch / model_s
    per = {k: 1e3 * v / args.steps for k, v in marked.totals.items()}  # ms per micro-batch after the warm-up
    host = (per["prep"] + per["h2d"]) / (1e3 * model_s)
    cells = " | ".join(f"{per[k]:.1f}" for k in ("data", "prep", "h2d", "forward", "backward", "sync", "step", "ema",
                                                     "log"))
    return (f"| {preset} | {mode} {size} px | {dtype} | {rate:.1f} | {args.batch} | {workers} | {stage} | "
            f"{loop_ips:.1f} | "
            f"{model_ips:.1f} | {100 * loop_ips / model_ips:.0f}% | {cells} | {100 * host:.1f}% |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny", "S"], choices=list(PRESETS))
    p.add_argument("--dtype", nargs="+", default=["fp32"], choices=["fp32", "fp16", "bf16"])
    p.add_argument("--rates", nargs="+", type=float, default=[0.9])
    p.add_argument("--zero", nargs="+", type=int, choices=[0, 1, 2, 3], default=[None],
                   help="ZeRO stages to run (default: the DeepSpeed JSON's own)")
    p.add_argument("--batch", type=int, default=16, help="micro batch = global batch (one rank)")
    p.add_argument("--workers", nargs="+", type=int, default=[2],
                   help="DataLoader workers (0: loading in the training process)")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the end-to-end rate")
    p.add_argument("--images", type=int, default=1024, help="synthetic faces in the shard set")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="runs/bench-overhead", help="shards and run folders")
    args = p.parse_args()
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    from model_flops import device_name

    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}, {device_name(device)}, {args.steps} steps after "
          f"{args.warmup} warm-up, ms per micro-batch")
    print("| preset | input | dtype | mask | batch | workers | ZeRO | loop img/s | model img/s | loop/model | data "
          "| prep | h2d | fwd | bwd | sync | step | ema | log | host % |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for preset in args.presets:
        for dtype in args.dtype:
            for rate in args.rates:
                for zero in args.zero:
                    for workers in args.workers:
                        print(run(preset, dtype, rate, zero, workers, args, out, device), flush=True)


if __name__ == "__main__":
    main()
