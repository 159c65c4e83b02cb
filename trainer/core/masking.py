"""Per-sample token masks for masked score matching (MaskDM, Lei et al. 2023, Sec. 3), and the token helpers.

A mask is given by the *visible* token indices, shape (B, S), sorted ascending, with the same visible count S for
every sample of a batch, so the model gathers the visible tokens into a dense (B, S, D) tensor and DROPS the rest
before the first block (no mask token, no decoder). The token grid is (h, w) = (H/p, W/p) in row-major order.

Mask kinds (the three of the paper), for a grid of n = h*w tokens and a mask rate r in [0, 1):
- "patch": S = n - floor(r*n) tokens chosen uniformly at random.
- "block": the grid is tiled by b x b blocks of tokens (h and w must be multiples of b); floor(r * n_blocks)
  whole blocks are masked, so S = (n_blocks - floor(r * n_blocks)) * b^2. Rounding is DOWN in masked blocks:
  the actual rate never exceeds r (e.g. 32x32 grid, b=4, r=0.9: 57 of 64 blocks masked, S=112, rate 0.8906).
  This equals the reference implementation's floor(floor(r*n) / b^2) for every grid we use.
- "crop": one visible square window of side s = clamp(round(sqrt((1-r)*n)), 1, min(h, w)) at a uniformly random
  position; S = s^2 (so the actual rate is the nearest a square window allows).
r = 0 keeps every token for every kind (S = n): ordinary denoising score matching.

All randomness comes from the explicit `generator` (a CPU generator by default), so masks are reproducible.
"""
from __future__ import annotations

import math

import torch

from trainer.core.settings import MASK_KINDS

__all__ = ["visible_indices", "num_visible", "patchify", "unpatchify", "gather_tokens"]

_EPS = 1e-9  # guards floor(r*n) against 0.7*100 = 69.99999999 style float error


def _grid(grid) -> tuple[int, int]:
    h, w = (grid, grid) if isinstance(grid, int) else tuple(grid)
    if h <= 0 or w <= 0:
        raise ValueError(f"token grid must be positive, got {h}x{w}")
    return int(h), int(w)


def _check(kind: str, rate: float) -> None:
    if kind not in MASK_KINDS:
        raise ValueError(f"unknown mask kind {kind!r}; choose one of {MASK_KINDS}")
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"mask rate must be in [0, 1), got {rate}")


def _crop_side(h: int, w: int, rate: float) -> int:
    return max(1, min(h, w, round(math.sqrt((1.0 - rate) * h * w))))


def num_visible(kind: str, grid, rate: float, block: int = 4) -> int:
    """The visible count S that `visible_indices` returns for these settings (see the module docstring)."""
    _check(kind, rate)
    h, w = _grid(grid)
    n = h * w
    if rate == 0:
        return n
    if kind == "patch":
        return n - math.floor(rate * n + _EPS)
    if kind == "block":
        if h % block or w % block:
            raise ValueError(f"block masking needs the token grid {h}x{w} to be a multiple of the block size {block}; "
                             f"choose a block size that divides both sides (e.g. --mask-block 2)")
        n_blocks = (h // block) * (w // block)
        return (n_blocks - math.floor(rate * n_blocks + _EPS)) * block * block
    return _crop_side(h, w, rate) ** 2


def _choose(batch_size: int, n: int, k: int, generator, device) -> torch.Tensor:
    """k distinct indices out of n per row, uniformly: argsort of i.i.d. uniforms -> (B, k)."""
    scores = torch.rand(batch_size, n, generator=generator, device=device)
    return scores.argsort(dim=1)[:, :k]


def visible_indices(kind: str, grid, rate: float, batch_size: int, block: int = 4,
                    generator: torch.Generator | None = None, sets: int = 1) -> torch.Tensor:
    """Visible token indices (B, S), sorted, int64, on the generator's device (CPU without a generator).
    `sets` > 1 (split DWT tokens): one mask per token set of the same grid, drawn independently at the same
    settings, set k's indices offset by k * h * w: (B, sets * S), still sorted (set 0's indices first)."""
    if sets > 1:
        n = math.prod(_grid(grid))
        return torch.cat([visible_indices(kind, grid, rate, batch_size, block, generator) + k * n
                          for k in range(sets)], dim=1)
    S = num_visible(kind, grid, rate, block)
    h, w = _grid(grid)
    device = generator.device if generator is not None else torch.device("cpu")
    if S == h * w:
        return torch.arange(h * w, device=device).expand(batch_size, -1).clone()
    if kind == "patch":
        idx = _choose(batch_size, h * w, S, generator, device)
    elif kind == "block":
        hb, wb = h // block, w // block
        blocks = _choose(batch_size, hb * wb, S // (block * block), generator, device)  # (B, kb)
        bi, bj = blocks // wb, blocks % wb
        di = torch.arange(block, device=device)
        rows = (bi[:, :, None] * block + di).unsqueeze(-1)  # (B, kb, b, 1)
        cols = (bj[:, :, None] * block + di).unsqueeze(-2)  # (B, kb, 1, b)
        idx = (rows * w + cols).reshape(batch_size, S)
    else:  # crop
        s = _crop_side(h, w, rate)
        top = torch.randint(0, h - s + 1, (batch_size, 1, 1), generator=generator, device=device)
        left = torch.randint(0, w - s + 1, (batch_size, 1, 1), generator=generator, device=device)
        ar = torch.arange(s, device=device)
        idx = ((top + ar[:, None]) * w + (left + ar[None, :])).reshape(batch_size, S)
    return idx.sort(dim=1).values


# --- tokens ---------------------------------------------------------------------------------------------------

def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C), tokens row-major over the (H/p, W/p) grid, features ordered (p1, p2, C)."""
    B, C, H, W = x.shape
    assert H % p == 0 and W % p == 0, f"image {H}x{W} is not a multiple of the patch size {p}"
    h, w = H // p, W // p
    x = x.reshape(B, C, h, p, w, p).permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p1, p2, C)
    return x.reshape(B, h * w, p * p * C)


def unpatchify(tokens: torch.Tensor, p: int, C: int, grid) -> torch.Tensor:
    """(B, N, p*p*C) -> (B, C, H, W): inverse of `patchify`."""
    h, w = _grid(grid)
    B, N, P = tokens.shape
    assert N == h * w and P == p * p * C, f"tokens {tuple(tokens.shape)} do not match grid {h}x{w}, p={p}, C={C}"
    x = tokens.reshape(B, h, w, p, p, C).permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p1, w, p2)
    return x.reshape(B, C, h * p, w * p)


def gather_tokens(tokens: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """(B, N, D) tokens, (B, S) indices -> (B, S, D)."""
    return tokens.gather(1, visible.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
