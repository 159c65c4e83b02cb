"""Sample images from a trained model's EMA weights:

    python -m trainer.sample --ckpt RUN_DIR_OR_SAFETENSORS_OR_URL --n 64 --steps 250 --sampler ddim --eta 1.0 \
        --seed 0 [--clip-mode rederive|reference] [--out samples/run1]  # default --out: samples/<name>-step<N>
    torchrun --nproc_per_node 8 -m trainer.sample --ckpt ... --num-images 10000 --out samples/fid10k  # 8 GPUs
    deepspeed --num_gpus 8 trainer/sample.py --ckpt ... --num-images 10000 --out samples/fid10k       # the same

Image i is drawn from its own generator, seeded with (seed, i), and rank r of a multi-GPU launch takes a
contiguous slice of the indices: the same seed gives the same images whatever the GPU count and batch size
(up to the last bit of batched float maths, which the uint8 rounding hides almost always). Writes
OUT/images/000000.png ..., OUT/grid.png (the first 64) and OUT/sample.json (what was sampled, from what).
Sampling into an OUT that already holds some of the images (e.g. a killed job) only draws the missing ones;
an OUT made with other settings is refused. DWT models are turned into RGB through the inverse Haar transform.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by the deepspeed launcher: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from trainer.diffusion import CLIP_MODES, SAMPLERS, alphas_cumprod, make_betas, make_clip, sample  # noqa: E402
from trainer.images import save_grid, to_rgb_uint8  # noqa: E402

__all__ = ["image_generators", "generate", "sample_to_folder", "distributed_context", "default_out"]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def image_generators(seed: int, indices, device: str = "cpu") -> list[torch.Generator]:
    """One generator per image index, seeded with (seed, index): independent of batching and GPU count."""
    return [torch.Generator(device).manual_seed(int(np.random.SeedSequence([seed, int(i)]).generate_state(1)[0]))
            for i in indices]


@torch.no_grad()
def generate(model: torch.nn.Module, cfg, indices, *, seed: int = 0, steps: int = 250, sampler: str = "ddim",
             eta: float = 1.0, dtype: torch.dtype = torch.float32, clip_mode: str = "rederive") -> torch.Tensor:
    """(len(indices), H, W, 3) uint8 RGB images number `indices` of the stream fixed by `seed`."""
    m = cfg.model
    device = next(model.parameters()).device
    ab = alphas_cumprod(make_betas(cfg.train.schedule))

    def eps_fn(x, t):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            return model(x, t).float()

    x = sample(eps_fn, (len(indices), m.in_channels, m.model_size, m.model_size), ab, sampler=sampler,
               steps=steps, eta=eta, clip=make_clip(m.input), generator=image_generators(seed, indices),
               device=device, clip_mode=clip_mode)
    return to_rgb_uint8(x, m.input)


def distributed_context() -> tuple[int, int, torch.device]:
    """(rank, world, device) from the launcher's environment (torchrun / deepspeed set RANK, WORLD_SIZE,
    LOCAL_RANK); a process group is started for multi-process launches (gloo on CPU, nccl on GPUs)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if world > 1 and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
    return rank, world, device


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
        return Path("samples") / f"{path.parent.parent.name}-{path.name}"
    step = meta.get("step")
    return Path("samples") / ((path.name or "model") + (f"-step{step}" if step is not None else ""))


def _settings(args, meta: dict) -> dict:
    return {"ckpt": args.ckpt, "model_step": meta.get("step"), "n": args.n, "steps": args.steps,
            "sampler": args.sampler, "eta": args.eta, "clip_mode": args.clip_mode, "seed": args.seed}


