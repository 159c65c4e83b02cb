"""Model size and cost: parameters and forward FLOPs per image for every preset and mask rate, and the measured
masked-vs-unmasked forward time ratio of preset B (90% block-wise masking vs none, same batch).

    python bench/model_flops.py                     # CPU, fp32, batch 2 (the figures in docs/performance.md)
    python bench/model_flops.py --device cuda --dtype fp16 --batch 32

FLOPs count matmuls and attention (2 per multiply-add), from `trainer.core.models.flops_per_image`, which the tests
check against torch's FlopCounterMode. Timings alternate the two cases in each repeat so that machine noise hits
both alike; the table reports the median.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from trainer.core import settings
from trainer.core.masking import num_visible, visible_indices
from trainer.core.models import build_model, flops_per_image
from trainer.core.settings import torch_dtype

# The paper's settings for each preset: (input channels, model input side) -> token grid side / patch 4.
SETTINGS = {"S": (3, 64), "B": (3, 256), "L": (12, 128)}
RATES = (0.0, 0.5, 0.7, 0.9)
BLOCK = 4
DTYPES = {name: torch_dtype(name) for name in settings.DTYPES}


def flops_table() -> None:
    print(f"{'preset':<6} {'input':<11} {'params':>12} {'mask':>5} {'visible':>9} {'GFLOPs/img':>11} {'vs rate 0':>9}")
    for preset, (channels, size) in SETTINGS.items():
        with torch.device("meta"):
            model = build_model(preset, channels, size)
        params = sum(p.numel() for p in model.parameters())
        full = flops_per_image(model.cfg)
        for rate in RATES:
            S = num_visible("block", model.cfg.grid, rate, BLOCK)
            f = flops_per_image(model.cfg, S)
            print(f"{preset:<6} {f'{channels}x{size}x{size}':<11} {params:>12,} {rate:>5.1f} "
                  f"{f'{S}/{model.cfg.num_tokens}':>9} {f / 1e9:>11.2f} {f / full:>9.3f}")


def time_forward(model, x, t, visible, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        model(x, t, visible=visible)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def timing_table(args) -> None:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    channels, size = SETTINGS[args.preset]
    torch.manual_seed(0)
    model = build_model(args.preset, channels, size).to(device=device, dtype=dtype).eval()
    x = torch.randn(args.batch, channels, size, size, device=device, dtype=dtype)
    t = torch.randint(0, 1000, (args.batch,), device=device)
    g = torch.Generator(device=device).manual_seed(0)
    visible = visible_indices("block", model.cfg.grid, args.rate, args.batch, block=BLOCK, generator=g)
    cases = {"rate 0": None, f"rate {args.rate} block": visible}
    for v in cases.values():  # warm-up (allocator, kernels)
        time_forward(model, x, t, v, device)
    times = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, v in cases.items():
            times[name].append(time_forward(model, x, t, v, device))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    base = med["rate 0"]
    print(f"\nforward time, preset {args.preset} {channels}x{size}x{size}, batch {args.batch}, {args.dtype} on "
          f"{device_name(device)}, median of {args.repeats}")
    print(f"{'case':<18} {'visible':>9} {'s/batch':>9} {'img/s':>8} {'time vs rate 0':>15} {'FLOPs vs rate 0':>16}")
    for name, v in cases.items():
        S = model.cfg.num_tokens if v is None else v.shape[1]
        fr = flops_per_image(model.cfg, S) / flops_per_image(model.cfg)
        print(f"{name:<18} {S:>9} {med[name]:>9.3f} {args.batch / med[name]:>8.2f} {med[name] / base:>15.3f} "
              f"{fr:>16.3f}")
    print(f"speed-up of {args.rate:.0%} masking: {base / med[f'rate {args.rate} block']:.1f}x")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="B", choices=list(SETTINGS))
    p.add_argument("--rate", type=float, default=0.9)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--no-timing", action="store_true", help="print the FLOPs table only")
    args = p.parse_args()
    print(f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    flops_table()
    if not args.no_timing:
        timing_table(args)


if __name__ == "__main__":
    main()
