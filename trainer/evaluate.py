r"""Offline evaluation: FID, KID and SWD of a model's samples (or of any image set) against a reference set.

    python -m trainer.evaluate --ckpt RUN_DIR_OR_URL --ref SHARDS_OR_DIR --n 10000 --steps 250 [--metrics fid,kid,swd]
    python -m trainer.evaluate --fake DIR_OR_SHARDS --ref DIR_OR_SHARDS [--metrics ...]      # existing images
    python -m trainer.evaluate --plot RUN_DIR [RUN_DIR ...] --out curves.png [--metrics fid,kid]
    torchrun --nproc_per_node 8 -m trainer.evaluate --ckpt ... --ref ... --n 10000   # sampling on 8 GPUs

Image sets (either side): a folder of images (png/jpg/jpeg/webp/bmp, searched recursively, sorted by path; e.g.
the original CelebA-HQ-img/ folder) or a shard set (a folder or URL with manifest.json: its `jpg` crops, in shard
order, which is a random order by identity).

FID/KID protocol, `--fid-impl` (trainer/eval/metrics.py has the details; recorded as `fid_impl` in the results):
  tf (default)   the StyleGAN2-ADA convention: reference images are resized to the fake images' side (PIL bicubic,
                 antialiased; non-square ones centre-cropped first), then both sets, uint8 RGB at that side, go
                 through TF1's bilinear resize to 299 and (x - 128) / 128 into the TF FID Inception.
  pytorch-fid    the paper's code (jiachenlei/maskdm tools/pytorch_fid.py, a copy of pytorch-fid): both sets as they
                 are on disk, decoded to RGB with no crop, no pre-resize and no re-encode (a folder of 1024 px
                 originals is fed at 1024 px), then x / 255, bilinear F.interpolate to 299 x 299 (align_corners=False,
                 no antialias; a non-square image is stretched) and 2x - 1 into the same network weights.
The two give different FIDs on the same images (docs/performance.md): compare numbers of one protocol only.
SWD always compares both sets at one side (`--size`, default the first fake image's side).

The paper's protocol (the reference sampler: DDIM, eta 1, `--clip-mode reference`; the reference FID:
`--fid-impl pytorch-fid`), against the complete CelebA-HQ (all 30,000 images) as the reference set, either the
original image folder (`--ref CelebAMask-HQ/CelebA-HQ-img`) or its shards
(`python -m pipeline.shard celebahq --src CelebAMask-HQ --out shards/celebahq-all --split all --no-dwt`: 256 px
crops, JPEG q95; the two references give slightly different FIDs: say which one with a figure):
    # Tab. 2, FID-30k with 500 DDIM steps
    python -m trainer.evaluate --ckpt RUN_DIR --ref shards/celebahq-all --n 30000 --steps 500 --sampler ddim \
        --eta 1 --clip-mode reference --fid-impl pytorch-fid --metrics fid
    # Tab. 3, FID-10k with 250 DDIM steps
    python -m trainer.evaluate --ckpt RUN_DIR --ref shards/celebahq-all --n 10000 --steps 250 --sampler ddim \
        --eta 1 --clip-mode reference --fid-impl pytorch-fid --metrics fid
(`--ref-n` unset: every reference image.) The reference statistics are computed once and cached (below).

Protocol (the paper's FID-N): N generated images (`--n`, 10k or 50k) against the whole training set (`--ref-n`
unset: every image of the reference); state N with every figure. KID: 100 subsets of min(1000, N) images. SWD:
ProGAN's protocol on the first min(N, --swd-n) images of each side (the same count on both; descriptors of 75 KB
per image and pyramid level are held in memory).

Reference statistics (Inception mean/covariance and a seeded 10k-feature sample for KID) are computed once per
reference set, FID protocol, side and image count, and cached next to it: `REF/eval-cache/ref-<key>-<side>px-<n>.*.npz`
(tf) or `REF/eval-cache/ref-<key>-pytorch-fid-native-<n>.*.npz` (pytorch-fid), the key being the sha256 of the shard
set's manifest.json (or, for a folder, of its file list with sizes and modification times). Where the set is
read-only the cache goes to ~/.cache/maskdm/eval/. SWD is not cached.

With --ckpt the samples go to `--out` (default: RUN_DIR/eval/<tag>/ for a local run, ./eval/<name>/ otherwise);
a killed evaluation resumes its sampling. Results are printed as JSON, written to OUT/metrics.json, and, for a
local run directory, appended to RUN_DIR/metrics.jsonl with the checkpoint's step (what --plot and the model
card of `trainer.export` read).
"""
from __future__ import annotations

