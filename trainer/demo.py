"""A single-process CPU demo of the whole path, on generated faces, in a few minutes on 2 cores:

    python -m trainer.demo --out runs/demo

1. generate synthetic cartoon faces (`pipeline.synthetic`) as JPEG files under OUT/source;
2. shard them with the real pipeline (`pipeline.shard folder`) into OUT/shards: 32 px crops in pixel mode (the
   default), or with `--mode dwt` 64 px crops with their stored Haar DWT (12 x 32 x 32; DWT mode needs several
   times more steps to give clean samples);
3. pre-train a small U-ViT with masked score matching, 90% block-wise masking (visible tokens only);
4. fine-tune the same weights with the ordinary denoising loss (mask rate 0);
5. sample from the EMA weights with DDIM; write `samples.png` beside `data.png` (crops read back from the
   shards) and `metrics.jsonl`.

It exercises exactly the library pieces the DeepSpeed trainer uses (masks, model, losses, samplers, DWT); the
production loop (streaming shards, ZeRO, checkpoints) is `trainer/pretrain.py` and `trainer/finetune.py`.
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.reader import iter_samples, load_manifest
from pipeline.schema import decode_dwt
from pipeline.shard import main as shard_main
from pipeline.store import Store
from pipeline.synthetic import synthetic_faces
from trainer.diffusion import alphas_cumprod, make_betas, make_clip, msm_loss, sample
from trainer.dwt import normalize_bands
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


def make_shards(out: Path, n: int, mode: str, seed: int) -> Path:
    """Synthetic faces -> JPEG files -> a shard set made by the real pipeline (reused if already complete)."""
    src = out / "source"
    if not src.is_dir():
        for i, face in enumerate(synthetic_faces(n, size=72, seed=seed)):
            path = src / f"id{i % 16:02d}" / f"{i:05d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(face).save(path, quality=95)
    shards = out / "shards"
    size = ["--size", "32", "--no-dwt"] if mode == "pixel" else ["--size", "64"]
    shard_main(["folder", "--src", str(src), "--out", str(shards), "--shard-size", "512", *size])
    return shards


def load_shards(shards: Path, mode: str) -> torch.Tensor:
    """Every sample of a local shard set as model input: pixel (N, 3, 32, 32) in [-1, 1], or the stored DWT
    bands normalised (N, 12, 32, 32). (The streaming DeepSpeed loader is trainer/data.py, issue 4.)"""
    store = Store(str(shards))
    xs = []
    for entry in load_manifest(store)["shards"]:
        for s in iter_samples(store.read_bytes(entry["name"])):
            if mode == "pixel":
                img = np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB"))
                xs.append(torch.from_numpy(img.copy()).permute(2, 0, 1).float() / 127.5 - 1)
            else:
                xs.append(normalize_bands(torch.from_numpy(decode_dwt(s["dwt.f16"], 64).astype(np.float32))[None])[0])
    return torch.stack(xs)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--mode", default="pixel", choices=["pixel", "dwt"])
    p.add_argument("--images", type=int, default=2048, help="synthetic training images")
    p.add_argument("--pretrain-steps", type=int, default=500)
    p.add_argument("--finetune-steps", type=int, default=500)
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

    data = load_shards(make_shards(out, args.images, args.mode, args.seed), args.mode)  # (N, C, 32, 32)
    save_grid(to_rgb_uint8(data[:16], args.mode), out / "data.png")
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
