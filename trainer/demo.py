"""A single-process CPU demo of the diffusion core, on synthetic faces, in about a minute:

    python -m trainer.demo --out runs/demo

1. generate synthetic faces (`pipeline.synthetic`): 32 px pixel mode by default, or `--mode dwt` for 64 px
   faces as their Haar DWT (12 x 32 x 32; it needs several times more steps to give clean samples);
2. pre-train a small U-ViT with masked score matching, 90% block-wise masking (visible tokens only);
3. fine-tune the same weights with the ordinary denoising loss (mask rate 0);
4. sample from the EMA weights with DDIM and write `samples.png` beside `data.png` and `metrics.jsonl`.

It exercises exactly the library pieces the DeepSpeed trainer uses (masks, model, losses, samplers, DWT); the
production loop (streaming shards, ZeRO, checkpoints) is `trainer/pretrain.py` and `trainer/finetune.py`.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from pipeline.synthetic import synthetic_faces
from trainer.diffusion import alphas_cumprod, make_betas, make_clip, msm_loss, sample
from trainer.dwt import dwt2, normalize_bands
from trainer.images import save_grid, to_rgb_uint8
from trainer.masking import visible_indices
from trainer.models import build_model


def train_phase(model, ema, data, ab, *, steps, rate, batch, lr, ema_decay, gen, log, phase):
    """One phase of the outline: batch -> mask -> loss -> backward -> step -> EMA -> log."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.99, 0.99), weight_decay=0.03)
    for step in range(1, steps + 1):
        x0 = data[torch.randint(0, len(data), (batch,), generator=gen)]
        t = torch.randint(0, len(ab), (batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        visible = visible_indices("block", model.cfg.grid, rate, batch, block=2, generator=gen) if rate else None
        loss = msm_loss(model, x0, t, noise, ab, visible)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        decay = min(ema_decay, (1 + step) / (10 + step))  # EMA warm-up: short runs are not stuck at init
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), model.parameters()):
                pe.lerp_(p, 1 - decay)
        if step % 50 == 0 or step == steps:
            log({"phase": phase, "step": step, "loss": round(loss.item(), 5), "mask_rate": rate})


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--mode", default="pixel", choices=["pixel", "dwt"])
    p.add_argument("--images", type=int, default=2048, help="synthetic training images")
    p.add_argument("--pretrain-steps", type=int, default=400)
    p.add_argument("--finetune-steps", type=int, default=300)
    p.add_argument("--mask-rate", type=float, default=0.9)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    start = time.time()

    faces = synthetic_faces(args.images, size=32 if args.mode == "pixel" else 64, seed=args.seed)  # (N, s, s, 3)
    save_grid(faces[:16], out / "data.png")
    pixels = torch.from_numpy(faces).permute(0, 3, 1, 2).float() / 255
    if args.mode == "pixel":
        data = pixels * 2 - 1  # (N, 3, 32, 32) in [-1, 1]
    else:
        data = normalize_bands(dwt2(pixels))  # (N, 12, 32, 32): cA in [-1, 3], details in [-1, 1]
    C = data.shape[1]
    ab = alphas_cumprod(make_betas("cosine"))
    model = build_model("tiny", C, 32, dim=256, heads=4, depth=(2, 1, 2))
    ema = copy.deepcopy(model).requires_grad_(False)

    metrics = open(out / "metrics.jsonl", "w")

    def log(record):
        record["seconds"] = round(time.time() - start, 1)
        print(json.dumps(record), flush=True)
        metrics.write(json.dumps(record) + "\n")

    common = dict(batch=args.batch, lr=1e-3, ema_decay=0.995, gen=gen, log=log)
    train_phase(model, ema, data, ab, steps=args.pretrain_steps, rate=args.mask_rate, phase="pretrain", **common)
    train_phase(model, ema, data, ab, steps=args.finetune_steps, rate=0.0, phase="finetune", **common)

    x = sample(ema.eval(), (16, C, 32, 32), ab, steps=args.sample_steps, clip=make_clip(args.mode),
               generator=torch.Generator().manual_seed(args.seed), progress=True)
    grid = save_grid(to_rgb_uint8(x, args.mode), out / "samples.png")
    log({"phase": "sample", "images": 16, "sampler": "ddim", "steps": args.sample_steps, "grid": str(grid)})
    metrics.close()
    print(f"wrote {out / 'data.png'} (training data) and {grid} (samples from the EMA weights)")


if __name__ == "__main__":
    main()
