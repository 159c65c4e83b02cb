"""Corpus readers: each turns a source root into a sorted list of `Item`s plus the inputs it had to skip.

- `folder_items`: any tree of images (jpg/jpeg/png/webp, any case), centre square crops; an identity is the first
  folder level when there is one (so LFW-style `NAME/NAME_0001.jpg` trees get `cls` labels too).
- `vggface2_items`: `ROOT/{train,test}/nXXXXXX/NNNN_NN.jpg` with the loose boxes of
  `bb_landmark/loose_bb_{split}.csv` (also looked for under `meta/`, `data/` and ROOT, or given with --bbox) and the
  names of `identity_meta.csv` when present. `cls` = index of the identity folder in sorted order.
- `celebahq_items`: `ROOT/CelebA-HQ-img/{0..29999}.jpg`, optionally restricted to one official CelebA partition
  through `CelebA-HQ-to-CelebA-mapping.txt` (idx orig_idx orig_file) and `list_eval_partition.txt`
  (orig_file 0|1|2 = train|val|test), both looked for in ROOT and ROOT/meta.

Items are sorted by key; keys are unique (a second file with the same key is skipped as "duplicate key").
"""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.schema import encode_key

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
SPLITS = {"train": 0, "val": 1, "test": 2}

__all__ = ["Item", "Listing", "folder_items", "vggface2_items", "celebahq_items", "IMAGE_EXTS"]


@dataclass(frozen=True)
class Item:
    key: str
    path: str                 # absolute path of the source file
    rel: str                  # path relative to the corpus root (recorded in the sample's json)
    identity: str | None = None
    cls: int | None = None
    box: tuple[float, float, float, float] | None = None
    box_missing: bool = False  # a face box was expected but not found: centre-square fallback (counted)
    group: str | None = None   # identity folder: the unit of --subset-by identity


@dataclass
class Listing:
    items: list[Item]
    skipped: list[dict] = field(default_factory=list)  # {"input": ..., "reason": ..., "detail": ...}
    notes: dict = field(default_factory=dict)          # counts worth reporting (e.g. boxes found)


def _walk_images(root: Path, skipped: list[dict]) -> list[str]:
    """Relative POSIX paths of every image under root, sorted. Symlinked folders are followed (once each);
    a folder that cannot be listed is recorded as skipped, never silently dropped."""
    found, seen = [], set()

    def unreadable(err: OSError) -> None:
        rel = Path(err.filename).relative_to(root).as_posix() if err.filename else str(root)
        skipped.append({"input": rel + "/", "reason": "unreadable file", "detail": f"cannot list folder: {err}"})

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop or a second link to the same folder
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()
        for name in filenames:
            if name.lower().endswith(IMAGE_EXTS):
                found.append(Path(dirpath, name).relative_to(root).as_posix())
    return sorted(found)


def _dedupe(items: list[Item], skipped: list[dict]) -> list[Item]:
    seen, out = set(), []
    for it in sorted(items, key=lambda i: (i.key, i.rel)):
        if it.key in seen:
            skipped.append({"input": it.rel, "reason": "duplicate key", "detail": it.key})
            continue
        seen.add(it.key)
        out.append(it)
    return out


def _require_dir(root: Path, flag: str = "--src") -> Path:
    if not root.is_dir():
        raise SystemExit(f"error: {flag} {root} is not a directory")
    return root


def _identity(rel: str) -> str | None:
    """The identity of an image: its first folder level (None for images at the root)."""
    return rel.split("/")[0] if "/" in rel else None


def _identity_index(rels: list[str]) -> dict[str, int]:
    """Identity folder -> `cls` index: its position among the sorted folder names."""
    return {name: i for i, name in enumerate(sorted({_identity(r) for r in rels} - {None}))}


def folder_items(root: str | os.PathLike) -> Listing:
    root = _require_dir(Path(root).resolve())
    skipped: list[dict] = []
    rels = _walk_images(root, skipped)
    index = _identity_index(rels)
    items = []
    for rel in rels:
        ident = _identity(rel)
        items.append(Item(encode_key(rel), str(root / rel), rel, ident, index.get(ident), group=ident))
    return Listing(_dedupe(items, skipped), skipped)


def _find(root: Path, names: list[str], subdirs=("bb_landmark", "meta", "data", "")) -> Path | None:
    for sub in subdirs:
        for name in names:
            p = root / sub / name
            if p.is_file():
                return p
    return None


