"""Masked pre-training (MaskDM):

    deepspeed [--num_gpus N | --hostfile H] trainer/pretrain.py --config configs/X.yaml \
        --deepspeed_config ds_configs/zero2_fp16.json --run-dir runs/X [--resume auto|none|TAG] [--until-step N]
        [--time-limit SECONDS]
    python trainer/pretrain.py ... --dry-run [--world-size 16]     # the plan: batch arithmetic, shards per rank

Everything about the experiment is in the YAML (`--set section.key=value` overrides one entry); the DeepSpeed
JSON holds the ZeRO stage, precision and gradient clipping. On CPU: `DS_ACCELERATOR=cpu deepspeed --num_gpus 2 ...`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by the deepspeed launcher: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.config import ExperimentConfig, parse_overrides  # noqa: E402


def parse(argv=None, description=__doc__, extra=()) -> argparse.Namespace:
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
    ds_path = Path(args.deepspeed_config)
    if not ds_path.is_file():
        raise SystemExit(f"error: --deepspeed_config {ds_path}: no such file (see ds_configs/)")
    try:
        return cfg, json.loads(ds_path.read_text())
    except ValueError as e:
        raise SystemExit(f"error: --deepspeed_config {ds_path}: not valid JSON ({e})") from None


def dry_run(args, cfg, ds) -> None:
    import os

    from trainer.dryrun import dry_run as report

    if int(os.environ.get("RANK", "0")) == 0:
        from trainer.dryrun import REFERENCE_V100_TFLOPS

        print(report(cfg, ds, args.run_dir, args.world_size or int(os.environ.get("WORLD_SIZE", "1")), args.resume,
                     tflops=args.gpu_tflops or REFERENCE_V100_TFLOPS))


def main(argv=None) -> None:
    from trainer.data import check_sources
    from trainer.loop import training_loop

    args = parse(argv)
    cfg, ds = load(args)
    if args.dry_run:
        return dry_run(args, cfg, ds)
    check_sources(cfg.data.sources)  # before the run directory exists
    training_loop(cfg, ds_config=ds, run_dir=args.run_dir, resume=args.resume, until_step=args.until_step,
                  time_limit=args.time_limit)


if __name__ == "__main__":
    main()
