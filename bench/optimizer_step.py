"""What an optimiser step costs under DeepSpeed's ZeRO stages against torch's AdamW alone, fused or not.

    python bench/optimizer_step.py                      # CPU: preset S, fp32, one rank
    python bench/optimizer_step.py --malloc             # also with glibc keeping large blocks (see below)
    python bench/optimizer_step.py --device cuda --presets S B

Each case runs in its own spawned process (bench/trainer_overhead.py's `spawned`) as a one-rank job: the
model, a forward and backward of a random batch, then `--steps` timed optimiser steps after 2 untimed ones. "torch"
is `torch.optim.AdamW` (fused, or torch's default: a loop over tensors on CPU, foreach on CUDA) with
`clip_grad_norm_` (the step of bench/train_step.py plus the clipping the trainer's DeepSpeed JSONs ask for);
"ZeRO-k" is `engine.step()` of `deepspeed.initialize` with that AdamW and `gradient_clipping: 1.0`. Under ZeRO-1/2
DeepSpeed copies the gradients into one flat fp32 partition, steps it and copies the weights back: on CPU each such
step allocates parameter-sized buffers whose pages the kernel zero-fills anew each time (glibc returns blocks above
its mmap threshold to the OS). `--malloc` adds rows with MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ at 4 GiB,
which keeps those blocks in the process: the share of the step that is page faults.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(4 << 30), "MALLOC_TRIM_THRESHOLD_": str(4 << 30)}


def _case(preset: str, stage: int | None, fused: bool, device: str, batch: int, steps: int) -> tuple[int, float]:
    import torch

    from train_step import SIDES  # bench/ is the script's folder
    from trainer.core.models import build_model

    channels, size = SIDES[preset]
    torch.manual_seed(0)
    dev = torch.device(device)
    model = build_model(preset, channels, size).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
    net = model
    if stage is not None:
        import deepspeed

        from trainer.train.distributed import init_distributed_quietly

        init_distributed_quietly()
        ds = {"train_batch_size": batch, "train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage}, "gradient_clipping": 1.0, "steps_per_print": 10**9}
        net, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    x = torch.randn(batch, channels, size, size, device=dev)
    t = torch.randint(0, 1000, (batch,), device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    times = []
    for i in range(steps + 2):
        loss = net(x, t).float().pow(2).mean()
        net.backward(loss) if stage is not None else loss.backward()
        sync()
        start = time.perf_counter()
        if stage is not None:
            net.step()
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return sum(p.numel() for p in model.parameters()), statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["S"])
    p.add_argument("--stages", nargs="+", default=["torch", "0", "1", "2"], help="torch and/or ZeRO stages")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="timed steps (median)")
    p.add_argument("--malloc", action="store_true", help="also run each case with glibc keeping large blocks")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    from model_flops import device_name
    from trainer_overhead import spawned

    print(f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}, {device_name(torch.device(args.device))}, "
          f"median of {args.steps} optimiser steps, ms")
    print("| preset | params | step | AdamW | malloc | ms | vs torch fused |")
    print("|---|---:|---|---|---|---:|---:|")
    for preset in args.presets:
        base = None
        for malloc in [False, True] if args.malloc else [False]:
            for stage in args.stages:
                for fused in (True, False):
                    zero = None if stage == "torch" else int(stage)
                    n, sec = spawned(_case, preset, zero, fused, args.device, args.batch, args.steps,
                                     env=MALLOC if malloc else None)
                    base = sec if base is None else base
                    name = "torch" if zero is None else f"ZeRO-{zero}"
                    print(f"| {preset} | {n / 1e6:.1f}M | {name} | {'fused' if fused else 'default'} | "
                          f"{'4 GiB thresholds' if malloc else 'default'} | {1e3 * sec:.0f} | {sec / base:.2f}x |",
                          flush=True)


if __name__ == "__main__":
    main()
