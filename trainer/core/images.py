"""Model outputs -> viewable images: DWT/pixel space to uint8 RGB, and PNG grids."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.imaging import image_grid
from trainer.core.dwt import denormalize_bands, idwt2
from trainer.core.settings import INPUT_MODES

__all__ = ["to_rgb_uint8", "save_grid"]


def to_rgb_uint8(x: torch.Tensor, mode: str) -> torch.Tensor:
    """(B, C, H, W) model-space samples -> (B, H', W', 3) uint8. mode "pixel": x in [-1, 1];
    "dwt": normalised Haar bands (B, 12, h, w) -> inverse DWT -> image in [0, 1] of size 2h x 2w."""
    x = x.detach().float().cpu()
    if mode == "dwt":
        img = idwt2(denormalize_bands(x))
    elif mode == "pixel":
        img = (x + 1) / 2
    else:
        raise ValueError(f"unknown input mode {mode!r}; choose {' or '.join(reversed(INPUT_MODES))}")
    return (img.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1)


def save_grid(images: torch.Tensor | np.ndarray, path: str | Path, nrow: int | None = None, pad: int = 2) -> Path:
    """(B, H, W, 3) uint8 -> one PNG with the images in rows of `nrow` (default: a square-ish grid)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image_grid(np.asarray(images), nrow, pad)).save(path)
    return path
