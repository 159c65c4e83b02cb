"""Training-step throughput and memory per device: presets x mask rates (0, 0.5, 0.7, 0.9 block-wise 4x4), with
the ratio to rate 0, and model FLOP utilisation on GPUs.

    python bench/train_step.py                                   # CPU, fp32: presets tiny and S, batch 4
    python bench/train_step.py --device cuda --dtype fp16 bf16 --presets S B L --batch 32

One step is what the trainer does per micro-batch, without data loading or communication: forward on the
visible tokens, the masked score-matching loss, backward, AdamW (fp32 master weights; fp16 under autocast with
a gradient scaler, bf16 under autocast). The rates take turns within each repeat so that machine noise hits all
alike; the table reports the median. Columns:
- img/s: images per second per device; `vs rate 0`: its ratio to the unmasked step of the same preset/dtype.
- act MB: bytes the forward saves for backward, weights excluded (activations; saved-tensor hooks, any device).
- peak MB: CUDA only, torch.cuda.max_memory_allocated over the timed steps (weights, grads, AdamW state included).
- TFLOP/s and MFU: 3 x forward FLOPs of the visible tokens (trainer.core.models.flops_per_image) per second, over the
  GPU's dense fp16/bf16 peak (a table of known GPUs, or --peak-tflops).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from model_flops import DTYPES, SETTINGS, device_name  # bench/ is the script's folder
from trainer.core.diffusion import alphas_cumprod, make_betas, msm_loss
from trainer.core.masking import visible_indices
from trainer.core.models import build_model, flops_per_image
from trainer.train.loop import adamw_fused

SIDES = {**SETTINGS, "tiny": (3, 64)}
RATES = (0.0, 0.5, 0.7, 0.9)
BLOCK = 4
PEAK_TFLOPS = {"V100": 125.0, "A100": 312.0, "H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "L40S": 362.0}


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def saved_bytes(fn, model: torch.nn.Module) -> int:
    """Bytes of the distinct storages autograd saves for backward while `fn()` runs, not counting the weights
    (nor their autocast copies: saved tensors shaped like a parameter)."""
    seen: dict[int, int] = {}
    weight_shapes = {tuple(p.shape) for p in model.parameters()}

    def pack(t):
        if tuple(t.shape) not in weight_shapes:
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


class Case:
    def __init__(self, preset, dtype, batch, rate, device, seed=0, grad_checkpoint=False):
        channels, size = SIDES[preset]
        torch.manual_seed(seed)
        self.model = build_model(preset, channels, size, grad_checkpoint=grad_checkpoint).to(device)
        self.dtype, self.device = dtype, device
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=adamw_fused(device))  # as the loop
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        g = torch.Generator().manual_seed(seed)
        self.x0 = torch.randn(batch, channels, size, size, generator=g).to(device)
        self.noise = torch.randn(self.x0.shape, generator=g).to(device)
        self.t = torch.randint(0, 1000, (batch,), generator=g).to(device)
        self.ab = alphas_cumprod(make_betas("cosine"))
        grid = self.model.cfg.grid
        self.visible = visible_indices("block", grid, rate, batch, BLOCK, g) if rate > 0 else None
        self.tokens = self.model.cfg.num_tokens if self.visible is None else self.visible.shape[1]

    def loss(self):
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            return msm_loss(self.model, self.x0, self.t, self.noise, self.ab, self.visible)

    def step(self):
        self.scaler.scale(self.loss()).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)

    def timed(self, steps: int) -> float:
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync()
        return (time.perf_counter() - start) / steps


def run(preset, dtype_name, args, device, peak, grad_checkpoint=False) -> None:
    dtype = DTYPES[dtype_name]
    cases = {rate: Case(preset, dtype, args.batch, rate, device, grad_checkpoint=grad_checkpoint) for rate in RATES}
    act = {}
    for rate, c in cases.items():
        act[rate] = saved_bytes(c.loss, c.model) / 2**20
        c.opt.zero_grad(set_to_none=True)
        c.timed(1)  # warm-up: allocator, kernels, optimizer state
    times = {rate: [] for rate in cases}
    peaks = {}
    for _ in range(args.repeats):
        for rate, c in cases.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times[rate].append(c.timed(args.steps))
            if device.type == "cuda":
                peaks[rate] = max(peaks.get(rate, 0), torch.cuda.max_memory_allocated(device) / 2**20)
    base = statistics.median(times[0.0])
    for rate, c in cases.items():
        sec = statistics.median(times[rate])
        ips = args.batch / sec
        tflops = 3 * flops_per_image(c.model.cfg, c.tokens) * ips / 1e12
        channels, size = SIDES[preset]
        print(f"| {preset}{' (ckpt)' if grad_checkpoint else ''} | {channels}x{size}x{size} | {dtype_name} | "
              f"{rate:.1f} | {c.tokens} | {ips:.2f} | "
              f"{base / sec:.2f}x | {act[rate]:.0f} | "
              f"{f'{peaks[rate]:.0f}' if rate in peaks else '-'} | {tflops:.2f} | "
              f"{f'{100 * tflops / peak:.1f}%' if peak and dtype != torch.float32 else '-'} |")
    del cases
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny", "S"], choices=list(SIDES))
    p.add_argument("--dtype", nargs="+", default=["fp32"], choices=list(DTYPES))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=2, help="steps per timing")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--peak-tflops", type=float, help="the device's dense fp16/bf16 peak, for MFU")
    p.add_argument("--grad-checkpoint", choices=("off", "on", "both"), default="off",
                   help="activation checkpointing per block (model.grad_checkpoint): both prints each preset twice, "
                        "the memory saved (act MB, peak MB) against the time lost (img/s)")
    args = p.parse_args()
    device = torch.device(args.device)
    peak = peak_tflops(device, args.peak_tflops)
    print(f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}, {device_name(device)}, batch {args.batch}, "
          f"median of {args.repeats} x {args.steps} steps" + (f", peak {peak} TFLOP/s" if peak else ""))
    print("| preset | input | dtype | mask | tokens | img/s | vs rate 0 | act MB | peak MB | TFLOP/s | MFU |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    modes = {"off": (False,), "on": (True,), "both": (False, True)}[args.grad_checkpoint]
    for preset in args.presets:
        for dtype_name in args.dtype:
            for gc in modes:
                run(preset, dtype_name, args, device, peak, gc)


if __name__ == "__main__":
    main()
