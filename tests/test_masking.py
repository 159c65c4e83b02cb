"""trainer.core.masking: exact visible counts, block alignment, crop contiguity, determinism, token helpers."""
import math

import pytest
import torch

from trainer.core.masking import MASK_KINDS, gather_tokens, num_visible, patchify, unpatchify, visible_indices


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def as_sets(v):
    return [frozenset(row.tolist()) for row in v]


@pytest.mark.parametrize("kind,grid,rate,block,expected", [
    ("patch", 8, 0.75, 4, 16),        # 64 - floor(48)
    ("patch", 16, 0.9, 4, 26),        # 256 - floor(230.4)
    ("patch", 10, 0.29, 4, 71),       # 0.29 * 100 = 28.999999999999996: the epsilon guard makes it 29
    ("block", 8, 0.75, 2, 16),        # 16 blocks, floor(12) masked, 4 visible blocks of 4 tokens
    ("block", 32, 0.9, 4, 112),       # the paper's 256 px / patch 8 setting: 57 of 64 blocks masked
    ("block", 16, 0.9, 4, 32),        # 16 blocks, floor(14.4)=14 masked -> 2 visible blocks
    ("block", 16, 0.5, 4, 128),
    ("crop", 8, 0.75, 4, 16),         # side round(sqrt(16)) = 4
    ("crop", 16, 0.9, 4, 25),         # side round(sqrt(25.6)) = 5
    ("crop", (4, 8), 0.5, 4, 16),     # side round(sqrt(16)) = 4 = min(h, w)
])
def test_exact_visible_counts(kind, grid, rate, block, expected):
    assert num_visible(kind, grid, rate, block) == expected
    v = visible_indices(kind, grid, rate, batch_size=5, block=block, generator=gen())
    h, w = (grid, grid) if isinstance(grid, int) else grid
    assert v.shape == (5, expected) and v.dtype == torch.int64
    assert (v[:, 1:] > v[:, :-1]).all(), "indices must be sorted and distinct"
    assert v.min() >= 0 and v.max() < h * w


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_rate_zero_keeps_every_token(kind):
    v = visible_indices(kind, (4, 8), 0.0, batch_size=3, block=4, generator=gen())
    assert torch.equal(v, torch.arange(32).expand(3, -1))


def test_block_hand_computed_4x4():
    """4x4 grid, 2x2 blocks, rate 0.75: exactly one of the four aligned blocks stays visible."""
    blocks = {frozenset({0, 1, 4, 5}), frozenset({2, 3, 6, 7}), frozenset({8, 9, 12, 13}),
              frozenset({10, 11, 14, 15})}
    seen = set(as_sets(visible_indices("block", 4, 0.75, batch_size=200, block=2, generator=gen())))
    assert seen == blocks  # every draw is a whole aligned block, and all four occur


def test_block_alignment_large_grid():
    g, b = 16, 4
    v = visible_indices("block", g, 0.7, batch_size=50, block=b, generator=gen(3))
    rows, cols = v // g, v % g
    for r, c in zip(rows, cols):
        block_ids = (r // b) * (g // b) + (c // b)
        ids, counts = block_ids.unique(return_counts=True)
        assert (counts == b * b).all(), "every touched block must be visible as a whole"
        assert len(ids) == num_visible("block", g, 0.7, b) // (b * b)


def test_crop_hand_computed_4x4():
    """4x4 grid, rate 0.75: a visible 2x2 window at one of the 3x3 = 9 positions."""
    windows = {frozenset({r * 4 + c, r * 4 + c + 1, (r + 1) * 4 + c, (r + 1) * 4 + c + 1})
               for r in range(3) for c in range(3)}
    seen = set(as_sets(visible_indices("crop", 4, 0.75, batch_size=300, generator=gen())))
    assert seen == windows


def test_crop_contiguity():
    h, w = 8, 12
    v = visible_indices("crop", (h, w), 0.8, batch_size=40, generator=gen(5))
    s = math.isqrt(v.shape[1])
    assert s * s == v.shape[1]
    for row in v:
        r, c = row // w, row % w
        assert r.max() - r.min() == s - 1 and c.max() - c.min() == s - 1  # a square window, no holes
        assert len(set(zip(r.tolist(), c.tolist()))) == s * s


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_determinism_under_seed(kind):
    a = visible_indices(kind, 16, 0.75, batch_size=8, generator=gen(7))
    b = visible_indices(kind, 16, 0.75, batch_size=8, generator=gen(7))
    c = visible_indices(kind, 16, 0.75, batch_size=8, generator=gen(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert len(set(as_sets(a))) > 1, "samples of one batch must get different masks"


def test_patch_masks_are_uniform():
    """Each token is visible with probability S/n (binomial check, 6 sigma)."""
    n, draws = 64, 4000
    v = visible_indices("patch", 8, 0.75, batch_size=draws, generator=gen(11))
    freq = torch.bincount(v.flatten(), minlength=n).double() / draws
    p = 16 / 64
    assert (freq - p).abs().max() < 6 * math.sqrt(p * (1 - p) / draws)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown mask kind"):
        visible_indices("random", 8, 0.5, 2)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        visible_indices("patch", 8, 1.0, 2)
    with pytest.raises(ValueError, match="multiple of the block size"):
        visible_indices("block", 10, 0.5, 2, block=4)


def test_patchify_hand_computed_and_roundtrip():
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).view(1, 2, 4, 4)  # C=2, 4x4, p=2 -> 4 tokens of 8
    tok = patchify(x, 2)
    assert tok.shape == (1, 4, 8)
    # token 1 = rows 0-1, cols 2-3; features ordered (p1, p2, C): (0,0,c0) (0,0,c1) (0,1,c0) ...
    assert tok[0, 1].tolist() == [2, 18, 3, 19, 6, 22, 7, 23]
    y = torch.randn(3, 12, 8, 16)
    assert torch.equal(unpatchify(patchify(y, 4), 4, 12, (2, 4)), y)
    v = torch.tensor([[0, 3], [1, 2]])
    g = gather_tokens(patchify(y[:2], 4), v)
    assert torch.equal(g[1, 0], patchify(y, 4)[1, 1])
