"""Gaussian diffusion with epsilon prediction: schedules, the MSM/DSM losses and the DDPM/DDIM samplers.

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
    MSM (MaskDM, Lei et al. 2023): noise the FULL image, x_t = q_sample(x0, t, eps), drop the masked patches,
        loss = mean over visible patches of ||eps_theta(x_t[visible], t) - eps[visible]||^2.
    DSM (DDPM eq. 14, "simple" loss): the same with every patch visible.
Samplers (both step from t to an earlier t_prev, with t_prev = -1 meaning alpha_bar = 1, i.e. x_0):
    `ddpm_step`: ancestral sampling from the posterior q(x_prev | x_t, x0_hat) (DDPM eqs. 6-7), variance
        tilde_beta = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev);
        with t_prev < t - 1 this is the respaced chain of Nichol & Dhariwal 2021 (Sec. 4).
    `ddim_step`: DDIM (Song et al. 2021) eq. 12 with sigma_t(eta) of eq. 16; eta = 1 equals `ddpm_step`.
    Both can clip x0_hat (pixel: [-1, 1]; DWT: cA to [-1, 3], details to [-1, 1]). DDIM then either re-derives eps
    from the clipped x0_hat (clip mode "rederive", ours and the DDIM/ADM codebases': the step stays consistent with
    x_t) or keeps the model's raw eps (clip mode "reference": what the MaskDM reference implementation's sampler
    does for eps prediction). The DDPM posterior uses x0_hat and x_t only, so the mode does not change it.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from trainer.dwt import clip_bands

__all__ = ["make_betas", "alphas_cumprod", "posterior_variance", "q_sample", "predict_x0", "eps_from_x0",
           "band_parts", "msm_loss", "dsm_loss", "ddpm_step", "ddim_step", "ddim_timesteps", "make_clip", "sample",
           "SCHEDULES", "SAMPLERS", "CLIP_MODES"]

SCHEDULES = ("linear", "cosine")
SAMPLERS = ("ddim", "ddpm")
CLIP_MODES = ("rederive", "reference")  # after clipping x0_hat, DDIM re-derives eps from it, or keeps the raw eps
ClipFn = Callable[[torch.Tensor], torch.Tensor]


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


def _ab(alphas_cumprod: torch.Tensor, t: int) -> float:
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


def msm_loss(model, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor,
             visible: torch.Tensor | None = None, weighting: str = "uniform") -> torch.Tensor:
    """Masked score matching: epsilon-MSE over the visible patches only (all patches when visible is None).
    The noise is added to the full image before masking; the reduction is in fp32. Returns a scalar.
    `weighting` (config loss.dwt_weighting, DWT input): "uniform", one mean over every predicted value; "bands",
    mean over the cA values + mean over the detail values (the reference's DWT loss)."""
    x_t = q_sample(x0, t, noise, alphas_cumprod)
    if visible is not None:
        visible = visible.to(x0.device)
    pred = model(x_t, t, visible=visible)
    target = noise if visible is None else model.token_targets(noise, visible)  # (B, S, p*p*C) or a pair
    if weighting == "bands":
        return sum(F.mse_loss(p.float(), q.float()) for p, q in zip(band_parts(pred), band_parts(target)))
    if weighting != "uniform":
        raise ValueError(f"unknown loss weighting {weighting!r}; choose uniform or bands")
    if isinstance(pred, tuple):  # split tokens: one mean over both sets' values
        return (sum((p.float() - q.float()).square().sum() for p, q in zip(pred, target))
                / sum(p.numel() for p in pred))
    return F.mse_loss(pred.float(), target.float())


def dsm_loss(model, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor,
             visible: torch.Tensor | None = None) -> torch.Tensor:
    """Denoising score matching (DDPM's simple loss): MSM with mask rate 0. `visible` must be None."""
    assert visible is None, "dsm_loss trains on every patch; use msm_loss for masked training"
    return msm_loss(model, x0, t, noise, alphas_cumprod)


# --- samplers --------------------------------------------------------------------------------------------------

Generators = torch.Generator | Sequence[torch.Generator] | None


def _randn(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Standard normal like x, drawn on the generator's device (so a CPU generator gives the same noise on
    every device and GPU count), then moved to x. A sequence of generators, one per batch element, draws each
    element's noise from its own: an image then depends on its generator only, not on the batch it is in."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {x.shape[0]}")
        return torch.stack([_randn(x[0], g) for g in generator])
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32).to(x)


