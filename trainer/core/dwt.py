"""One-level orthonormal 2-D Haar DWT and its inverse, batched, in torch (any device, any float dtype).

Convention: PyWavelets' `pywt.dwt2(x, 'haar')`. For each 2x2 pixel block
    [[a, b],
     [c, d]]
the four sub-bands are (orthonormal, so the transform preserves the sum of squares)
    cA = (a + b + c + d) / 2      approximation
    cH = (a + b - c - d) / 2      horizontal detail (low-pass along width, high-pass along height)
    cV = (a - b + c - d) / 2      vertical detail   (high-pass along width, low-pass along height)
    cD = (a - b - c + d) / 2      diagonal detail
and the inverse is the transpose of that 4x4 orthogonal matrix:
    a = (cA + cH + cV + cD) / 2,  b = (cA + cH - cV - cD) / 2,
    c = (cA - cH + cV - cD) / 2,  d = (cA - cH - cV + cD) / 2.

Layout (the shard format's `dwt.f16` and the model's DWT input mode):
    (B, C, H, W) -> (B, 4C, H/2, W/2), channels [cA(c=0..C-1), cH(...), cV(...), cD(...)],
i.e. for RGB: [cA(R,G,B), cH(R,G,B), cV(R,G,B), cD(R,G,B)].

For an image in [0, 1], cA lies in [0, 2] and every detail band in [-1, 1]. The model normalises cA to
2*cA - 1 (range [-1, 3]) and leaves the details as they are: `normalize_bands` / `denormalize_bands`.
"""
from __future__ import annotations

import torch

__all__ = ["dwt2", "idwt2", "normalize_bands", "denormalize_bands", "clip_bands"]


def dwt2(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 4C, H/2, W/2); H and W must be even (pywt would pad odd sizes; we refuse)."""
    assert x.dim() == 4, f"dwt2 expects (B, C, H, W), got shape {tuple(x.shape)}"
    B, C, H, W = x.shape
    assert H % 2 == 0 and W % 2 == 0, f"dwt2 needs even height and width, got {H}x{W}"
    a = x[:, :, 0::2, 0::2]
    b = x[:, :, 0::2, 1::2]
    c = x[:, :, 1::2, 0::2]
    d = x[:, :, 1::2, 1::2]
    s, t = a + b, c + d  # row sums (low-pass along width)
    u, v = a - b, c - d  # row differences (high-pass along width)
    y = torch.cat([s + t, s - t, u + v, u - v], dim=1)  # (B, 4C, H/2, W/2): cA, cH, cV, cD
    return y * 0.5


def idwt2(y: torch.Tensor) -> torch.Tensor:
    """(B, 4C, h, w) -> (B, C, 2h, 2w): the exact inverse of `dwt2`."""
    assert y.dim() == 4 and y.shape[1] % 4 == 0, f"idwt2 expects (B, 4C, h, w), got shape {tuple(y.shape)}"
    cA, cH, cV, cD = y.chunk(4, dim=1)  # each (B, C, h, w)
    p, q = cA + cH, cV + cD  # -> a + b, a - b (times 2, halved below)
    r, s = cA - cH, cV - cD  # -> c + d, c - d
    a, b = p + q, p - q
    c, d = r + s, r - s
    B, C, h, w = cA.shape
    # interleave the four (B, C, h, w) planes into (B, C, 2h, 2w)
    top = torch.stack([a, b], dim=-1).reshape(B, C, h, 2 * w)  # row 2i: a, b, a, b, ...
    bot = torch.stack([c, d], dim=-1).reshape(B, C, h, 2 * w)  # row 2i+1
    x = torch.stack([top, bot], dim=-2).reshape(B, C, 2 * h, 2 * w)
    return x * 0.5


def normalize_bands(y: torch.Tensor, data_channels: int = 3) -> torch.Tensor:
    """DWT of an image in [0,1] -> model space: cA -> 2*cA - 1, details unchanged (reference convention)."""
    out = y.clone()
    out[:, :data_channels] = 2 * y[:, :data_channels] - 1
    return out


def denormalize_bands(y: torch.Tensor, data_channels: int = 3) -> torch.Tensor:
    """Inverse of `normalize_bands`: model space -> DWT of an image in [0, 1]."""
    out = y.clone()
    out[:, :data_channels] = (y[:, :data_channels] + 1) * 0.5
    return out


def clip_bands(y: torch.Tensor, data_channels: int = 3) -> torch.Tensor:
    """Clip a model-space DWT prediction per band: cA to [-1, 3], details to [-1, 1]."""
    return torch.cat([y[:, :data_channels].clamp(-1, 3), y[:, data_channels:].clamp(-1, 1)], dim=1)
