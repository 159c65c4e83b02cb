"""A picture of a shard set: a grid of the first N crops, and beside it their inverse-DWT reconstructions.

    python -m pipeline.preview OUT --n 64 --out grid.png

Left: the stored JPEG crops. Right (sets with dwt.f16): the image rebuilt from the stored float16 Haar bands, which
should look identical; a set made with --no-dwt shows the crops only."""
from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.imaging import haar_idwt_to_uint8, image_grid
from pipeline.reader import iter_samples, load_manifest
from pipeline.schema import decode_dwt
from pipeline.store import Store


def preview(out: str, n: int = 64, path: str = "grid.png") -> Path:
    store = Store(out)
    manifest = load_manifest(store)
    size = manifest["config"]["size"]
    crops, recons = [], []
    for entry in manifest["shards"]:
        for sample in iter_samples(store.read_bytes(entry["name"])):
            crops.append(np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB")))
            if "dwt.f16" in sample:
                recons.append(haar_idwt_to_uint8(decode_dwt(sample["dwt.f16"], size)))
            if len(crops) == n:
                break
        if len(crops) == n:
            break
    if not crops:
        raise SystemExit(f"error: {out} holds no samples")
    left = image_grid(crops)
    picture = np.concatenate([left, np.full((left.shape[0], 8, 3), 255, np.uint8), image_grid(recons)], axis=1) \
        if recons else left
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture).save(path)
    return Path(path)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m pipeline.preview", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="shard set: folder or fsspec URL")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--out", dest="png", default="grid.png", help="PNG to write (default grid.png)")
    a = p.parse_args(argv)
    print(f"wrote {preview(a.out, a.n, a.png)}")


if __name__ == "__main__":
    main()
