"""ProGAN's sliced Wasserstein distance (SWD) between two image sets (re-exported by `trainer.eval.metrics`).

Takes uint8 RGB images (N, 3, H, W), as every metric in `trainer.eval.metrics` does; descriptors accumulate batch by
batch (`SWDDescriptors`).

SWD (Karras et al. 2018, ProGAN, section 5 and their `metrics/sliced_wasserstein.py`)
    Laplacian pyramid of each image (5-tap binomial [1, 4, 6, 4, 1] / 16 in each direction, mirrored borders,
    as cv2.pyrDown/pyrUp), levels from the full resolution down to 16 px (64 px -> 64, 32, 16). Per image and
    level 128 random 7x7x3 patches (descriptors of 147 values, centres drawn so the patch lies inside), each set's
    descriptors normalised per colour channel by that set's own mean and std; 4 repeats x 128 random unit
    directions; per level the distance is the mean over directions of the mean absolute difference between the
    sorted projections of the two sets (the 1-D Wasserstein-1 distance). Values are multiplied by 10^3 as in
    ProGAN's tables (keys `SWDx1e3_<res>` and `SWDx1e3_avg`, the mean over levels). Both sets need the same number
    of images. Descriptors are kept as float32: 75 KB per image per level (10k images at 64 px: 2.3 GB per set).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["laplacian_pyramid", "swd_resolutions", "SWDDescriptors", "sliced_wasserstein", "swd", "swd_images"]

SWD_MIN_RES, SWD_PATCH, SWD_PATCHES_PER_IMAGE = 16, 7, 128
SWD_DIR_REPEATS, SWD_DIRS_PER_REPEAT, SWD_SCALE = 4, 128, 1e3
_PROJECTION_BYTES = 256 << 20   # cap on one set's (directions, M) float32 projection buffer


def _check_images(images: torch.Tensor) -> None:  # also trainer.eval.metrics' input check (it imports it from here)
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        got = f"{type(images).__name__} {getattr(images, 'dtype', '')} {tuple(getattr(images, 'shape', ()))}"
        raise ValueError(f"expected a uint8 torch tensor (N, 3, H, W), got {got}")


def swd_resolutions(size: int) -> list[int]:
    """Pyramid levels for a square image side: halving from `size` while >= 16 (64 -> [64, 32, 16])."""
    res = []
    while size >= SWD_MIN_RES:
        res.append(size)
        size //= 2
    return res


def _binomial(x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    """Separable [1, 4, 6, 4, 1] / 16 filter per channel, mirrored borders (scipy 'mirror' = torch 'reflect')."""
    c = x.shape[1]
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=x.dtype, device=x.device) * (gain ** 0.5 / 16)
    x = F.pad(x, (2, 2, 2, 2), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, 5).expand(c, 1, 1, 5), groups=c)
    return F.conv2d(x, k.view(1, 1, 5, 1).expand(c, 1, 5, 1), groups=c)


def laplacian_pyramid(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """(N, C, H, W) float -> `levels` tensors: band-pass levels at H, H/2, ..., then the low-pass residual
    (pyrDown = blur then keep even pixels; pyrUp = zero-stuff then blur with gain 4)."""
    pyramid = [x]
    for _ in range(1, levels):
        down = _binomial(pyramid[-1])[..., ::2, ::2]
        up = torch.zeros_like(pyramid[-1])
        up[..., ::2, ::2] = down
        pyramid[-1] = pyramid[-1] - _binomial(up, gain=4.0)
        pyramid.append(down)
    return pyramid


def _patches(level: torch.Tensor, rng: np.random.Generator) -> np.ndarray:
    """(B, 3, h, w) -> (B * 128, 147) float32 descriptors of random 7x7 patches lying inside the image."""
    b, c, h, w = level.shape
    r = SWD_PATCH // 2
    centre = torch.from_numpy(rng.integers(r, h - r, size=(b, 2, SWD_PATCHES_PER_IMAGE)))  # per image: y's, x's
    off = torch.arange(-r, r + 1)
    ys, xs = centre[:, 0, :, None] + off, centre[:, 1, :, None] + off                       # (B, 128, 7)
    patches = level[torch.arange(b)[:, None, None, None, None], torch.arange(c)[None, None, :, None, None],
                    ys[:, :, None, :, None], xs[:, :, None, None, :]]                         # (B, 128, 3, 7, 7)
    return patches.reshape(b * SWD_PATCHES_PER_IMAGE, -1).numpy()


class SWDDescriptors:
    """ProGAN's patch descriptors of one image set at every pyramid level, fed batch by batch.

    Patch positions come from one generator per level (spawned from `seed`), drawn image by image, so the result
    does not depend on the batch size."""

    def __init__(self, resolution: int, seed: int = 0):
        self.resolution, self.resolutions = resolution, swd_resolutions(resolution)
        if not self.resolutions or resolution % 2 ** (len(self.resolutions) - 1):
            raise ValueError(f"SWD needs a square image side >= {SWD_MIN_RES} that halves evenly down to "
                             f"{SWD_MIN_RES}..{2 * SWD_MIN_RES - 1} px (e.g. 64, 128, 256), got {resolution}")
        self._rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(len(self.resolutions))]
        self.levels: list[list[np.ndarray]] = [[] for _ in self.resolutions]     # per level: (B * 128, 147) chunks
        self.n_images = 0

    def update(self, images: torch.Tensor) -> None:
        _check_images(images)
        if images.shape[-2:] != (self.resolution, self.resolution):
            raise ValueError(f"expected {self.resolution}x{self.resolution} images, got {tuple(images.shape[-2:])}")
        pyramid = laplacian_pyramid(images.cpu().float(), len(self.resolutions))
        for level, rng, chunks in zip(pyramid, self._rngs, self.levels):
            chunks.append(_patches(level, rng))
        self.n_images += len(images)


def _channel_stats(chunks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per colour channel mean and std (ddof 0) over all descriptors and patch positions, expanded to (147,)."""
    count = sum(len(c) for c in chunks) * SWD_PATCH ** 2
    mean = sum(c.reshape(len(c), 3, -1).sum(axis=(0, 2), dtype=np.float64) for c in chunks) / count
    mean = np.repeat(mean, SWD_PATCH ** 2)
    var = sum(np.square(c - mean).reshape(len(c), 3, -1).sum(axis=(0, 2)) for c in chunks) / count
    std = np.maximum(np.sqrt(var), 1e-8)       # a constant channel (collapsed samples): finite SWD instead of NaN
    return mean.astype(np.float32), np.repeat(std, SWD_PATCH ** 2).astype(np.float32)


