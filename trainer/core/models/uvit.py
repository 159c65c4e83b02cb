"""U-ViT (Bao et al., "All are Worth Words: A ViT Backbone for Diffusion Models", CVPR 2023) with token dropping
for masked score matching (MaskDM, Lei et al. 2023).

    x_t (B, C, H, W) -> patchify -> [gather visible] -> Linear embed + pos -> [time token ; tokens]
      -> in-blocks (keep each output) -> mid-blocks -> out-blocks (each concatenates its mirrored in-block's
         output and projects 2D -> D: the long skips) -> LayerNorm -> Linear to patch pixels
      -> full image (visible=None) or per-token predictions for the visible patches only.

Conventions (docs/design.md): the diffusion step t enters as a token (sinusoidal embedding of the integer step, no
MLP by default); a learnable positional embedding covers [time, patches]; pre-norm blocks; no conv head. Masked
tokens are DROPPED before the first block: only the S visible tokens (+ the time token) pass through the network,
so a 90% mask costs ~1/10 of the FLOPs. Attention is PyTorch `scaled_dot_product_attention` (memory-efficient
kernel on V100 fp16 with head dim % 8 == 0, flash on newer GPUs). The timestep embedding and LayerNorm statistics
are computed in fp32 even when the module is stored in fp16 (DeepSpeed's classic fp16 mode).

Parameter counts of the presets at the paper's settings (tested exactly in tests/test_uvit.py):
    S  512 dim,  8 heads, 6+1+6 blocks,  64x64x3    patch 4:  44,292,144  (~44.3M)
    B  768 dim, 12 heads, 6+1+6 blocks,  256x256x3  patch 4: 102,417,456 (~102.4M)
    L 1024 dim, 16 heads, 8+1+8 blocks, 12x128x128 patch 4: 232,349,888 (~233M; q and v biases, no k bias, as the
      reference), with the 12 DWT bands as one 4x4x12 patch per token ("joint", our default: 1024 tokens).
    L with split DWT tokens (`split_bands=3`, config model.dwt_tokens: split, the reference's MaskedDWTUViT):
      233,399,488 (the paper's 233.4M): cA and the 9 detail bands are two token sets of 1024 each, with their own
      patch embedding and head and their own positional-embedding rows, masked independently; 2048 tokens, about
      2.1-2.3x the FLOPs of joint (docs/performance.md, "DWT tokens: joint vs split").
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from trainer.core.masking import gather_tokens, patchify, unpatchify

__all__ = ["UViTConfig", "UViT", "timestep_embedding", "flops_per_image", "attention_kernel"]


@dataclass(frozen=True)
class UViTConfig:
    in_channels: int                 # 3 (pixel mode) or 12 (DWT mode)
    image_size: int                  # side of the (square) model input: 64 pixel, 128 for 256 px in DWT mode
    patch_size: int = 4
    dim: int = 512
    heads: int = 8
    depth: tuple[int, int, int] = (6, 1, 6)  # (in, mid, out) block counts; in == out (one long skip each)
    mlp_ratio: float = 4.0
    qv_bias: bool = False            # learnable q and v biases in attention (k has none), as the reference's L
    mlp_time_embed: bool = False     # Linear-SiLU-Linear on the sinusoidal time embedding (U-ViT option, off)
    grad_checkpoint: bool = False    # activation checkpointing per block (training only)
    # 0: one token per patch of all channels ("joint"). c > 0: two token sets ("split", the reference's DWT
    # tokenisation): channels [0, c) (cA) and [c, C) (the detail bands), each patchified on the same grid with its own
    # embedding and head and a positional embedding of its own; 2 x grid tokens in all (see UViT.forward)
    split_bands: int = 0

    def __post_init__(self):
        object.__setattr__(self, "depth", tuple(int(d) for d in self.depth))
        n_in, n_mid, n_out = self.depth
        if n_in != n_out or n_in < 0 or n_mid < 0:
            raise ValueError(f"depth (in, mid, out) = {self.depth}: need in == out >= 0 (each out-block takes the "
                             f"long skip of its mirrored in-block)")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if not 0 <= self.split_bands < self.in_channels:
            raise ValueError(f"split_bands {self.split_bands}: 0 (one token set) or the channel count of the first "
                             f"set, below in_channels {self.in_channels}")

    @property
    def grid(self) -> tuple[int, int]:
        """The token grid of one token set (masks are drawn per set on it)."""
        g = self.image_size // self.patch_size
        return (g, g)

    @property
    def token_sets(self) -> int:
        return 2 if self.split_bands else 1

    @property
    def cells(self) -> int:
        """Grid cells: the tokens of one set."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        """Image tokens in all (both sets when split)."""
        return self.cells * self.token_sets

    @property
    def patch_dim(self) -> int:
        """Values per grid cell (all channels: both sets' tokens of one cell together)."""
        return self.patch_size * self.patch_size * self.in_channels

    @property
    def set_channels(self) -> tuple[int, ...]:
        """Channels of each token set: (C,) joint, (c, C - c) split."""
        return (self.split_bands, self.in_channels - self.split_bands) if self.split_bands else (self.in_channels,)

    def to_dict(self) -> dict:
        return asdict(self)


# --- embedders -------------------------------------------------------------------------------------------------

def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer steps t (B,) -> (B, dim) in fp32: [cos(t f_k), sin(t f_k)],
    f_k = max_period^(-k / (dim/2)) (the DDPM/ADM embedding as the reference uses it)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class LayerNorm32(nn.LayerNorm):
    """LayerNorm whose statistics are computed in fp32 whatever the parameter/activation dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


# --- blocks ----------------------------------------------------------------------------------------------------

class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qv_bias: bool):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim)) if qv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if qv_bias else None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        qkv = self.qkv(x)  # (B, L, 3D); called as a module so ZeRO-3 gathers its weight in every context
        if self.q_bias is not None:
            qkv = qkv + torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        q, k, v = qkv.view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # each (B, heads, L, hd)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, L, hd)
        return self.proj(x.transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    """Pre-norm transformer block; with `skip=True` it first merges a long skip: Linear(cat[x, skip]) (2D -> D)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, qv_bias: bool, skip: bool = False):
        super().__init__()
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.norm1 = LayerNorm32(dim)
        self.attn = Attention(dim, heads, qv_bias)
        self.norm2 = LayerNorm32(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


# --- model -----------------------------------------------------------------------------------------------------

class UViT(nn.Module):
    def __init__(self, cfg: UViTConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.dim
        n_in, n_mid, n_out = cfg.depth
        pp = cfg.patch_size ** 2
        first, *rest = cfg.set_channels
        self.patch_embed = nn.Linear(pp * first, D)  # == Conv2d(C, D, p, stride=p) on patchified input
        # split: the detail bands' own embedding and head (the reference's second token set)
        self.detail_embed = nn.Linear(pp * rest[0], D) if rest else None
        self.time_embed = (nn.Sequential(nn.Linear(D, 4 * D), nn.SiLU(), nn.Linear(4 * D, D))
                           if cfg.mlp_time_embed else nn.Identity())
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.num_tokens, D))  # [time, patches]
        blk = lambda skip=False: Block(D, cfg.heads, cfg.mlp_ratio, cfg.qv_bias, skip)  # noqa: E731
        self.in_blocks = nn.ModuleList(blk() for _ in range(n_in))
        self.mid_blocks = nn.ModuleList(blk() for _ in range(n_mid))
        self.out_blocks = nn.ModuleList(blk(skip=True) for _ in range(n_out))
        self.norm = LayerNorm32(D)
        self.head = nn.Linear(D, pp * first)
        self.detail_head = nn.Linear(D, pp * rest[0]) if rest else None
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    def _run(self, block: Block, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.cfg.grad_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, skip, use_reentrant=False)
        return block(x, skip)

    def forward(self, x, t: torch.Tensor, visible: torch.Tensor | None = None):
        """x: (B, C, H, W) noisy input x_t, or (with `visible`) its visible tokens already gathered, in the layout
        of `token_targets` (what masked training feeds: only the visible patches are noised); t: (B,) integer steps
        (or a scalar); visible: (B, S) sorted token indices or None. Returns eps predictions: the full image
        (B, C, H, W) if `visible` is None, else per-token predictions for the visible tokens (layout of
        `trainer.core.masking.patchify`): (B, S, p*p*C) for one token set; for split tokens the pair
        ((B, S/2, p*p*c) cA, (B, S/2, p*p*(C-c)) details), where `visible` holds S/2 indices of each set: cA tokens
        are 0..cells-1, detail tokens cells..2*cells-1 (`visible_indices(..., sets=2)` draws them so; sorted, the
        first half is then the cA set's)."""
        cfg = self.cfg
        image = not isinstance(x, tuple) and x.dim() == 4
        if image and tuple(x.shape[1:]) != (cfg.in_channels, cfg.image_size, cfg.image_size):  # shapes: no sync
            raise ValueError(f"input {tuple(x.shape)}: this model takes (B, {cfg.in_channels}, {cfg.image_size}, "
                             f"{cfg.image_size})")
        if not image and visible is None:
            raise ValueError("visible tokens as input need their indices: pass visible=(B, S) too")
        first = x if image else x[0] if isinstance(x, tuple) else x
        B = first.shape[0]
        t = torch.as_tensor(t, device=first.device).reshape(-1).expand(B)
        dtype = self.pos_embed.dtype  # the module's dtype
        pos = self.pos_embed[:, 1:].expand(B, -1, -1)  # (B, N, D)
        if visible is not None:
            visible = visible.to(first.device)
        if self.detail_embed is None:
            tokens = patchify(x.to(dtype), cfg.patch_size) if image else x.to(dtype)  # (B, N or S, P)
            if visible is not None:
                tokens = gather_tokens(tokens, visible) if image else tokens
                pos = gather_tokens(pos, visible)  # (B, S, .)
            h = self.patch_embed(tokens) + pos  # (B, S, D)
        else:
            c, n = cfg.split_bands, cfg.cells
            if image:
                ca, detail = patchify(x[:, :c].to(dtype), cfg.patch_size), patchify(x[:, c:].to(dtype), cfg.patch_size)
            else:
                ca, detail = x[0].to(dtype), x[1].to(dtype)
            pos_ca, pos_detail = pos[:, :n], pos[:, n:]
            if visible is not None:
                half = visible.shape[1] // 2
                v_ca, v_detail = visible[:, :half], visible[:, half:] - n
                if image:
                    ca, detail = gather_tokens(ca, v_ca), gather_tokens(detail, v_detail)
                pos_ca, pos_detail = gather_tokens(pos_ca, v_ca), gather_tokens(pos_detail, v_detail)
            h = torch.cat([self.patch_embed(ca) + pos_ca, self.detail_embed(detail) + pos_detail], dim=1)
        time = self.time_embed(timestep_embedding(t, cfg.dim).to(h.dtype)).unsqueeze(1)  # (B, 1, D)
        h = torch.cat([time + self.pos_embed[:, :1], h], dim=1)  # (B, 1+S, D)

        skips = []
        for block in self.in_blocks:
            h = self._run(block, h)
            skips.append(h)
        for block in self.mid_blocks:
            h = self._run(block, h)
        for block in self.out_blocks:
            h = self._run(block, h, skips.pop())

        h = self.norm(h[:, 1:])  # drop the time token
        if self.detail_head is None:
            out = self.head(h)  # (B, S, P)
            return out if visible is not None else unpatchify(out, cfg.patch_size, cfg.in_channels, cfg.grid)
        half = h.shape[1] // 2
        ca, detail = self.head(h[:, :half]), self.detail_head(h[:, half:])
        if visible is not None:
            return ca, detail
        c, p = cfg.split_bands, cfg.patch_size
        return torch.cat([unpatchify(ca, p, c, cfg.grid), unpatchify(detail, p, cfg.in_channels - c, cfg.grid)], 1)

    def token_targets(self, x: torch.Tensor, visible: torch.Tensor):
        """`x` (B, C, H, W), e.g. the noise, in the layout `forward(..., visible)` returns its predictions in."""
        cfg = self.cfg
        if self.detail_head is None:
            return gather_tokens(patchify(x, cfg.patch_size), visible.to(x.device))
        c, n, half = cfg.split_bands, cfg.cells, visible.shape[1] // 2
        visible = visible.to(x.device)
        return (gather_tokens(patchify(x[:, :c], cfg.patch_size), visible[:, :half]),
                gather_tokens(patchify(x[:, c:], cfg.patch_size), visible[:, half:] - n))


