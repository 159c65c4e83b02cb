"""The main job on an embedded default, end to end, with the real DeepSpeed launcher (CPU, or GPUs if present):

    python -m trainer.quickstart --out runs/quickstart

1/4 shard: generate 2,048 synthetic cartoon faces (`pipeline.synthetic`) as JPEG files and shard them with the
    real pipeline (`pipeline.shard folder`, 32 px crops, no download); OUT/data.png shows crops read back;
2/4 pre-train: `deepspeed --num_gpus 2 trainer/pretrain.py --config configs/quickstart.yaml`, 90% block-wise
    masked pre-training of a small U-ViT (DS_ACCELERATOR=cpu and gloo when there is no GPU);
3/4 fine-tune: `deepspeed ... trainer/finetune.py --init OUT/pretrain`, the same weights with mask rate 0;
4/4 sample: `python -m trainer.sample --ckpt OUT/finetune`, 64 images from the fine-tuned EMA weights (DDIM,
    eta 1), their grid copied to OUT/samples.png beside OUT/data.png.
Each stage prints its elapsed time and where its output went; each run directory keeps its config, metrics.jsonl,
checkpoints and sample grids, and running the command again resumes or skips what is done. The settings (model,
steps, batch, lr, EMA, sampler) were chosen by measuring: configs/quickstart.yaml and docs/performance.md.

Point it at real data by sharding your images (`python -m pipeline.shard folder --src DIR --out shards/mine`) and
training with your own config: README, "Training".
"""
from __future__ import annotations

import argparse
import io
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.reader import iter_samples, load_manifest
from pipeline.store import Store
from pipeline.synthetic import synthetic_faces
from trainer.core.images import save_grid
from trainer.core.settings import SamplingConfig
from trainer.train.distributed import build_cpu_comm_op
from trainer.train.jobs import REPO, Stages, run_module
from trainer.train.launch import has_cuda, launch

CONFIG = REPO / "configs" / "quickstart.yaml"
GRID = 64       # images in data.png and samples.png (8 x 8)
ZOOM = 3        # 32 px tiles are small on a screen: the grids are enlarged (nearest neighbour) by this factor
# the two stages' lengths and the final sampler, with configs/quickstart.yaml: measured on 2 CPU cores to give
# faces in about 5 minutes (docs/performance.md, "Quickstart")
PRETRAIN_STEPS, FINETUNE_STEPS, SAMPLE_STEPS = 300, 400, 100


def _zoomed(images: np.ndarray, path: Path) -> Path:
    save_grid(np.repeat(np.repeat(images, ZOOM, axis=1), ZOOM, axis=2), path)
    return path


def make_shards(out: Path, n: int, seed: int = 0) -> Path:
    """Synthetic faces -> JPEG files -> a 32 px shard set made by the pipeline (kept if already complete)."""
    src = out / "source"
    if not src.is_dir():
        tmp = out / ".source-partial"
        shutil.rmtree(tmp, ignore_errors=True)
        for i, face in enumerate(synthetic_faces(n, size=72, seed=seed)):
            path = tmp / f"id{i % 16:02d}" / f"{i:05d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(face).save(path, quality=95)
        tmp.rename(src)  # only a complete source folder is reused by a second run
    shards = out / "shards"
    run_module("pipeline.shard", ["folder", "--src", src, "--out", shards, "--size", 32, "--no-dwt",
                                  "--shard-size", 256], f"error: sharding the synthetic faces in {src} failed; its "
                                                        f"log is above")
    store = Store(str(shards))
    crops = []
    for entry in load_manifest(store)["shards"]:
        crops += [np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB"))
                  for s in iter_samples(store.read_bytes(entry["name"]))]
        if len(crops) >= GRID:
            break
    _zoomed(np.stack(crops[:GRID]), out / "data.png")
    return shards


def sample(ckpt: Path, out: Path, n: int, steps: int) -> np.ndarray:
    sampling = SamplingConfig(steps=steps, eta=1.0, n=n, seed=0)  # DDIM eta 1, as the training grids
    run_module("trainer.sample", ["--ckpt", ckpt, *sampling.to_args(), "--batch", n, "--out", out],
               f"error: sampling failed; its log is above (model: {ckpt})")
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in sorted((out / "images").glob("*.png"))[:n]])
    return images


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/quickstart")
    p.add_argument("--images", type=int, default=2048, help="synthetic faces to generate and shard")
    p.add_argument("--ranks", type=int, default=2, help="processes (GPUs, or CPU ranks without one)")
    p.add_argument("--pretrain-steps", type=int, default=PRETRAIN_STEPS)
    p.add_argument("--finetune-steps", type=int, default=FINETUNE_STEPS)
    p.add_argument("--sample-steps", type=int, default=SAMPLE_STEPS, help="DDIM steps of the final samples")
    a = p.parse_args(argv)
    pre, fine = a.pretrain_steps, a.finetune_steps
    out = Path(a.out).resolve()
    gpu = has_cuda()
    where = f"{a.ranks} {'GPU' if gpu else 'CPU'} ranks"
    stages = Stages(4)
    print(f"quickstart: synthetic faces -> shards -> 90%-masked pre-training -> fine-tuning -> samples, in {out}")
    shards = stages.run("shard", f"{a.images:,} synthetic faces -> 32 px shard set (pipeline.shard folder)",
                        lambda: make_shards(out, a.images), f"{out / 'shards'}, crops in {out / 'data.png'}")
    common = [f"data.sources=[{shards}]"]
    if not gpu:
        build_cpu_comm_op()

    stages.run("pre-train", f"{pre} steps, 90% of the patches dropped (block-wise), {where}",
               lambda: launch("pretrain.py", out / "pretrain", a.ranks, config=CONFIG,
                              sets=common + [f"train.steps={pre}"]),
               f"{out / 'pretrain'} (metrics.jsonl, checkpoints/, samples/)")
    stages.run("fine-tune", f"{fine} steps on every patch from the pre-trained weights, {where}",
               lambda: launch("finetune.py", out / "finetune", a.ranks, config=CONFIG,
                              sets=common + [f"train.steps={fine}", "mask.rate=0.0", f"train.ckpt_every={fine}"],
                              extra=["--init", str(out / "pretrain")]),
               f"{out / 'finetune'}")
    images = stages.run("sample", f"{GRID} images from the fine-tuned EMA weights, DDIM eta 1, {a.sample_steps} steps",
                        lambda: sample(out / "finetune", out / "samples", GRID, a.sample_steps),
                        f"{out / 'samples'}")
    _zoomed(images, out / "samples.png")
    print(f"\nquickstart done in {stages.elapsed()}: look at {out / 'samples.png'} (samples of the fine-tuned "
          f"model) beside {out / 'data.png'} (training crops); runs in {out / 'pretrain'} and {out / 'finetune'}")


if __name__ == "__main__":
    main()
