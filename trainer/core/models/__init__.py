"""Model registry. `build_model(preset, in_channels, image_size, patch_size=4, **overrides)` -> UViT.

Presets are the paper's sizes (see `uvit.py` for their parameter counts) plus `tiny` for tests and the
quickstart. Any `UViTConfig` field can be overridden, e.g. `build_model("S", 3, 64, depth=(1, 1, 1))`."""
from __future__ import annotations

from trainer.core.models.uvit import UViT, UViTConfig, attention_kernel, flops_per_image
from trainer.core.settings import PRESETS

__all__ = ["build_model", "UViT", "UViTConfig", "flops_per_image", "attention_kernel"]



def build_model(preset: str, in_channels: int, image_size: int, patch_size: int = 4, **overrides) -> UViT:
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {list(PRESETS)}")
    cfg = UViTConfig(in_channels=in_channels, image_size=image_size, patch_size=patch_size,
                     **{**PRESETS[preset], **overrides})
    return UViT(cfg)
