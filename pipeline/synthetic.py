"""Synthetic "faces": a deterministic, download-free image set for the quickstart, tests and benchmarks.

Each image is a smooth background, a skin-coloured ellipse with hair, two eyes and a mouth, with random colours,
position, size and expression drawn from `numpy.random.default_rng(seed)`. They are cartoons, not faces: enough
structure (symmetry, parts in fixed relative places) for a tiny model to learn and for a person to judge samples.
"""
from __future__ import annotations

import numpy as np

__all__ = ["synthetic_faces"]


def _ellipse(yy, xx, cy, cx, ry, rx):
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _face(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size  # coordinates in [0, 1)
    top, bottom = rng.uniform(0.2, 0.9, 3), rng.uniform(0.1, 0.8, 3)
    img = top[None, None] * (1 - yy[..., None]) + bottom[None, None] * yy[..., None]  # vertical gradient
    cy, cx = 0.52 + rng.normal(0, 0.03), 0.5 + rng.normal(0, 0.04)
    ry, rx = rng.uniform(0.30, 0.38), rng.uniform(0.22, 0.30)
    skin = np.array([0.95, 0.76, 0.62]) * rng.uniform(0.45, 1.0) + rng.normal(0, 0.03, 3)
    hair = rng.uniform(0.0, 0.6, 3) * rng.uniform(0.2, 1.0)
    img[_ellipse(yy, xx, cy - 0.08, cx, ry * 0.95, rx * 1.12)] = hair  # hair behind the face
    img[_ellipse(yy, xx, cy + 0.03, cx, ry * 0.92, rx)] = skin
    eye_dy, eye_dx, eye_r = rng.uniform(-0.06, -0.02), rx * rng.uniform(0.35, 0.5), rx * rng.uniform(0.12, 0.18)
    iris = rng.uniform(0.0, 0.5, 3)
    for side in (-1, 1):
        ex = cx + side * eye_dx
        img[_ellipse(yy, xx, cy + eye_dy, ex, eye_r * 0.8, eye_r)] = 1.0
        img[_ellipse(yy, xx, cy + eye_dy, ex, eye_r * 0.55, eye_r * 0.55)] = iris
    mouth_y, mouth_w = cy + ry * rng.uniform(0.45, 0.6), rx * rng.uniform(0.3, 0.55)
    smile = rng.uniform(0.01, 0.05)
    mouth = _ellipse(yy, xx, mouth_y, cx, smile + 0.015, mouth_w) & (yy >= mouth_y - smile * 0.2)
    img[mouth] = np.array([0.6, 0.15, 0.2]) * rng.uniform(0.6, 1.0)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def synthetic_faces(n: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """n images, (n, size, size, 3) uint8, identical for the same (n, size, seed) on every machine."""
    rng = np.random.default_rng(seed)
    return np.stack([_face(rng, size) for _ in range(n)])
