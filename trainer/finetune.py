"""Fine-tuning from pre-trained weights with the ordinary denoising objective (mask rate 0):

    deepspeed [--num_gpus N] trainer/finetune.py --init RUN_DIR_OR_SAFETENSORS_OR_URL \
        --config configs/celebahq_finetune_10pct_S.yaml --deepspeed_config ds_configs/zero2_fp16.json \
        --run-dir runs/ft10 [--resume auto] [--until-step N]

`--init` takes a DeepSpeed run, an exported .safetensors (local or s3://...) or a published model prefix
(`python -m trainer.export ... --publish URL`; its sha256 is verified). `--init URL#sha256=HEX` pins the weights'
digest (the model card gives it); a URL without a checksum beside it needs `--allow-unverified`.
`--init-weights online|ema` chooses the run's online weights (the default for a run: the reference fine-tunes from
them) or its EMA; an exported or published model holds the EMA only (the default there; asking it for online weights
is an error). The missing and
unexpected keys are reported; a shape mismatch stops with the names. Once the run has its own checkpoints,
running the same command resumes it (the --init weights are then not read again).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by the deepspeed launcher: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.train.cli import dry_run, load, parse  # noqa: E402
from trainer.weights.load import WEIGHTS  # noqa: E402


def main(argv=None) -> None:
    import torch.distributed as dist

    from pipeline.credentials import refuse_url_credentials
    from trainer.data.shards import check_sources
    from trainer.train.checkpoints import latest_tag
    from trainer.train.loop import training_loop
    from trainer.train.rundir import RunDir
    from trainer.weights.load import apply_pretrained, is_training_run, load_pretrained

    args = parse(argv, description=__doc__, extra=[
        ("--init", dict(required=True, help="pre-trained weights")),
        ("--init-weights", dict(choices=WEIGHTS, help="which weights of --init: online (the optimised weights, as the "
                                "reference fine-tunes; only a training run holds them) or ema (the averaged weights; "
                                "all an exported or published model holds). Default: online for a training run, "
                                "ema for an exported model")),
        ("--allow-unverified", dict(action="store_true", help="read --init from a URL that has no checksum beside it "
                                    "(NAME.safetensors.sha256); better: pin its digest, --init URL#sha256=HEX"))])
    cfg, ds = load(args)
    if args.dry_run:
        return dry_run(args, cfg, ds)
    if cfg.mask.rate != 0:
        raise SystemExit(f"error: {args.config}: fine-tuning trains on every patch; set mask.rate: 0 "
                         f"(it is {cfg.mask.rate})")
    check_sources(cfg.data.sources)  # before the run directory exists
    refuse_url_credentials(args.init, "--init")  # it is printed and kept in the run's records

    which = args.init_weights or ("online" if is_training_run(args.init) else "ema")

    def init(model):
        missing, unexpected = apply_pretrained(model, load_pretrained(args.init, which, args.allow_unverified))
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(json.dumps({"init": args.init, "init_weights": which, "missing_keys": missing,
                              "unexpected_keys": unexpected}), flush=True)

    # a run with a whole checkpoint of its own resumes from it (`--resume auto`: one that ever completed a save)
    resuming = args.resume != "none" and (args.resume != "auto" or latest_tag(RunDir(args.run_dir).checkpoints))
    training_loop(cfg, ds_config=ds, run_dir=args.run_dir, resume=args.resume, until_step=args.until_step,
                  time_limit=args.time_limit, init_model=None if resuming else init)


if __name__ == "__main__":
    from trainer.train.distributed import end_job_on_failure

    end_job_on_failure(main)  # a rank that fails leaves at once: the launcher then ends the other ranks
