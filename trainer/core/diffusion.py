"""Gaussian diffusion with epsilon prediction: schedules and the MSM/DSM losses (the samplers that use them:
`trainer.core.sampling`).

Symbols (zero-based steps t = 0..T-1, as the reference scheduler implementations):
    beta_t                      noise schedule (`make_betas`)
    alpha_t = 1 - beta_t,  alpha_bar_t = prod_{s<=t} alpha_s        (`alphas_cumprod`)
    q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)    DDPM (Ho et al. 2020) eq. 4 -> `q_sample`
    x0_hat = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)  DDPM eq. 15 -> `predict_x0`
Schedules:
    linear: beta linear from 1e-4 to 0.02 (DDPM), both scaled by 1000/T so other T keep the same shape.
    cosine: alpha_bar(u) = cos^2(((u/T + s) / (1 + s)) * pi/2), s = 0.008,
            beta_t = min(1 - alpha_bar(t+1)/alpha_bar(t), 0.999)   (Nichol & Dhariwal 2021, eq. 17)
Losses (one signature, `loss(model, x0, t, noise, alphas_cumprod, visible=None)`):
    MSM (MaskDM, Lei et al. 2023): x_t = q_sample(x0, t, eps) with the masked patches dropped,
        loss = mean over visible patches of ||eps_theta(x_t[visible], t) - eps[visible]||^2. q_sample acts per
        element, so noising the visible patches only (what `msm_loss` does) equals noising the full image and
        dropping the rest, at a tenth of the normals and arithmetic for a 90% mask.
    DSM (DDPM eq. 14, "simple" loss): the same with every patch visible.
"""
from __future__ import annotations

import math
import torch
import torch.nn.functional as F

from trainer.core.settings import DWT_WEIGHTINGS, SCHEDULES

__all__ = ["make_betas", "alphas_cumprod", "posterior_variance", "q_sample", "predict_x0", "eps_from_x0",
           "band_parts", "msm_loss", "dsm_loss"]


# --- schedules -------------------------------------------------------------------------------------------------

def make_betas(kind: str, T: int = 1000, cosine_s: float = 0.008) -> torch.Tensor:
    """beta_t for t = 0..T-1, float64."""
    if kind == "linear":
        scale = 1000.0 / T
        return torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64)
    if kind == "cosine":
        u = torch.arange(T + 1, dtype=torch.float64)
        f = torch.cos((u / T + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown beta schedule {kind!r}; choose one of {SCHEDULES}")


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), float64."""
    return torch.cumprod(1 - betas.double(), dim=0)


def ab_at(alphas_cumprod: torch.Tensor, t: int) -> float:
    """alpha_bar_t as a Python float, with alpha_bar_{-1} = 1."""
    return 1.0 if t < 0 else float(alphas_cumprod[t])


def posterior_variance(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """tilde_beta_t = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) for t = 0..T-1 (DDPM eq. 7); 0 at t = 0."""
    ab = alphas_cumprod.double()
    ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
    return (1 - ab / ab_prev) * (1 - ab_prev) / (1 - ab)


def _coefs(alphas_cumprod: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t) for a (B,) step tensor, computed in float64 (1 - alpha_bar
    cancels badly in fp32 at small t), returned in fp32 on x's device, shaped to broadcast against x."""
    ab = alphas_cumprod.to(device=x.device, dtype=torch.float64)[t.to(x.device)]
    shape = (-1, *([1] * (x.dim() - 1)))
    return ab.sqrt().float().view(shape), (1 - ab).sqrt().float().view(shape)


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps, computed in fp32, returned in x0's dtype."""
    sqrt_ab, sqrt_one_minus_ab = _coefs(alphas_cumprod, t, x0)
    return (sqrt_ab * x0.float() + sqrt_one_minus_ab * noise.float()).to(x0.dtype)


def predict_x0(x_t: torch.Tensor, eps: torch.Tensor, ab_t: float) -> torch.Tensor:
    return (x_t - math.sqrt(1 - ab_t) * eps) / math.sqrt(ab_t)


def eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, ab_t: float) -> torch.Tensor:
    return (x_t - math.sqrt(ab_t) * x0) / math.sqrt(1 - ab_t)


# --- losses ----------------------------------------------------------------------------------------------------

def band_parts(x, data_channels: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(cA part, detail part) of a DWT-mode prediction or target in any of the model's layouts: a full image
    (B, 12, H, W); joint tokens (B, S, p*p*12) (features ordered (p1, p2, C)); split tokens, already a pair."""
    if isinstance(x, tuple):
        return x
    if x.dim() == 4:
        return x[:, :data_channels], x[:, data_channels:]
    B, S, P = x.shape
    cells = x.view(B, S, -1, 4 * data_channels)  # (B, S, p*p, C)
    return cells[..., :data_channels], cells[..., data_channels:]


def msm_loss(model, x0: torch.Tensor, t: torch.Tensor, noise, alphas_cumprod: torch.Tensor,
             visible: torch.Tensor | None = None, weighting: str = "uniform",
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Masked score matching: epsilon-MSE over the visible patches only (all patches when visible is None); the
    reduction is in fp32. Returns a scalar. With `visible`, only what the model sees is computed: the visible
    patches of x0 are gathered first and noised there (q_sample is per element, so this equals noising the full
    image and dropping the masked patches). `noise`: full-image shaped (B, C, H, W) (its visible patches are
    used), already in the visible tokens' layout (`model.token_targets`), or None to draw it from `generator` on
    x0's device (in the tokens' layout: no normals for the dropped patches).
    `weighting` (config loss.dwt_weighting, DWT input): "uniform", one mean over every predicted value; "bands",
    mean over the cA values + mean over the detail values (the reference's DWT loss)."""
    def draw(like):
        return torch.randn(like.shape, generator=generator, device=like.device, dtype=torch.float32).to(like.dtype)

    if visible is None:
        noise = draw(x0) if noise is None else noise
        x_in, target = q_sample(x0, t, noise, alphas_cumprod), noise
    else:
        visible = visible.to(x0.device)
        x0_vis = model.token_targets(x0, visible)                       # (B, S, p*p*C) or a pair
        pair = isinstance(x0_vis, tuple)
        if noise is None:
            target = tuple(map(draw, x0_vis)) if pair else draw(x0_vis)
        elif not isinstance(noise, tuple) and noise.dim() == 4:       # a full-image draw: its visible patches
            target = model.token_targets(noise, visible)
        else:
            target = noise
        x_in = (tuple(q_sample(a, t, e, alphas_cumprod) for a, e in zip(x0_vis, target)) if pair
                else q_sample(x0_vis, t, target, alphas_cumprod))
    pred = model(x_in, t, visible=visible)
    if weighting == "bands":
        return sum(F.mse_loss(p.float(), q.float()) for p, q in zip(band_parts(pred), band_parts(target)))
    if weighting != "uniform":
        raise ValueError(f"unknown loss weighting {weighting!r}; choose {' or '.join(DWT_WEIGHTINGS)}")
    if isinstance(pred, tuple):  # split tokens: one mean over both sets' values
        return (sum((p.float() - q.float()).square().sum() for p, q in zip(pred, target))
                / sum(p.numel() for p in pred))
    return F.mse_loss(pred.float(), target.float())


def dsm_loss(model, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor,
             visible: torch.Tensor | None = None) -> torch.Tensor:
    """Denoising score matching (DDPM's simple loss): MSM with mask rate 0. `visible` must be None."""
    assert visible is None, "dsm_loss trains on every patch; use msm_loss for masked training"
    return msm_loss(model, x0, t, noise, alphas_cumprod)