def ddpm_step(x_t: torch.Tensor, eps: torch.Tensor, t: int, alphas_cumprod: torch.Tensor,
              generator: Generators = None, clip: ClipFn | None = None,
              t_prev: int | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """One ancestral step x_t -> x_{t_prev} (t_prev = t - 1 by default) from q(x_prev | x_t, x0_hat)."""
    t_prev = t - 1 if t_prev is None else t_prev
    ab_t, ab_prev = _ab(alphas_cumprod, t), _ab(alphas_cumprod, t_prev)
    beta = 1 - ab_t / ab_prev  # beta of the (possibly respaced) step
    x0 = predict_x0(x_t, eps, ab_t)
    if clip is not None:
        x0 = clip(x0)
    # posterior mean, DDPM eq. 7: mu = sqrt(ab_prev) beta / (1 - ab_t) x0 + sqrt(alpha) (1 - ab_prev) / (1 - ab_t) x_t
    mean = (math.sqrt(ab_prev) * beta / (1 - ab_t)) * x0 + (math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab_t)) * x_t
    if t_prev < 0:
        return mean
    var = beta * (1 - ab_prev) / (1 - ab_t)
    z = _randn(x_t, generator) if noise is None else noise
    return mean + math.sqrt(var) * z


def ddim_step(x_t: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int, alphas_cumprod: torch.Tensor,
              eta: float = 0.0, generator: Generators = None, clip: ClipFn | None = None,
              noise: torch.Tensor | None = None, clip_mode: str = "rederive") -> torch.Tensor:
    """One DDIM step x_t -> x_{t_prev} (DDIM eq. 12):
        x_prev = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - sigma^2) eps + sigma z,
        sigma = eta sqrt((1 - ab_prev) / (1 - ab_t)) sqrt(1 - ab_t / ab_prev)      (eq. 16)."""
    ab_t, ab_prev = _ab(alphas_cumprod, t), _ab(alphas_cumprod, t_prev)
    x0 = predict_x0(x_t, eps, ab_t)
    if clip is not None:
        x0 = clip(x0)
        if clip_mode == "rederive":
            eps = eps_from_x0(x_t, x0, ab_t)
        elif clip_mode != "reference":
            raise ValueError(f"unknown clip mode {clip_mode!r}; choose one of {CLIP_MODES}")
    sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev))
    x_prev = math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - sigma ** 2, 0.0)) * eps
    if sigma > 0:
        x_prev = x_prev + sigma * (_randn(x_t, generator) if noise is None else noise)
    return x_prev


def ddim_timesteps(T: int, steps: int) -> list[int]:
    """`steps` descending steps from T-1, evenly spaced ("trailing" spacing, so sampling always starts at the
    last training step: Lin et al. 2024, Table 2); steps == T gives T-1, ..., 0."""
    if not 1 <= steps <= T:
        raise ValueError(f"number of sampling steps must be in [1, {T}], got {steps}")
    return [int(round(T - i * T / steps)) - 1 for i in range(steps)]


def make_clip(mode: str | None, data_channels: int = 3) -> ClipFn | None:
    """x0 clipping for sampling: "pixel" -> [-1, 1]; "dwt" -> per band (cA [-1, 3], details [-1, 1]); None."""
    if mode in (None, "none"):
        return None
    if mode == "pixel":
        return lambda x0: x0.clamp(-1, 1)
    if mode == "dwt":
        return lambda x0: clip_bands(x0, data_channels)
    raise ValueError(f"unknown clip mode {mode!r}; choose pixel, dwt or none")


@torch.no_grad()
def sample(eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], shape: tuple[int, ...],
           alphas_cumprod: torch.Tensor, *, sampler: str = "ddim", steps: int = 250, eta: float = 0.0,
           clip: ClipFn | None = None, generator: Generators = None,
           device: torch.device | str = "cpu", progress: bool = False, clip_mode: str = "rederive") -> torch.Tensor:
    """Draw x_T ~ N(0, I) and denoise with `steps` sampler steps; eps_fn(x_t, t (B,) long) -> eps.
    sampler "ddpm" is ancestral sampling (respaced when steps < T); "ddim" uses `eta` (0: deterministic).
    `generator`: one for the batch, or one per image (see `_randn`). `clip_mode`: see CLIP_MODES (DDIM only)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    if clip_mode not in CLIP_MODES:
        raise ValueError(f"unknown clip mode {clip_mode!r}; choose one of {CLIP_MODES}")
    T = len(alphas_cumprod)
    ts = ddim_timesteps(T, steps)
    x = _randn(torch.empty(shape, device=device), generator)
    for i, t in enumerate(tqdm(ts, desc=f"{sampler} sampling", disable=not progress, leave=False)):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        eps = eps_fn(x, torch.full((shape[0],), t, device=device, dtype=torch.long)).to(x.dtype)
        if sampler == "ddpm":
            x = ddpm_step(x, eps, t, alphas_cumprod, generator, clip, t_prev=t_prev)
        else:
            x = ddim_step(x, eps, t, t_prev, alphas_cumprod, eta, generator, clip, clip_mode=clip_mode)
    return x
