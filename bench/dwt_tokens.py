"""DWT tokenisation, joint vs split (config model.dwt_tokens), on the same batch: parameters, forward FLOPs per
image and the time of one training step (forward on the visible tokens, the loss, backward, AdamW).

    python bench/dwt_tokens.py                          # L at 256 px (12 bands at 128x128, patch 4), CPU, batch 2
    python bench/dwt_tokens.py --preset S --batch 8     # a smaller model
    python bench/dwt_tokens.py --device cuda --batch 16 --dtype bf16

joint (ours): one token per 4x4 cell of all 12 bands, 1024 tokens at 256 px. split (the reference): cA and the 9
detail bands as two token sets of 1024 each, masked independently at the same rate, 2048 tokens. Both see the same
images, steps and noise; masks are patch masks (the reference's DWT run) at --rates. The two variants take turns
within each repeat so machine noise hits both alike; the table gives the median step time and the split/joint
ratios. FLOPs: `trainer.core.models.flops_per_image` (matmuls and attention, 2 per multiply-add; checked against
torch's FlopCounterMode in tests/test_uvit.py); a training step is ~3x the forward.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from trainer.core.diffusion import alphas_cumprod, make_betas, msm_loss
from trainer.core.masking import visible_indices
from trainer.core.models import build_model, flops_per_image


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="L")
    p.add_argument("--image-size", type=int, default=256, help="image side in px (the model sees half: DWT)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rates", type=float, nargs="+", default=[0.7, 0.0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    side = a.image_size // 2
    ab = alphas_cumprod(make_betas("cosine"))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(a.batch, 12, side, side, generator=g).to(device)
    noise = torch.randn(a.batch, 12, side, side, generator=g).to(device)
    t = torch.randint(0, 1000, (a.batch,), generator=g).to(device)

    models = {}
    for mode in ("joint", "split"):
        torch.manual_seed(0)
        model = build_model(a.preset, 12, side, 4, split_bands=3 if mode == "split" else 0).to(device).train()
        models[mode] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.99, 0.99)))

    def step(mode: str, visible) -> float:
        model, opt = models[mode]
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = msm_loss(model, x0, t, noise, ab, visible, "bands")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"# {a.preset} DWT {a.image_size} px (model input 12x{side}x{side}, patch 4), batch {a.batch}, {a.dtype}, "
          f"{where}, torch {torch.__version__}")
    print(f"{'mask':>5} {'tokens':>7} | {'params joint':>13} {'params split':>13} | {'GFLOP/img joint':>16} "
          f"{'split':>8} {'ratio':>6} | {'step s joint':>12} {'split':>8} {'ratio':>6}")
    for rate in a.rates:
        grid = models["joint"][0].cfg.grid
        vis = {"joint": visible_indices("patch", grid, rate, a.batch, generator=g) if rate else None,
               "split": visible_indices("patch", grid, rate, a.batch, generator=g, sets=2) if rate else None}
        for mode in models:  # warm-up: allocator, kernels, AdamW state
            step(mode, vis[mode])
        times = {mode: [] for mode in models}
        for _ in range(a.repeats):
            for mode in models:
                times[mode].append(step(mode, vis[mode]))
        tokens = {m: (vis[m].shape[1] if vis[m] is not None else models[m][0].cfg.num_tokens) for m in models}
        flops = {m: flops_per_image(models[m][0].cfg, tokens[m]) / 1e9 for m in models}
        params = {m: sum(p.numel() for p in models[m][0].parameters()) for m in models}
        med = {m: statistics.median(times[m]) for m in models}
        print(f"{rate:>5.2f} {tokens['joint']:>3}/{tokens['split']:<3} | {params['joint']:>13,} "
              f"{params['split']:>13,} | {flops['joint']:>16.1f} {flops['split']:>8.1f} "
              f"{flops['split'] / flops['joint']:>6.2f} | {med['joint']:>12.2f} {med['split']:>8.2f} "
              f"{med['split'] / med['joint']:>6.2f}")


if __name__ == "__main__":
    main()
