"""DDPM and DDIM sampling with an epsilon-prediction model (schedules: `trainer.core.diffusion`), and drawing
numbered images from a model into a folder.

Samplers (both step from t to an earlier t_prev, with t_prev = -1 meaning alpha_bar = 1, i.e. x_0):
    `ddpm_step`: ancestral sampling from the posterior q(x_prev | x_t, x0_hat) (DDPM eqs. 6-7), variance
        tilde_beta = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev);
        with t_prev < t - 1 this is the respaced chain of Nichol & Dhariwal 2021 (Sec. 4).
    `ddim_step`: DDIM (Song et al. 2021) eq. 12 with sigma_t(eta) of eq. 16; eta = 1 equals `ddpm_step`.
    Both can clip x0_hat (pixel: [-1, 1]; DWT: cA to [-1, 3], details to [-1, 1]). DDIM then either re-derives eps
    from the clipped x0_hat (clip mode "rederive", ours and the DDIM/ADM codebases': the step stays consistent with
    x_t) or keeps the model's raw eps (clip mode "reference": what the MaskDM reference implementation's sampler
    does for eps prediction). The DDPM posterior uses x0_hat and x_t only, so the mode does not change it.

Image i of a set is drawn from its own generator, seeded with (seed, i) (`image_generators`), and rank r of a
multi-GPU launch takes a contiguous slice of the indices: the same seed gives the same images whatever the GPU
count and batch size (up to the last bit of batched float maths, which the uint8 rounding hides almost always).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from trainer.core.diffusion import ab_at, alphas_cumprod, eps_from_x0, make_betas, predict_x0
from trainer.core.dwt import clip_bands
from trainer.core.images import to_rgb_uint8
from trainer.core.settings import CLIP_MODES, SAMPLERS, SamplingConfig

__all__ = ["ddpm_step", "ddim_step", "ddim_timesteps", "make_clip", "sample", "image_generators", "generate",
           "sample_to_folder"]

ClipFn = Callable[[torch.Tensor], torch.Tensor]


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
    ab_t, ab_prev = ab_at(alphas_cumprod, t), ab_at(alphas_cumprod, t_prev)
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
    ab_t, ab_prev = ab_at(alphas_cumprod, t), ab_at(alphas_cumprod, t_prev)
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
           alphas_cumprod: torch.Tensor, *, steps: int, eta: float, sampler: str = "ddim",
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


# --- numbered images from a model -------------------------------------------------------------------------------

def image_generators(seed: int, indices, device: str = "cpu") -> list[torch.Generator]:
    """One generator per image index, seeded with (seed, index): independent of batching and GPU count."""
    return [torch.Generator(device).manual_seed(int(np.random.SeedSequence([seed, int(i)]).generate_state(1)[0]))
            for i in indices]


@torch.no_grad()
def generate(model: torch.nn.Module, cfg, indices, sampling: SamplingConfig,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(len(indices), H, W, 3) uint8 RGB images number `indices` of the set fixed by `sampling` (its n unused);
    `cfg`: the model's ExperimentConfig (input mode, size, beta schedule)."""
    m = cfg.model
    device = next(model.parameters()).device
    ab = alphas_cumprod(make_betas(cfg.train.schedule))

    def eps_fn(x, t):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            return model(x, t).float()

    x = sample(eps_fn, (len(indices), m.in_channels, m.model_size, m.model_size), ab, sampler=sampling.sampler,
               steps=sampling.steps, eta=sampling.eta, clip=make_clip(m.input),
               generator=image_generators(sampling.seed, indices), device=device, clip_mode=sampling.clip_mode)
    return to_rgb_uint8(x, m.input)


def sample_to_folder(model, cfg, out: str | Path, sampling: SamplingConfig, *, batch: int = 16,
                     dtype: torch.dtype = torch.float32, rank: int = 0, world: int = 1,
                     progress: bool = True) -> list[Path]:
    """Images 0..sampling.n-1 as OUT/images/NNNNNN.png; this rank draws its slice, skipping files that exist
    (a killed job resumes). Returns the paths of this rank's images."""
    from PIL import Image

    n = sampling.n
    folder = Path(out) / "images"
    folder.mkdir(parents=True, exist_ok=True)
    mine = range(rank * n // world, (rank + 1) * n // world)
    paths = [folder / f"{i:06d}.png" for i in mine]
    todo = [i for i, p in zip(mine, paths) if not p.exists()]
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), unit="img", desc=f"sampling (rank {rank})",
               disable=not progress, dynamic_ncols=True)
    for start in range(0, len(todo), batch):
        chunk = todo[start:start + batch]
        images = generate(model, cfg, chunk, sampling, dtype)
        for i, img in zip(chunk, images.numpy()):
            tmp = folder / f".{i:06d}.png.tmp"
            Image.fromarray(img).save(tmp, format="PNG")
            os.replace(tmp, folder / f"{i:06d}.png")  # a killed job never leaves a half-written image
        bar.update(len(chunk))
    bar.close()
    return paths
