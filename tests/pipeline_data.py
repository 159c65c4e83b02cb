"""Builders of tiny corpora for the pipeline tests (written into tmp_path, never committed)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.synthetic import synthetic_faces


def jpeg_bytes(arr: np.ndarray | Image.Image, quality: int = 90, **kw) -> bytes:
    buf = io.BytesIO()
    im = arr if isinstance(arr, Image.Image) else Image.fromarray(arr)
    im.save(buf, format="JPEG", quality=quality, **kw)
    return buf.getvalue()


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def identity_tree(root: Path, identities: int = 3, per_identity: int = 4, size: int = 160, seed: int = 0) -> Path:
    """root/idNNN/img_MM.jpg good synthetic faces."""
    faces = synthetic_faces(identities * per_identity, size, seed)
    for i, face in enumerate(faces):
        write(root / f"id{i // per_identity:03d}" / f"img_{i % per_identity:02d}.jpg", jpeg_bytes(face))
    return root


def bad_inputs(root: Path) -> dict[str, str | None]:
    """Every awkward input of the issue, under root/odd/. Returns {relative path: expected skip reason or None
    when the input must be handled (become a sample)}."""
    face = synthetic_faces(1, 200, seed=9)[0]
    good = jpeg_bytes(face)
    cases = {}

    def add(name, data, reason):
        write(root / "odd" / name, data)
        cases[f"odd/{name}"] = reason

    add("truncated.jpg", good[: len(good) // 2], "truncated or corrupt image")
    add("zero.jpg", b"", "empty file")
    add("text.png", b"this is not an image at all\n" * 10, "not an image")
    add("cmyk.jpg", jpeg_bytes(Image.fromarray(face).convert("CMYK")), None)
    add("grey.jpg", jpeg_bytes(face[..., 0]), None)
    add("palette.png", png_bytes(Image.fromarray(face).convert("P", palette=Image.ADAPTIVE, colors=256)), None)
    rgba = np.dstack([face, np.full(face.shape[:2], 255, np.uint8)])
    rgba[:50, :50, 3] = 0  # a transparent corner -> white
    add("rgba.png", png_bytes(Image.fromarray(rgba, "RGBA")), None)
    add("deep16.png", png_bytes(Image.fromarray((np.arange(200 * 200).reshape(200, 200) % 65536).astype(np.uint16))),
        None)
    # EXIF orientation 6: stored 240x120 (left red, right blue), displayed rotated 90 deg clockwise: 120x240 with
    # red on top and blue below.
    stored = np.zeros((120, 240, 3), np.uint8)
    stored[:, :120] = (255, 0, 0)
    stored[:, 120:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    add("rotated.jpg", jpeg_bytes(stored, exif=exif.tobytes()), None)
    add("tiny.jpg", jpeg_bytes(face[:16, :16]), "too small")
    add("huge.png", png_bytes(Image.new("L", (1200, 1000))), "too large (decompression bomb)")  # with --max-pixels
    add("dup.jpg", good, None)
    add("dup.png", png_bytes(Image.fromarray(face)), "duplicate key")  # same key as dup.jpg: the second is skipped
    return cases


def vggface2_tree(root: Path, seed: int = 0) -> Path:
    """ROOT/train/nXXXXXX/NNNN_NN.jpg, bb_landmark/loose_bb_train.csv (with a malformed row, a box outside
    its image and an image without a box) and identity_meta.csv with quoted names holding commas."""
    faces = synthetic_faces(6, 200, seed)
    names = []
    for i, face in enumerate(faces):
        ident = f"n{(i // 3) + 1:06d}"
        name = f"{ident}/{i % 3 + 1:04d}_01"
        write(root / "train" / f"{name}.jpg", jpeg_bytes(face))
        names.append(name)
    rows = ["NAME_ID,X,Y,W,H",
            f'"{names[0]}",60,50,80,100',
            f'"{names[1]}",150,150,120,120',  # extends past the image: padded
            f'"{names[2]}",5000,5000,50,50',  # entirely outside: skipped
            f'"{names[3]}",abc,1,2,3',        # malformed row: skipped, and the image then has no box
            f'"{names[4]}",40,40,100,110',
            f'"{names[5]}",nan,10,40,40',     # not finite: malformed, and names[5] has no box: fallback
            "garbage line without fields"]    # malformed: skipped
    write(root / "bb_landmark" / "loose_bb_train.csv", ("\n".join(rows) + "\n").encode())
    meta = ['Class_ID, Name, Sample_Num, Flag, Gender', 'n000001, "Doe, Jane", 3, 1, f',
            'n000002, "Roe, Richard", 3, 1, m']
    write(root / "identity_meta.csv", ("\n".join(meta) + "\n").encode())
    return root


def celebahq_tree(root: Path, n: int = 6, size: int = 256) -> Path:
    """CelebA-HQ-img/{0..n-1}.jpg plus the mapping and partition lists (0,1 train; 2,3 val; 4,5 test)."""
    for i, face in enumerate(synthetic_faces(n, size, seed=3)):
        write(root / "CelebA-HQ-img" / f"{i}.jpg", jpeg_bytes(face, quality=95))
    mapping = ["idx         orig_idx    orig_file"] + [f"{i} {1000 + i} {1001 + i:06d}.jpg" for i in range(n)]
    write(root / "CelebA-HQ-to-CelebA-mapping.txt", ("\n".join(mapping) + "\n").encode())
    part = [f"{1001 + i:06d}.jpg {min(i // 2, 2)}" for i in range(n)]
    write(root / "list_eval_partition.txt", ("\n".join(part) + "\n").encode())
    return root
