"""Experiment configuration: one frozen dataclass tree, read from YAML (`configs/*.yaml`), validated on
construction, saved with every run and inside every checkpoint. Each hyperparameter has exactly one home: here
(model, mask, data, optimiser, schedule, steps, batch) or in the DeepSpeed JSON (ZeRO stage, precision, gradient
clipping, communication); never in argparse defaults.

Batch arithmetic (DESIGN.md): global batch = micro batch x gradient accumulation x world size, computed once by
`batch_arithmetic` from `train.global_batch`, `train.micro_batch` and the launched world size.
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from trainer.diffusion import SCHEDULES
from trainer.masking import MASK_KINDS
from trainer.models import PRESETS
from trainer.stream import ORDERS

__all__ = ["ModelConfig", "MaskConfig", "DataConfig", "OptimConfig", "TrainConfig", "ExperimentConfig",
           "batch_arithmetic"]


@dataclass(frozen=True)
class ModelConfig:
    preset: str = "S"
    input: str = "dwt"            # "dwt": 12 Haar bands at half the crop size; "pixel": RGB at image_size
    image_size: int = 256         # side of the training images in pixels
    patch_size: int = 4
    grad_checkpoint: bool = False
    overrides: dict = field(default_factory=dict)  # any UViTConfig field, e.g. {dim: 64, depth: [1, 1, 1]}

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"model.preset {self.preset!r}: choose one of {list(PRESETS)}")
        if self.input not in ("dwt", "pixel"):
            raise ValueError(f"model.input {self.input!r}: choose dwt or pixel")
        side = self.model_size
        if self.image_size % 2 or side % self.patch_size:
            raise ValueError(f"model.image_size {self.image_size}: the model input side {side} must be a multiple "
                             f"of patch_size {self.patch_size}")

    @property
    def in_channels(self) -> int:
        return 12 if self.input == "dwt" else 3

    @property
    def model_size(self) -> int:
        """Side of the model input: half the image in DWT mode."""
        return self.image_size // 2 if self.input == "dwt" else self.image_size


@dataclass(frozen=True)
class MaskConfig:
    kind: str = "block"
    rate: float = 0.9             # 0: ordinary denoising score matching on every patch
    block: int = 4

    def __post_init__(self):
        if self.kind not in MASK_KINDS:
            raise ValueError(f"mask.kind {self.kind!r}: choose one of {MASK_KINDS}")
        if not 0 <= self.rate < 1:
            raise ValueError(f"mask.rate {self.rate}: must be in [0, 1)")


@dataclass(frozen=True)
class DataConfig:
    sources: tuple = ()           # shard sets: folders or URLs with manifest.json, brace patterns
    weights: tuple | None = None  # mixing weights, one per source
    order: str = "resampled"      # "resampled" (pre-training) or "exact" (epochs: fine-tuning, evaluation)
    workers: int = 4              # DataLoader workers per rank
    buffer: int = 1000
    shards_per_chunk: int = 4
    flip: bool = True

    def __post_init__(self):
        object.__setattr__(self, "sources", tuple(self.sources))
        if self.weights is not None:
            object.__setattr__(self, "weights", tuple(self.weights))
        if self.order not in ORDERS:
            raise ValueError(f"data.order {self.order!r}: choose one of {ORDERS}")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 2e-4
    betas: tuple = (0.99, 0.99)   # AdamW, as the paper
    weight_decay: float = 0.03
    warmup_steps: int = 0         # linear warm-up, then constant

    def __post_init__(self):
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if self.lr <= 0 or len(self.betas) != 2:
            raise ValueError(f"optim: lr must be > 0 and betas two numbers, got lr={self.lr} betas={self.betas}")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 100_000
    global_batch: int = 256
    micro_batch: int = 32
    schedule: str = "cosine"      # beta schedule, T = 1000
    ema_decay: float = 0.999
    ema_warmup: bool = True       # decay 1-(1+k)^(-2/3) capped at ema_decay (trainer/ema.py): short runs' EMA is usable
    ema_every: int = 1            # update the EMA every N optimiser steps (the reference's L-DWT runs: 10)
    seed: int = 0
    log_every: int = 50
    sample_every: int = 5000
    ckpt_every: int = 5000
    sample_n: int = 16
    sample_steps: int = 50
    sample_eta: float = 1.0       # DDIM eta of the grids: 1 (stochastic) shows young models fairly; 0 saturates them
    tensorboard: bool = False     # also write the training records to RUN_DIR/tensorboard (needs tensorboard)
    keep_last: int = 0            # keep only the newest N stepN checkpoints (0: keep all; see trainer/checkpoints.py)
    max_nonfinite: int = 20       # fp16: this many consecutive overflowing steps stop the run (see trainer/loop.py)

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"train.schedule {self.schedule!r}: choose one of {SCHEDULES}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"train.ema_decay {self.ema_decay}: must be in [0, 1)")
        if self.keep_last < 0:
            raise ValueError(f"train.keep_last {self.keep_last}: 0 (keep every checkpoint) or the number to keep")
        if min(self.steps, self.global_batch, self.micro_batch, self.max_nonfinite, self.ema_every) < 1:
            raise ValueError("train.steps, global_batch, micro_batch, max_nonfinite and ema_every must be >= 1")


SECTIONS = {"model": ModelConfig, "mask": MaskConfig, "data": DataConfig, "optim": OptimConfig,
            "train": TrainConfig}


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "ExperimentConfig":
        unknown = set(d) - {"name", *SECTIONS}
        if unknown:
            raise ValueError(f"{where}: unknown top-level keys {sorted(unknown)}; expected name, {list(SECTIONS)}")
        parts = {}
        for key, kind in SECTIONS.items():
            section = d.get(key) or {}
            allowed = {f.name for f in fields(kind)}
            bad = set(section) - allowed
            if bad:
                raise ValueError(f"{where}: unknown keys {sorted(bad)} in '{key}'; allowed: {sorted(allowed)}")
            parts[key] = kind(**section)
        return cls(name=str(d.get("name", "run")), **parts)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict | None = None) -> "ExperimentConfig":
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"--config {path}: no such file (see configs/ for the paper's runs)")
        d = yaml.safe_load(path.read_text()) or {}
        for dotted, value in (overrides or {}).items():  # e.g. {"train.steps": 10}
            section, _, key = dotted.partition(".")
            d.setdefault(section, {})[key] = value
        return cls.from_dict(d, str(path))

    def replace(self, **sections) -> "ExperimentConfig":
        return dataclasses.replace(self, **sections)

    def to_dict(self) -> dict:
        return _plain(asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _plain(x):
    """Tuples -> lists, recursively (YAML/JSON friendly)."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def batch_arithmetic(global_batch: int, micro_batch: int, world: int) -> int:
    """Gradient accumulation steps such that global = micro x accumulation x world; refuses what does not divide."""
    per_step = micro_batch * world
    if global_batch % per_step:
        raise ValueError(f"train.global_batch {global_batch} is not a multiple of train.micro_batch {micro_batch} "
                         f"x world size {world} = {per_step}: change micro_batch or the number of GPUs")
    return global_batch // per_step