def flops_per_image(cfg: UViTConfig, n_visible: int | None = None) -> int:
    """Forward FLOPs (2 per multiply-add; matmuls and attention only, as is customary) for one image with
    `n_visible` tokens kept (all tokens when None). Checked against torch's FlopCounterMode in the tests."""
    S = cfg.num_tokens if n_visible is None else n_visible
    L, D, P = S + 1, cfg.dim, cfg.patch_dim
    hidden = int(D * cfg.mlp_ratio)
    per_block = 2 * L * D * (3 * D + D + 2 * hidden) + 2 * 2 * L * L * D  # qkv, proj, mlp; QK^T and AV
    n_in, n_mid, n_out = cfg.depth
    total = per_block * (n_in + n_mid + n_out) + n_out * 2 * L * 2 * D * D  # + long-skip projections
    total += 2 * S * P // cfg.token_sets * D * 2  # patch embed and head (split: each token carries half the values)
    if cfg.mlp_time_embed:
        total += 2 * (D * 4 * D) * 2
    return total


def attention_kernel(cfg: UViTConfig, dtype: torch.dtype, device, tokens: int | None = None) -> tuple[str, str | None]:
    """(the kernel `scaled_dot_product_attention` picks for this model's attention on `device` in `dtype`, a
    warning or None): FLASH_ATTENTION, EFFICIENT_ATTENTION, CUDNN_ATTENTION or MATH. On a GPU the math kernel
    materialises the (L x L) attention matrix per head: the warning says what forces it."""
    device = torch.device(device)
    head_dim, L = cfg.dim // cfg.heads, 1 + (tokens or cfg.num_tokens)
    q = torch.zeros(1, cfg.heads, L, head_dim, dtype=dtype, device=device)
    choice = int(torch._fused_sdp_choice(q, q, q))
    name = next((k for k, v in torch.nn.attention.SDPBackend.__members__.items() if int(v.value) == choice), str(choice))
    warning = None
    if device.type == "cuda" and name == "MATH":
        why = [f"head dim {head_dim} (flash and memory-efficient kernels need a multiple of 8, at most 256)"
               if head_dim % 8 or head_dim > 256 else None,
               f"dtype {str(dtype).removeprefix('torch.')} (flash attention needs fp16 or bf16)"
               if dtype not in (torch.float16, torch.bfloat16) else None]
        warning = (f"attention runs PyTorch's math kernel ({'; '.join(w for w in why if w) or 'this GPU or build'}): "
                   f"it stores the {L}x{L} attention matrix of every head and is several times slower")
    return name, warning