def _sorted_projections(chunks: list[np.ndarray], stats: tuple[np.ndarray, np.ndarray], dirs: np.ndarray) -> np.ndarray:
    """Descriptors normalised with stats (mean, std), projected on dirs (D, k) -> (k, M) float32, rows sorted."""
    mean, std = stats
    proj = np.empty((dirs.shape[1], sum(len(c) for c in chunks)), np.float32)
    start = 0
    for c in chunks:
        proj[:, start:start + len(c)] = dirs.T @ ((c - mean) / std).T                     # (k, m_i)
        start += len(c)
    proj.sort(axis=1)
    return proj


def sliced_wasserstein(a: list[np.ndarray], b: list[np.ndarray], rng: np.random.Generator,
                       repeats: int = SWD_DIR_REPEATS, dirs_per_repeat: int = SWD_DIRS_PER_REPEAT) -> float:
    """SWD (unscaled) between two descriptor sets, each a list of (m_i, D) chunks with the same total M: each set
    normalised per channel by its own stats, `repeats` x `dirs_per_repeat` random unit directions (ProGAN draws
    (D, dirs_per_repeat) normals per repeat), the mean of |sorted proj_a - sorted proj_b| over directions and rows."""
    m = sum(len(c) for c in a)
    assert m == sum(len(c) for c in b) and m > 0, "both descriptor sets must hold the same number of rows"
    stats_a, stats_b = _channel_stats(a), _channel_stats(b)
    block = max(1, min(dirs_per_repeat, _PROJECTION_BYTES // (4 * m)))   # directions per pass: bounds the buffers
    total = 0.0
    for _ in range(repeats):
        dirs = rng.standard_normal((a[0].shape[1], dirs_per_repeat))
        dirs = (dirs / np.linalg.norm(dirs, axis=0, keepdims=True)).astype(np.float32)  # (D, k) unit columns
        for j in range(0, dirs_per_repeat, block):
            d = dirs[:, j:j + block]
            diff = _sorted_projections(a, stats_a, d) - _sorted_projections(b, stats_b, d)   # (block, M)
            total += np.abs(diff, out=diff).sum(dtype=np.float64)
    return float(total / (repeats * dirs_per_repeat * m))


def swd(a: SWDDescriptors, b: SWDDescriptors, seed: int = 0) -> dict[str, float]:
    """ProGAN SWD x 10^3 per pyramid level ("SWDx1e3_64", ...) and their mean ("SWDx1e3_avg")."""
    if a.resolutions != b.resolutions or a.n_images != b.n_images or not a.n_images:
        raise ValueError(f"SWD compares two sets of the same size and resolution, got {a.n_images} images at "
                         f"{a.resolution} px and {b.n_images} at {b.resolution} px")
    rng = np.random.default_rng(seed)
    out = {f"SWDx1e3_{res}": float(SWD_SCALE * sliced_wasserstein(la, lb, rng))
           for res, la, lb in zip(a.resolutions, a.levels, b.levels)}
    out["SWDx1e3_avg"] = float(np.mean(list(out.values())))
    return out


def swd_images(images_a: torch.Tensor, images_b: torch.Tensor, seed: int = 0,
               batch_size: int = 256) -> dict[str, float]:
    """SWD between two uint8 (N, 3, R, R) sets: patches seeded with `seed` and `seed + 1`, directions with `seed`."""
    _check_images(images_a)
    sets = [SWDDescriptors(images_a.shape[-1], seed), SWDDescriptors(images_a.shape[-1], seed + 1)]
    for desc, images in zip(sets, (images_a, images_b)):
        for i in range(0, len(images), batch_size):
            desc.update(images[i:i + batch_size])
    return swd(*sets, seed=seed)
