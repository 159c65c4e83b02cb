"""What the training commands (`trainer/pretrain.py`, `trainer/finetune.py`, `trainer.schedule`) share: their flags,
reading the experiment YAML and the DeepSpeed JSON, and the --dry-run report.

The DeepSpeed JSON holds the ZeRO stage, precision, gradient clipping and communication only. The batch keys
(`train_batch_size`, `train_micro_batch_size_per_gpu`, `gradient_accumulation_steps`) come from the experiment
config (`train.global_batch`, `train.micro_batch`) and the launched world size; a JSON that sets them is refused
at load, never silently overwritten.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from trainer.train.config import ExperimentConfig, parse_overrides

__all__ = ["parse", "load", "load_ds_config", "dry_run", "DS_BATCH_KEYS"]

DS_BATCH_KEYS = {"train_batch_size": "train.global_batch", "train_micro_batch_size_per_gpu": "train.micro_batch",
                 "gradient_accumulation_steps": "train.global_batch / (train.micro_batch x GPUs)"}


def parse(argv, description: str, extra=()) -> argparse.Namespace:
    """The flags of a training command (`description`: its docstring); `extra`: (flag, add_argument kwargs) pairs."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, kw in extra:
        p.add_argument(flag, **kw)
    p.add_argument("--config", required=True, help="experiment YAML (configs/)")
    p.add_argument("--deepspeed_config", required=True, help="DeepSpeed JSON (ds_configs/)")
    p.add_argument("--run-dir", required=True, help="where config.yaml, metrics.jsonl and checkpoints/ go")
    p.add_argument("--resume", default="auto", help="auto (latest complete checkpoint), none, or a tag")
    p.add_argument("--until-step", type=int, help="stop cleanly at this step (scheduled jobs)")
    p.add_argument("--time-limit", type=float, metavar="SECONDS", help="stop cleanly (checkpoint saved) once the "
                   "run's training time, summed over resumes, reaches SECONDS (wall-clock budgets, equal-compute "
                   "comparisons); the step it stopped at is logged")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config entry (a YAML value, coerced to the entry's type), e.g. --set "
                        "train.steps=10, --set optim.lr=1e-3, --set data.sources=[DIR1,DIR2]")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config, batch arithmetic, shard "
                   "assignment per rank/worker and the resume plan; do not train (no launcher needed)")
    p.add_argument("--world-size", type=int, help="--dry-run: the number of GPUs to plan for (default: the "
                   "launcher's WORLD_SIZE, else 1)")
    p.add_argument("--gpu-tflops", type=float, help="--dry-run: sustained training TFLOP/s per GPU for the GPU-days "
                   "estimate (default 16.2, the reference's V100 rate)")
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # set by the launcher
    return p.parse_args(argv)


def load(args) -> tuple[ExperimentConfig, dict]:
    """(experiment config: --config with the --set overrides, DeepSpeed JSON); user errors as SystemExit."""
    try:
        cfg = ExperimentConfig.from_yaml(args.config, parse_overrides(args.set))
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    return cfg, load_ds_config(args.deepspeed_config)


def load_ds_config(path: str | Path) -> dict:
    """The DeepSpeed JSON at `path`, checked: a mapping without batch keys (see the module docstring)."""
    ds_path = Path(path)
    if not ds_path.is_file():
        raise SystemExit(f"error: --deepspeed_config {ds_path}: no such file (see ds_configs/)")
    try:
        ds = json.loads(ds_path.read_text())
    except ValueError as e:
        raise SystemExit(f"error: --deepspeed_config {ds_path}: not valid JSON ({e})") from None
    if not isinstance(ds, dict):
        raise SystemExit(f"error: --deepspeed_config {ds_path}: expected a JSON object of DeepSpeed settings")
    batch = [k for k in DS_BATCH_KEYS if k in ds]
    if batch:
        where = ", ".join(f"{k} -> {DS_BATCH_KEYS[k]}" for k in batch)
        raise SystemExit(f"error: --deepspeed_config {ds_path} sets {batch}: batch sizes belong to the experiment "
                         f"config ({where}; e.g. --set train.global_batch=256). Remove them from the JSON")
    return ds


def dry_run(args, cfg, ds) -> None:
    """Print the --dry-run report (rank 0 only, when launched)."""
    from trainer.train.dryrun import dry_run as report

    if int(os.environ.get("RANK", "0")) == 0:
        from trainer.train.dryrun import REFERENCE_V100_TFLOPS

        print(report(cfg, ds, args.run_dir, args.world_size or int(os.environ.get("WORLD_SIZE", "1")), args.resume,
                     tflops=args.gpu_tflops or REFERENCE_V100_TFLOPS))
