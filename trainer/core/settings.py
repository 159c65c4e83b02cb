"""The names every layer validates against, defined once, and the sampling settings. Imports no torch: the
experiment config (`trainer.train.config`) and the commands' argument parsers read these without loading the
model stack.

Registries (tuples of the accepted names; each module that implements one imports its tuple from here):
    INPUT_MODES  model input: "dwt" (12 Haar bands at half the crop side) or "pixel" (RGB)
    MASK_KINDS   `trainer.core.masking`: patch-wise, block-wise or crop masks
    SCHEDULES    `trainer.core.diffusion`: beta schedules
    SAMPLERS     `trainer.core.sampling`: DDIM (eta) or ancestral DDPM
    CLIP_MODES   after clipping x0_hat, DDIM re-derives eps from it ("rederive") or keeps the raw eps ("reference")
    ORDERS       `trainer.data.stream`: "resampled" (endless weighted draw) or "exact" (epochs)
    FID_IMPLS    `trainer.eval.metrics`: the FID Inception protocol (TF-FID resize, or pytorch-fid's)
    DTYPES       names of the autocast / storage dtypes (`torch_dtype` turns one into a torch.dtype);
                 EXPORT_DTYPES those an exported model can store
    DWT_TOKENS, DWT_WEIGHTINGS, DECAY_GROUPS   model.dwt_tokens, loss.dwt_weighting, optim.decay (trainer.train.config)
    PRESETS      U-ViT sizes (`trainer.core.models`); the paper's S/B/L and `tiny` for tests and the quickstart

`SamplingConfig` is what a set of generated images depends on (sampler, steps, eta, clip mode, N, seed): the
training grids, `trainer.sample`, `trainer.evaluate` and `trainer.schedule` all take their settings from one.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, replace

__all__ = ["INPUT_MODES", "MASK_KINDS", "SCHEDULES", "SAMPLERS", "CLIP_MODES", "ORDERS", "FID_IMPLS", "DTYPES",
           "EXPORT_DTYPES", "DWT_TOKENS", "DWT_WEIGHTINGS", "DECAY_GROUPS", "PRESETS", "torch_dtype", "check_choice", "SamplingConfig"]

INPUT_MODES = ("dwt", "pixel")
MASK_KINDS = ("patch", "block", "crop")
SCHEDULES = ("linear", "cosine")
SAMPLERS = ("ddim", "ddpm")
CLIP_MODES = ("rederive", "reference")
ORDERS = ("resampled", "exact")
FID_IMPLS = ("tf", "pytorch-fid")
DTYPES = ("fp32", "fp16", "bf16")
EXPORT_DTYPES = ("fp32", "fp16")   # what an exported model can store (`trainer.export --dtype`)
DWT_TOKENS = ("joint", "split")          # model.dwt_tokens
DWT_WEIGHTINGS = ("uniform", "bands")    # loss.dwt_weighting
DECAY_GROUPS = ("matrices", "all")       # optim.decay

PRESETS: dict[str, dict] = {
    "tiny": dict(dim=64, heads=4, depth=(1, 1, 1)),
    "S": dict(dim=512, heads=8, depth=(6, 1, 6)),
    "B": dict(dim=768, heads=12, depth=(6, 1, 6)),
    "L": dict(dim=1024, heads=16, depth=(8, 1, 8), qv_bias=True),
}


def torch_dtype(name: str):
    """"fp32" / "fp16" / "bf16" -> the torch dtype."""
    import torch

    check_choice(name, DTYPES, "dtype")
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def check_choice(value, choices, what: str) -> None:
    """ValueError naming `what`, the value and the choices when `value` is not one of them."""
    if value not in choices:
        raise ValueError(f"{what} {value!r}: choose one of {list(choices)}")


@dataclass(frozen=True)
class SamplingConfig:
    """How a set of images is drawn from a model. Image i comes from its own generator seeded with (seed, i)
    (`trainer.core.sampling.image_generators`), so the same settings give the same images on any GPU count."""
    sampler: str = "ddim"
    steps: int = 250              # sampler steps, 1..1000 (trailing spacing)
    eta: float = 1.0              # DDIM eta: 1 (DDPM-like, as the reference evaluates); 0: deterministic
    clip_mode: str = "rederive"   # see CLIP_MODES
    n: int = 64                   # number of images
    seed: int = 0

    def __post_init__(self):
        check_choice(self.sampler, SAMPLERS, "sampler")
        check_choice(self.clip_mode, CLIP_MODES, "clip mode")
        if not 1 <= self.steps <= 1000:
            raise ValueError(f"sampling steps {self.steps}: must be in [1, 1000]")
        if self.n < 1:
            raise ValueError(f"number of images {self.n}: must be >= 1")
        if not 0 <= self.eta < float("inf"):  # NaN fails too
            raise ValueError(f"eta {self.eta}: must be a finite number >= 0")

    def replace(self, **changes) -> "SamplingConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """e.g. "ddim250-eta1-n64-seed0" (with "-clipreference" for the reference clip mode): folder names."""
        clip = "" if self.clip_mode == "rederive" else f"-clip{self.clip_mode}"
        return f"{self.sampler}{self.steps}-eta{self.eta:g}{clip}-n{self.n}-seed{self.seed}"

    # --- the flags of trainer.sample / trainer.evaluate --------------------------------------------------------

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser, n_default: int | None = None, n_help: str = "") -> None:
        """--n/--num-images, --steps, --sampler, --eta, --clip-mode, --seed with SamplingConfig's defaults."""
        d = SamplingConfig()
        p.add_argument("--n", "--num-images", dest="n", type=int, default=n_default,
                       help=n_help or f"number of images (default {n_default}; spell it --num-images after a "
                       f"launcher: deepspeed and torchrun take --n for an abbreviation of their own flags)")
        p.add_argument("--steps", type=int, default=d.steps, help=f"sampler steps, 1..1000 (default {d.steps})")
        p.add_argument("--sampler", default=d.sampler, choices=SAMPLERS)
        p.add_argument("--eta", type=float, default=d.eta, help=f"DDIM eta (default {d.eta:g}: DDPM-like, as the "
                       f"reference evaluates; 0: deterministic)")
        p.add_argument("--clip-mode", default=d.clip_mode, choices=CLIP_MODES,
                       help="DDIM after clipping x0: rederive eps from the clipped x0 (default, ours) or keep the "
                            "model's raw eps (reference: the MaskDM reference implementation's sampler)")
        p.add_argument("--seed", type=int, default=d.seed)

    def to_args(self) -> list[str]:
        """The flags that give these settings to `trainer.sample` / `trainer.evaluate` (for chained jobs; the
        number as --num-images, which a launcher does not take for one of its own flags)."""
        return ["--num-images", str(self.n), "--steps", str(self.steps), "--sampler", self.sampler,
                "--eta", f"{self.eta:g}", "--clip-mode", self.clip_mode, "--seed", str(self.seed)]

    @classmethod
    def from_args(cls, args: argparse.Namespace, n: int | None = None) -> "SamplingConfig":
        """From the flags of `add_arguments`; SystemExit naming the flag for a bad value."""
        try:
            return cls(sampler=args.sampler, steps=args.steps, eta=args.eta, clip_mode=args.clip_mode,
                       n=n if n is not None else args.n, seed=args.seed)
        except ValueError as e:
            raise SystemExit(f"error: {e} (--n, --steps, --sampler, --eta, --clip-mode, --seed)") from None