def read_boxes(path: Path, skipped: list[dict]) -> dict[str, tuple[float, float, float, float]]:
    """VGGFace2 loose boxes: header `NAME_ID,X,Y,W,H`, rows like `"n000001/0001_01",60,60,79,109`."""
    boxes = {}
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        for lineno, row in enumerate(csv.reader(f), start=1):
            if lineno == 1 and row and row[0].strip().upper().startswith("NAME"):
                continue
            try:
                name = row[0].strip()
                x, y, w, h = (float(v) for v in row[1:5])
                if len(row) != 5 or not name or not all(map(math.isfinite, (x, y, w, h))) or w <= 0 or h <= 0:
                    raise ValueError(row)
            except (ValueError, IndexError):
                skipped.append({"input": f"{path.name}:{lineno}", "reason": "malformed CSV row",
                                "detail": ",".join(row)[:200]})
                continue
            boxes[name] = (x, y, w, h)
    return boxes


def read_identity_meta(path: Path) -> dict[str, str]:
    """`Class_ID, Name, Sample_Num, Flag, Gender` with leading spaces and quoted names containing commas."""
    names = {}
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        for row in csv.reader(f, skipinitialspace=True):
            if len(row) >= 2 and row[0].strip().startswith("n"):
                names[row[0].strip()] = row[1].strip()
    return names


def vggface2_items(root: str | os.PathLike, split: str = "train", bbox: str | None = None,
                   allow_no_boxes: bool = False) -> Listing:
    root = _require_dir(Path(root).resolve())
    split_dir = root / split
    if not split_dir.is_dir():
        raise SystemExit(f"error: {split_dir} not found: --src must hold VGGFace2's {split}/nXXXXXX/*.jpg "
                         f"(choose the split with --split train|test)")
    skipped: list[dict] = []
    box_file = Path(bbox) if bbox else _find(root, [f"loose_bb_{split}.csv"])
    if bbox and not box_file.is_file():
        raise SystemExit(f"error: --bbox {bbox} does not exist")
    if box_file is None and not allow_no_boxes:
        raise SystemExit(f"error: no loose_bb_{split}.csv under {root}/bb_landmark, meta or data: give it with "
                         f"--bbox CSV, or pass --no-bbox to crop centre squares of every image")
    boxes = read_boxes(box_file, skipped) if box_file else {}
    meta_file = _find(root, ["identity_meta.csv"])
    names = read_identity_meta(meta_file) if meta_file else {}
    rels = _walk_images(split_dir, skipped)
    index = _identity_index(rels)
    items = []
    for rel in rels:
        ident = _identity(rel)
        name_id = rel.rsplit(".", 1)[0]
        box = boxes.get(name_id)
        items.append(Item(encode_key(rel), str(split_dir / rel), f"{split}/{rel}", names.get(ident, ident),
                          index.get(ident), box, box_missing=box is None and box_file is not None, group=ident))
    notes = {"box_file": str(box_file) if box_file else None, "boxes": len(boxes),
             "identities": len(index), "identity_names": len(names)}
    return Listing(_dedupe(items, skipped), skipped, notes)


def celebahq_items(root: str | os.PathLike, split: str = "all") -> Listing:
    root = _require_dir(Path(root).resolve())
    img_dir = root / "CelebA-HQ-img" if (root / "CelebA-HQ-img").is_dir() else root
    if split != "all" and split not in SPLITS:
        raise SystemExit(f"error: --split {split!r}: choose train, val, test or all")
    rels = _walk_images(img_dir, [])
    items, skipped = [], [{"input": r, "reason": "outside the corpus layout", "detail": "CelebA-HQ images are numbered "
                           "files directly in CelebA-HQ-img/"} for r in rels if "/" in r]
    rels = [r for r in rels if "/" not in r]
    keep = None
    if split != "all":
        mapping = _find(root, ["CelebA-HQ-to-CelebA-mapping.txt"], ("", "meta"))
        partition = _find(root, ["list_eval_partition.txt"], ("", "meta", "Eval"))
        if mapping is None or partition is None:
            raise SystemExit(f"error: --split {split} needs CelebA-HQ-to-CelebA-mapping.txt and "
                             f"list_eval_partition.txt in {root} (or {root}/meta); use --split all without them")
        part = {}
        for line in open(partition):
            f = line.split()
            if len(f) == 2:
                part[f[0]] = int(f[1])
        keep = set()
        for line in open(mapping):
            f = line.split()
            if len(f) == 3 and f[0].isdigit() and part.get(f[2]) == SPLITS[split]:
                keep.add(int(f[0]))
    for rel in rels:
        stem = rel.rsplit(".", 1)[0]
        if keep is not None and not (stem.isdigit() and int(stem) in keep):
            continue
        items.append(Item(encode_key(rel), str(img_dir / rel), rel))
    return Listing(_dedupe(items, skipped), skipped, {"split": split})
