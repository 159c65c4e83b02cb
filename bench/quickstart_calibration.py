"""Calibration of the quickstart's model: training-step time of candidate tiny U-ViTs at 32 px on this CPU, for the
90%-masked pre-training step and the unmasked fine-tuning step, per process with the thread count a rank gets.

    python bench/quickstart_calibration.py                      # the candidates below, 1 thread (one of 2 ranks)
    python bench/quickstart_calibration.py --threads 2 --batch 32 64

The quickstart runs 2 DeepSpeed ranks on 2 cores, so each rank's step is a 1-thread step on its micro batch (plus
a gloo all-reduce of the gradients, not measured here). Columns: parameters, ms per step (median of --repeats)
masked and unmasked, and images/s per rank. The choice and the measured quality are in docs/performance.md.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from trainer.core.diffusion import alphas_cumprod, make_betas, msm_loss
from trainer.core.masking import visible_indices
from trainer.core.models import build_model

# name: (patch size, UViTConfig overrides)
CANDIDATES = {
    "d256-p4-2.1.2": (4, dict(dim=256, heads=4, depth=(2, 1, 2))),
    "d256-p4-4.1.4": (4, dict(dim=256, heads=4, depth=(4, 1, 4))),
    "d384-p4-3.1.3": (4, dict(dim=384, heads=6, depth=(3, 1, 3))),
    "d192-p2-2.1.2": (2, dict(dim=192, heads=3, depth=(2, 1, 2))),
    "d128-p2-2.1.2": (2, dict(dim=128, heads=4, depth=(2, 1, 2))),
    "d128-p2-1.1.1": (2, dict(dim=128, heads=4, depth=(1, 1, 1))),
    "d96-p2-2.1.2": (2, dict(dim=96, heads=3, depth=(2, 1, 2))),
    "d256-p2-2.1.2": (2, dict(dim=256, heads=4, depth=(2, 1, 2))),
}


def step_ms(model, opt, batch: int, rate: float, block: int, repeats: int, gen: torch.Generator) -> float:
    ab = alphas_cumprod(make_betas("cosine"))
    x0 = torch.rand(batch, 3, 32, 32, generator=gen) * 2 - 1
    times = []
    for i in range(repeats + 2):  # two warm-up steps
        t0 = time.perf_counter()
        t = torch.randint(0, 1000, (batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        visible = visible_indices("block", model.cfg.grid, rate, batch, block, gen) if rate > 0 else None
        loss = msm_loss(model, x0, t, noise, ab, visible)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    p.add_argument("--batch", type=int, nargs="+", default=[16, 32])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--rate", type=float, default=0.9)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    gen = torch.Generator().manual_seed(0)
    print(f"threads {a.threads}, 32 px, block mask rate {a.rate} (block 2 patches), AdamW, fp32")
    print(f"{'model':<16}{'params':>9}{'batch':>7}{'masked ms':>11}{'full ms':>9}{'ratio':>7}{'full img/s':>12}")
    for name in a.candidates:
        patch, over = CANDIDATES[name]
        model = build_model("tiny", 3, 32, patch, **over)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        n = sum(q.numel() for q in model.parameters())
        for b in a.batch:
            masked = step_ms(model, opt, b, a.rate, 2, a.repeats, gen)
            full = step_ms(model, opt, b, 0.0, 2, a.repeats, gen)
            print(f"{name:<16}{n / 1e6:>8.2f}M{b:>7}{masked:>11.1f}{full:>9.1f}{full / masked:>7.1f}"
                  f"{b / full * 1000:>12.0f}", flush=True)


if __name__ == "__main__":
    main()