import argparse
import json
import time

from trainer.core.settings import DTYPES, FID_IMPLS, SamplingConfig


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--ckpt", help="model to sample: run dir, checkpoint tag dir, .safetensors or published URL")
    what.add_argument("--fake", help="existing images: a folder or a shard set")
    what.add_argument("--plot", nargs="+", metavar="RUN_DIR", help="draw metric-vs-step curves of these runs")
    p.add_argument("--ref", help="reference images: a folder or a shard set (e.g. the training shards)")
    SamplingConfig.add_arguments(p, n_help="images to sample / to take from --fake (--ckpt default 10000; --fake "
                                           "default: all)")
    p.add_argument("--ref-n", type=int, help="reference images to use (default: all, the FID-N protocol)")
    p.add_argument("--size", type=int, help="compare at this side in px, both sets resized (default: the side "
                   "of the first --fake/sampled image); with --fid-impl pytorch-fid for SWD only")
    p.add_argument("--swd-n", type=int, default=4096, help="images per side for SWD (memory: 75 KB/image/level)")
    p.add_argument("--metrics", default="fid,kid,swd", help="comma-separated: fid, kid, swd")
    p.add_argument("--fid-impl", default="tf", choices=FID_IMPLS,
                   help="FID/KID Inception protocol: tf (default; TF-FID resize, reference resized to the fake "
                   "side) or pytorch-fid (the paper's code: both sets as loaded, bilinear F.interpolate to 299)")
    p.add_argument("--batch", type=int, default=64, help="images per forward pass (sampling and features)")
    p.add_argument("--dtype", default="fp32", choices=DTYPES, help="sampling autocast dtype on GPUs")
    p.add_argument("--out", help="--ckpt: the samples' folder; --plot: the PNG")
    p.add_argument("--no-record", action="store_true", help="do not append the result to the run's metrics.jsonl")
    p.add_argument("--allow-unverified", action="store_true", help="read --ckpt from a URL that has no checksum beside "
                   "it (NAME.safetensors.sha256); better: pin its digest, --ckpt URL#sha256=HEX")
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    if args.plot:
        from trainer.eval.plots import plot_runs

        print(plot_runs(args.plot, args.out or "curves.png", metrics))
        return
    if not args.ref:
        raise SystemExit("error: --ref is required: the reference images (a folder or a shard set)")
    from trainer.eval.protocol import compute_metrics, evaluate_model, image_source

    ref = image_source(args.ref)
    if args.ckpt:
        result = evaluate_model(args.ckpt, ref, SamplingConfig.from_args(args, n=args.n or 10_000), metrics,
                                out=args.out, ref_n=args.ref_n, swd_n=args.swd_n, side=args.size, batch=args.batch,
                                dtype=args.dtype, fid_impl=args.fid_impl, record=not args.no_record,
                                allow_unverified=args.allow_unverified)
        if result is not None:  # rank 0
            print(json.dumps(result))
        return
    from trainer.train.distributed import distributed_context

    rank, _, device = distributed_context()
    if rank != 0:
        return
    start = time.time()
    result = compute_metrics(image_source(args.fake), ref, metrics, n=args.n, ref_n=args.ref_n, swd_n=args.swd_n,
                             side=args.size, device=device, batch=args.batch, seed=args.seed, fid_impl=args.fid_impl)
    print(json.dumps({**result, "seconds": round(time.time() - start, 1)}))


if __name__ == "__main__":
    main()
