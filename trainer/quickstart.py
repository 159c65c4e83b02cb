"""The main job on an embedded default, end to end, with the real DeepSpeed launcher (CPU, or GPUs if present):

    python -m trainer.quickstart --out runs/quickstart

1. generate 2,048 synthetic cartoon faces (`pipeline.synthetic`) as JPEG files and shard them with the real
   pipeline (`pipeline.shard folder`, 32 px crops, no download);
2. `deepspeed --num_gpus 2 trainer/pretrain.py --config configs/quickstart.yaml`: 90% block-wise masked
   pre-training of a small U-ViT (DS_ACCELERATOR=cpu and gloo when there is no GPU);
3. `deepspeed ... trainer/finetune.py --init OUT/pretrain`: fine-tuning the same weights with mask rate 0;
4. the fine-tuned EMA's sample grid is copied to OUT/samples.png, beside OUT/data.png (crops read back from the
   shards). Each stage's run directory keeps its config, metrics.jsonl, checkpoints and sample grids; running the
   command again resumes or skips what is done.

Point it at real data by sharding your images (`python -m pipeline.shard folder --src DIR --out shards/mine`) and
training with your own config: README, "Training".
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.reader import iter_samples, load_manifest
from pipeline.shard import main as shard_main
from pipeline.store import Store
from pipeline.synthetic import synthetic_faces
from trainer.images import save_grid
from trainer.loop import release_shm

REPO = Path(__file__).resolve().parents[1]


def make_shards(out: Path, n: int, seed: int = 0) -> Path:
    """Synthetic faces -> JPEG files -> a 32 px shard set made by the pipeline (kept if already complete)."""
    src = out / "source"
    if not src.is_dir():
        for i, face in enumerate(synthetic_faces(n, size=72, seed=seed)):
            path = src / f"id{i % 16:02d}" / f"{i:05d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(face).save(path, quality=95)
    shards = out / "shards"
    shard_main(["folder", "--src", str(src), "--out", str(shards), "--size", "32", "--no-dwt",
                "--shard-size", "256"])
    store = Store(str(shards))
    crops = [np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB"))
             for s in iter_samples(store.read_bytes(load_manifest(store)["shards"][0]["name"]))][:16]
    save_grid(np.stack(crops), out / "data.png")
    return shards


def launch(script: str, run_dir: Path, ranks: int, sets: list[str], *extra: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gpu = _has_cuda()
    env = dict(os.environ) if gpu else {**os.environ, "DS_ACCELERATOR": "cpu"}
    ds = "cpu_fp32.json"
    if gpu:  # bf16 needs Ampere (compute capability 8.0) or newer; V100 trains in fp16 with loss scaling
        import torch

        ds = "zero2_bf16.json" if torch.cuda.get_device_capability(0)[0] >= 8 else "zero2_fp16.json"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port",
           str(port), str(REPO / "trainer" / script), "--config", str(REPO / "configs" / "quickstart.yaml"),
           "--deepspeed_config", str(REPO / "ds_configs" / ds), "--run-dir", str(run_dir), *extra]
    for item in sets:
        cmd += ["--set", item]
    print(f"$ {'DS_ACCELERATOR=cpu ' if not gpu else ''}deepspeed {' '.join(cmd[3:])}", flush=True)
    code = subprocess.run(cmd, env=env).returncode
    release_shm(port)
    if code != 0:
        raise SystemExit(f"error: {script} failed; its log is above, its run directory is {run_dir}")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/quickstart")
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--ranks", type=int, default=2, help="processes (GPUs, or CPU ranks without one)")
    p.add_argument("--pretrain-steps", type=int, default=500)
    p.add_argument("--finetune-steps", type=int, default=500)
    a = p.parse_args(argv)
    out = Path(a.out).resolve()
    shards = make_shards(out, a.images)
    common = [f"data.sources=[{shards}]"]
    launch("pretrain.py", out / "pretrain", a.ranks, common + [f"train.steps={a.pretrain_steps}"])
    launch("finetune.py", out / "finetune", a.ranks,
           common + [f"train.steps={a.finetune_steps}", "mask.rate=0.0", "train.ckpt_every=1000000"],
           "--init", str(out / "pretrain"))
    grids = sorted((out / "finetune" / "samples").glob("*.png"))
    shutil.copyfile(grids[-1], out / "samples.png")
    print(f"wrote {out / 'data.png'} (training crops), {out / 'samples.png'} (samples of the fine-tuned EMA); "
          f"runs in {out / 'pretrain'} and {out / 'finetune'}")


if __name__ == "__main__":
    main()