def sample_to_folder(model, cfg, out: str | Path, *, n: int, seed: int = 0, steps: int = 250,
                     sampler: str = "ddim", eta: float = 1.0, batch: int = 16, dtype: torch.dtype = torch.float32,
                     rank: int = 0, world: int = 1, progress: bool = True, clip_mode: str = "rederive") -> list[Path]:
    """Images 0..n-1 as OUT/images/NNNNNN.png; this rank draws its slice, skipping files that exist.
    Returns the paths of this rank's images."""
    folder = Path(out) / "images"
    folder.mkdir(parents=True, exist_ok=True)
    mine = range(rank * n // world, (rank + 1) * n // world)
    paths = [folder / f"{i:06d}.png" for i in mine]
    todo = [i for i, p in zip(mine, paths) if not p.exists()]
    from PIL import Image

    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), unit="img", desc=f"sampling (rank {rank})",
               disable=not progress, dynamic_ncols=True)
    for start in range(0, len(todo), batch):
        chunk = todo[start:start + batch]
        images = generate(model, cfg, chunk, seed=seed, steps=steps, sampler=sampler, eta=eta, dtype=dtype,
                          clip_mode=clip_mode)
        for i, img in zip(chunk, images.numpy()):
            tmp = folder / f".{i:06d}.png.tmp"
            Image.fromarray(img).save(tmp, format="PNG")
            os.replace(tmp, folder / f"{i:06d}.png")  # a killed job never leaves a half-written image
        bar.update(len(chunk))
    bar.close()
    return paths


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="run dir, checkpoint tag dir, .safetensors or published URL")
    p.add_argument("--n", "--num-images", dest="n", type=int, default=64,
                   help="number of images (spell it --num-images after a launcher: deepspeed and torchrun take "
                        "--n for an abbreviation of their own flags)")
    p.add_argument("--steps", type=int, default=250, help="sampler steps (1..1000)")
    p.add_argument("--sampler", default="ddim", choices=SAMPLERS)
    p.add_argument("--eta", type=float, default=1.0, help="DDIM eta (1, the default: DDPM-like, as the reference "
                   "evaluates; 0: deterministic)")
    p.add_argument("--clip-mode", default="rederive", choices=CLIP_MODES,
                   help="DDIM after clipping x0: rederive eps from the clipped x0 (default, ours) or keep the model's "
                        "raw eps (reference: the MaskDM reference implementation's sampler)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output folder (default: samples/<checkpoint name>-step<N>)")
    p.add_argument("--batch", type=int, default=16, help="images per forward pass, per GPU")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="autocast dtype of the model on GPUs")
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    args = p.parse_args(argv)
    if args.n < 1 or args.batch < 1:
        raise SystemExit("error: --n and --batch must be >= 1")
    from trainer.weights import load_model

    rank, world, device = distributed_context()
    model, cfg, meta = load_model(args.ckpt, device=device)
    out = Path(args.out) if args.out else default_out(args.ckpt, meta)
    if rank == 0:
        print(f"sampling {args.n} images from {args.ckpt} (step {meta.get('step')}) into {out}", flush=True)
    settings = _settings(args, meta)
    record = out / "sample.json"
    old = {"clip_mode": "rederive", **json.loads(record.read_text())} if record.exists() else None  # older records
    if old is not None and {k: v for k, v in old.items() if k in settings} != settings:
        raise SystemExit(f"error: --out {out} holds samples made with other settings ({record}): "
                         f"choose another --out or delete it")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({**settings, "input": cfg.model.input, "image_size": cfg.model.image_size},
                                     indent=1))
    sample_to_folder(model, cfg, out, n=args.n, seed=args.seed, steps=args.steps, sampler=args.sampler,
                     eta=args.eta, batch=args.batch, dtype=DTYPES[args.dtype], rank=rank, world=world,
                     progress=rank == 0, clip_mode=args.clip_mode)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        from PIL import Image

        first = sorted((out / "images").glob("[0-9]*.png"))[:64]
        grid = save_grid(np.stack([np.asarray(Image.open(f).convert("RGB")) for f in first]), out / "grid.png")
        print(json.dumps({"images": args.n, "out": str(out), "folder": str(out / "images"), "grid": str(grid)}))


if __name__ == "__main__":
    main()
