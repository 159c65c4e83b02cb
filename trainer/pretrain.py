"""Masked pre-training (MaskDM):

    deepspeed [--num_gpus N | --hostfile H] trainer/pretrain.py --config configs/X.yaml \
        --deepspeed_config ds_configs/zero2_fp16.json --run-dir runs/X [--resume auto|none|TAG] [--until-step N]
        [--time-limit SECONDS]
    python trainer/pretrain.py ... --dry-run [--world-size 16]     # the plan: batch arithmetic, shards per rank

Everything about the experiment is in the YAML (`--set section.key=value` overrides one entry); the DeepSpeed
JSON holds the ZeRO stage, precision and gradient clipping. On CPU: `DS_ACCELERATOR=cpu deepspeed --num_gpus 2 ...`.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by the deepspeed launcher: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.train.cli import dry_run, load, parse  # noqa: E402


def main(argv=None) -> None:
    from trainer.data.shards import check_sources
    from trainer.train.loop import training_loop

    args = parse(argv, __doc__)
    cfg, ds = load(args)
    if args.dry_run:
        return dry_run(args, cfg, ds)
    check_sources(cfg.data.sources)  # before the run directory exists
    training_loop(cfg, ds_config=ds, run_dir=args.run_dir, resume=args.resume, until_step=args.until_step,
                  time_limit=args.time_limit)


if __name__ == "__main__":
    from trainer.train.distributed import end_job_on_failure

    end_job_on_failure(main)  # a rank that fails leaves at once: the launcher then ends the other ranks
