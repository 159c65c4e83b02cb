"""Sample images from a trained model's EMA weights:

    python -m trainer.sample --ckpt RUN_DIR_OR_SAFETENSORS_OR_URL --n 64 --steps 250 --sampler ddim --eta 1.0 \
        --seed 0 [--clip-mode rederive|reference] [--out samples/run1]  # default --out: samples/<name>-step<N>
    torchrun --nproc_per_node 8 -m trainer.sample --ckpt ... --num-images 10000 --out samples/fid10k  # 8 GPUs
    deepspeed --num_gpus 8 trainer/sample.py --ckpt ... --num-images 10000 --out samples/fid10k       # the same

Image i is drawn from its own generator, seeded with (seed, i): the same seed gives the same images whatever the
GPU count and batch size (`trainer/core/sampling.py`). Writes
OUT/images/000000.png ..., OUT/grid.png (the first 64) and OUT/sample.json (what was sampled, from what).
Sampling into an OUT that already holds some of the images (e.g. a killed job) only draws the missing ones;
an OUT made with other settings is refused. DWT models are turned into RGB through the inverse Haar transform.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by the deepspeed launcher: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.core.settings import DTYPES, SamplingConfig  # noqa: E402
from trainer.train.rundir import RunDir  # noqa: E402


def default_out(ckpt: str, meta: dict) -> Path:
    """samples/<name>-step<N>, <name> that of the run dir, export folder (NAME/model.safetensors) or URL prefix, a
    tag folder adding its tag: another model, or a later step of the same run, never lands in this one's folder."""
    path = Path(ckpt.rstrip("/").split("://", 1)[-1])
    path = path if "://" in ckpt else path.resolve()
    if path.suffix == ".safetensors" or path.name == "index.json":
        path = path.parent if path.stem in ("model", "index") else path.with_suffix("")
    if path.name == "checkpoints":
        path = path.parent
    if path.parent.name == "checkpoints":  # RUN/checkpoints/TAG: the tag names the step
        return Path("samples") / f"{RunDir.of_checkpoint(path).root.name}-{path.name}"
    step = meta.get("step")
    return Path("samples") / ((path.name or "model") + (f"-step{step}" if step is not None else ""))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="run dir, checkpoint tag dir, .safetensors or published URL "
                   "(URL#sha256=HEX: refuse weights of another digest)")
    SamplingConfig.add_arguments(p, n_default=64)
    p.add_argument("--out", help="output folder (default: samples/<checkpoint name>-step<N>)")
    p.add_argument("--batch", type=int, default=16, help="images per forward pass, per GPU")
    p.add_argument("--dtype", default="fp32", choices=DTYPES, help="autocast dtype of the model on GPUs")
    p.add_argument("--allow-unverified", action="store_true", help="read --ckpt from a URL that has no checksum beside "
                   "it (NAME.safetensors.sha256); better: pin its digest, --ckpt URL#sha256=HEX")
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    args = p.parse_args(argv)
    if args.n < 1 or args.batch < 1:
        raise SystemExit("error: --n and --batch must be >= 1")
    sampling = SamplingConfig.from_args(args)
    from trainer.core.images import save_grid
    from trainer.core.sampling import sample_to_folder
    from trainer.core.settings import torch_dtype
    from trainer.train.distributed import distributed_context
    from trainer.weights.load import load_model

    rank, world, device = distributed_context()
    model, cfg, meta = load_model(args.ckpt, device=device, allow_unverified=args.allow_unverified)
    out = Path(args.out) if args.out else default_out(meta["source"], meta)  # (the source without its pin)
    if rank == 0:
        print(f"sampling {args.n} images from {args.ckpt} (step {meta.get('step')}) into {out}", flush=True)
    settings = {"ckpt": args.ckpt, "model_step": meta.get("step"), "n": sampling.n, "steps": sampling.steps,
                "sampler": sampling.sampler, "eta": sampling.eta, "clip_mode": sampling.clip_mode, "seed": sampling.seed}
    record = out / "sample.json"
    old = {"clip_mode": "rederive", **json.loads(record.read_text())} if record.exists() else None  # older records
    if old is not None and {k: v for k, v in old.items() if k in settings} != settings:
        raise SystemExit(f"error: --out {out} holds samples made with other settings ({record}): "
                         f"choose another --out or delete it")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({**settings, "input": cfg.model.input, "image_size": cfg.model.image_size},
                                     indent=1))
    sample_to_folder(model, cfg, out, sampling, batch=args.batch, dtype=torch_dtype(args.dtype), rank=rank,
                     world=world, progress=rank == 0)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        import numpy as np
        from PIL import Image

        first = sorted((out / "images").glob("[0-9]*.png"))[:64]
        grid = save_grid(np.stack([np.asarray(Image.open(f).convert("RGB")) for f in first]), out / "grid.png")
        print(json.dumps({"images": args.n, "out": str(out), "folder": str(out / "images"), "grid": str(grid)}))


if __name__ == "__main__":
    main()
