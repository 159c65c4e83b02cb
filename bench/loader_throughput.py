"""Samples per second of one DataLoader worker, and how many workers keep a GPU fed.

    python bench/loader_throughput.py                 # 256 px: dwt.f16 shards and JPEG-only shards, local and S3
    python bench/loader_throughput.py --size 64 --no-s3

One worker is the training stream of one (rank, worker) slot read in this process (`ShardStream`, micro-batches of
--batch, resampled order, flips on), timed over --batches batches after one warm-up batch:
- dwt: shards with the precomputed `dwt.f16` member (the default for 256 px DWT models): the worker decodes the
  float16 bands, flips them in DWT space, and the batch goes to the device as is;
- jpeg: shards without it (`--no-dwt`): the worker decodes the JPEG to uint8 and the DWT is computed on the device
  from the batch (`to_model_input`); its cost there is in the "h2d" column of bench/trainer_overhead.py;
- local: shards on this machine's disk; s3: the same shards in a bucket of a moto S3 server on 127.0.0.1 (fsspec,
  the trainer's retrying reader), so the figure includes HTTP and the tar stream but no real network.
Then, per preset and mask rate, the model's training rate on a V100 / A100 / H100 from its FLOPs (3 x forward FLOPs
of the visible tokens, at --mfu of the GPU's dense fp16/bf16 peak) and the workers per GPU that rate needs from each
kind of shard (ceil(GPU img/s / worker img/s)): what `data.workers` should be at least.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # helpers.S3Server: the tests' moto server

GPUS = {"V100": 125.0, "A100": 312.0, "H100": 989.4}  # dense fp16/bf16 tensor TFLOP/s
MODELS = {"S": ("pixel", 64), "B": ("dwt", 256), "L": ("dwt", 256)}  # the presets at the paper's inputs


def worker_rate(source: str, mode: str, batch: int, batches: int) -> float:
    """Samples/s of one stream slot (this process, no DataLoader) over `batches` batches after one."""
    from trainer.data.stream import ShardStream, StreamConfig

    stream = iter(ShardStream(StreamConfig((source,), mode=mode, batch_size=batch, buffer=256, seed=0)))
    next(stream)
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    return batch * batches / (time.perf_counter() - start)


def gpu_rate(preset: str, rate: float, tflops: float, mfu: float) -> float:
    """Images/s of one training step at `mfu` of `tflops`, from the model's FLOPs."""
    import torch

    from trainer.core.masking import num_visible
    from trainer.core.models import build_model, flops_per_image

    mode, size = MODELS[preset]
    with torch.device("meta"):
        model = build_model(preset, 12 if mode == "dwt" else 3, size // 2 if mode == "dwt" else size)
    seen = num_visible("block", model.cfg.grid, rate, 4) if rate > 0 else None
    return tflops * 1e12 * mfu / (3 * flops_per_image(model.cfg, seen))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256, help="crop side of the shards")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOP utilisation on the GPUs")
    p.add_argument("--no-s3", action="store_true", help="local shards only")
    p.add_argument("--out", default="runs/bench-loader")
    args = p.parse_args()
    import torch

    from model_flops import device_name
    from trainer_overhead import make_shards

    torch.set_num_threads(1)  # one worker is one process with one thread
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sets = {"dwt": make_shards(out, args.size, True, args.images), "jpeg": make_shards(out, args.size, False,
                                                                                        args.images)}
    sources = {f"{kind} local": str(path) for kind, path in sets.items()}
    server = None
    if not args.no_s3:
        from helpers import S3Server

        server = S3Server().start()
        os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                          AWS_ENDPOINT_URL=server.endpoint, FSSPEC_S3_ENDPOINT_URL=server.endpoint)
        import fsspec

        fsspec.config.set_conf_env(fsspec.config.conf)
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir("bench")
        for kind, path in sets.items():
            fs.put(str(path), f"bench/{kind}", recursive=True)
            sources[f"{kind} s3"] = f"s3://bench/{kind}"
    try:
        rates = {}
        print(f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}, {device_name(torch.device('cpu'))}, "
              f"{args.size} px, batches of {args.batch}")
        print("| shards | samples/s per worker |\n|---|---:|")
        for name, src in sources.items():
            rates[name] = worker_rate(src, "dwt" if args.size >= 128 else "pixel", args.batch, args.batches)
            print(f"| {name} | {rates[name]:.0f} |", flush=True)
    finally:
        if server is not None:
            server.stop()
    print(f"\nworkers per GPU to keep up (model img/s at {args.mfu:.0%} MFU of the dense fp16/bf16 peak; "
          f"{args.size} px shards):")
    kinds = list(rates)
    print("| GPU | preset | mask | GPU img/s | " + " | ".join(f"workers ({k})" for k in kinds) + " |")
    print("|---|---|---:|---:|" + "---:|" * len(kinds))
    for gpu, tflops in GPUS.items():
        for preset in [k for k, (_, side) in MODELS.items() if side == args.size] or list(MODELS):
            for rate in (0.0, 0.9):
                need = gpu_rate(preset, rate, tflops, args.mfu)
                cells = " | ".join(str(math.ceil(need / rates[k])) for k in kinds)
                print(f"| {gpu} | {preset} | {rate:.1f} | {need:,.0f} | {cells} |")


if __name__ == "__main__":
    main()
