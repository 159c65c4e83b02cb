"""Convert a run's checkpoint to DeepSpeed's universal form ahead of time, so it loads on any number of GPUs:

    python -m trainer.checkpoints RUN_DIR [--tag TAG]      # writes RUN_DIR/checkpoints/TAG_universal

Training does this by itself when it resumes on another world size (`trainer/train/checkpoints.py` says how);
converting first, e.g. on a login node, keeps a large model's conversion off the GPUs' clock.
"""
from __future__ import annotations

import argparse

from trainer.train.checkpoints import convert_to_universal, latest_tag
from trainer.train.rundir import RunDir


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m trainer.checkpoints", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a training run directory (with checkpoints/)")
    p.add_argument("--tag", help="checkpoint tag to convert (default: the latest)")
    args = p.parse_args(argv)
    ckpt_dir = RunDir(args.run_dir).checkpoints
    tag = args.tag or latest_tag(ckpt_dir)
    if tag is None or not (ckpt_dir / tag).is_dir():
        raise SystemExit(f"error: no checkpoint {tag or '(latest)'} under {ckpt_dir}")
    print(ckpt_dir / convert_to_universal(ckpt_dir, tag))


if __name__ == "__main__":
    main()
