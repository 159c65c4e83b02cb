"""Experiment configuration: one frozen dataclass tree, read from YAML (`configs/*.yaml`), validated on
construction, saved with every run and inside every checkpoint. Each hyperparameter has exactly one home: here
(model, mask, data, optimiser, schedule, steps, batch) or in the DeepSpeed JSON (ZeRO stage, precision, gradient
clipping, communication); never in argparse defaults.

Values are coerced to each field's annotated type, from YAML files and `--set` alike (`parse_overrides`): PyYAML
reads `1e-3` (no dot) as a string, and `--set data.sources=DIR` (no brackets) as one string, not a list.

Batch arithmetic (docs/design.md): global batch = micro batch x gradient accumulation x world size, computed once by
`batch_arithmetic` from `train.global_batch`, `train.micro_batch` and the launched world size.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from pipeline.credentials import credentials_in_url
from trainer.core.settings import (DECAY_GROUPS, DWT_TOKENS, DWT_WEIGHTINGS, INPUT_MODES, MASK_KINDS, ORDERS, PRESETS,
                                   SCHEDULES, SamplingConfig)

__all__ = ["ModelConfig", "MaskConfig", "DataConfig", "OptimConfig", "LossConfig", "TrainConfig",
           "ExperimentConfig", "Allowed", "parse_overrides", "batch_arithmetic"]


# --- allowed values: every number field declares its range once, checked on construction ----------------------

@dataclass(frozen=True)
class Allowed:
    """The values a number field accepts (each item, for a tuple field): finite, lo <= v (lo < v when lo_open),
    and v < hi (v <= hi when not hi_open) when hi is given."""
    lo: float
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = True

    def admits(self, v) -> bool:
        return (math.isfinite(v) and (v > self.lo if self.lo_open else v >= self.lo)
                and (self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)))

    def __str__(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo}"
        return f"in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"


POSITIVE, NON_NEGATIVE, AT_LEAST_ONE, FRACTION = Allowed(0, lo_open=True), Allowed(0), Allowed(1), Allowed(0, 1)


def number(default, allowed: Allowed):
    """A dataclass field whose values `check_numbers` holds to `allowed`."""
    return field(default=default, metadata={"allowed": allowed})


def check_numbers(cfg, section: str) -> None:
    """ValueError naming SECTION.KEY, the value and its allowed range for the first number field of `cfg` outside
    the range its `number(...)` declaration gives (NaN and infinities never pass)."""
    hints = _hints(type(cfg))
    for f in dataclasses.fields(cfg):
        allowed, value = f.metadata.get("allowed"), getattr(cfg, f.name)
        if allowed is None or value is None:
            continue
        many = isinstance(value, tuple)
        integer = int in (typing.get_args(hints[f.name]) or (hints[f.name],))
        kind = "an integer" if integer else "a finite number"
        for v in value if many else (value,):
            if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)) or not allowed.admits(v):
                shown = tuple(value) if many else value
                raise ValueError(f"{section}.{f.name} = {shown!r}: {'each item ' if many else ''}must be {kind} "
                                 f"{allowed}")


@dataclass(frozen=True)
class ModelConfig:
    preset: str = "S"
    input: str = "dwt"            # "dwt": 12 Haar bands at half the crop size; "pixel": RGB at image_size
    image_size: int = number(256, Allowed(2))  # side of the training images in pixels
    patch_size: int = number(4, AT_LEAST_ONE)
    grad_checkpoint: bool = False
    compile: bool = False         # torch.compile of the model in training (DeepSpeed's engine.compile: same weight names)
    # DWT input only. "joint" (ours): one token per 4x4 patch of all 12 bands (1024 tokens at 256 px); "split" (the
    # reference): cA and the 9 detail bands are two token sets of their own, masked independently (2048 tokens)
    dwt_tokens: str = "joint"
    overrides: dict = field(default_factory=dict)  # any UViTConfig field, e.g. {dim: 64, depth: [1, 1, 1]}

    def __post_init__(self):
        check_numbers(self, "model")
        if self.preset not in PRESETS:
            raise ValueError(f"model.preset {self.preset!r}: choose one of {list(PRESETS)}")
        if self.input not in INPUT_MODES:
            raise ValueError(f"model.input {self.input!r}: choose {' or '.join(INPUT_MODES)}")
        if self.dwt_tokens not in DWT_TOKENS:
            raise ValueError(f"model.dwt_tokens {self.dwt_tokens!r}: choose one of {DWT_TOKENS}")
        if self.dwt_tokens == "split" and self.input != "dwt":
            raise ValueError("model.dwt_tokens: split tokenises the DWT bands in two sets; it needs model.input: "
                             "dwt (pixel input has one token set: leave dwt_tokens at joint)")
        side = self.model_size
        if self.image_size % 2 or side % self.patch_size:
            raise ValueError(f"model.image_size {self.image_size}: the model input side {side} must be a multiple "
                             f"of patch_size {self.patch_size}")

    @property
    def in_channels(self) -> int:
        return 12 if self.input == "dwt" else 3

    @property
    def token_sets(self) -> int:
        """Token sets the masks are drawn for: 2 for split DWT tokens (cA, details), else 1."""
        return 2 if self.dwt_tokens == "split" else 1

    def build(self, **extra):
        """The U-ViT of this config (as training, sampling, export and evaluation all build it); `extra`: any
        further UViTConfig field (e.g. grad_checkpoint=True)."""
        from trainer.core.models import build_model

        return build_model(self.preset, self.in_channels, self.model_size, self.patch_size,
                           split_bands=3 if self.dwt_tokens == "split" else 0, **{**self.overrides, **extra})

    @property
    def model_size(self) -> int:
        """Side of the model input: half the image in DWT mode."""
        return self.image_size // 2 if self.input == "dwt" else self.image_size


@dataclass(frozen=True)
class MaskConfig:
    kind: str = "block"
    rate: float = number(0.9, FRACTION)  # 0: ordinary denoising score matching on every patch
    block: int = number(4, AT_LEAST_ONE)  # side of a masked block, in tokens

    def __post_init__(self):
        check_numbers(self, "mask")
        if self.kind not in MASK_KINDS:
            raise ValueError(f"mask.kind {self.kind!r}: choose one of {MASK_KINDS}")


@dataclass(frozen=True)
class DataConfig:
    sources: tuple[str, ...] = ()  # shard sets: folders or URLs with manifest.json, brace patterns
    weights: tuple[float, ...] | None = number(None, NON_NEGATIVE)  # mixing weights, one per source
    order: str = "resampled"      # "resampled" (pre-training) or "exact" (epochs: fine-tuning, evaluation)
    # DataLoader workers per rank: 8 keep an H100 fed on B at 90% masking from local shards or JPEG-only bucket
    # shards (6-8 needed, bench/loader_throughput.py, docs/performance.md); dwt.f16 shards from a bucket need more
    workers: int = number(8, NON_NEGATIVE)  # 0: load in the training process
    prefetch: int = number(2, AT_LEAST_ONE)  # micro-batches each worker keeps ready (DataLoader prefetch_factor)
    buffer: int = number(1000, AT_LEAST_ONE)  # shuffle buffer, in samples
    shards_per_chunk: int = number(4, AT_LEAST_ONE)
    flip: bool = True
    record_keys: bool = False     # RUN_DIR/keys/rankR.jsonl: each step's sample keys (trainer/train/keyrecord.py)
    # the run stops (with a checkpoint) when the samples skipped (bad samples, the samples lost with unreadable or
    # short shards) exceed this fraction of those read, and one shard's worth (one lost shard early on never stops
    # it); 0: any loss stops, 1: never. 1%: a few bad shards of a large set stay well under it and barely change
    # the data distribution; more means damage (a truncated upload, a set of another size) worth stopping for
    max_skip_fraction: float = number(0.01, Allowed(0, 1, hi_open=False))

    def __post_init__(self):
        object.__setattr__(self, "sources", (self.sources,) if isinstance(self.sources, str) else tuple(self.sources))
        if self.weights is not None:
            object.__setattr__(self, "weights", tuple(self.weights))
        check_numbers(self, "data")
        for source in self.sources:
            if msg := credentials_in_url(source, "data.sources"):
                raise ValueError(msg)
        if self.order not in ORDERS:
            raise ValueError(f"data.order {self.order!r}: choose one of {ORDERS}")
        if self.weights is not None and (sum(self.weights) <= 0 or self.sources and
                                         len(self.weights) != len(self.sources)):
            raise ValueError(f"data.weights = {self.weights!r}: one weight >= 0 per data.sources entry "
                             f"({len(self.sources)} now), not all 0")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = number(2e-4, POSITIVE)
    betas: tuple[float, ...] = number((0.99, 0.99), FRACTION)  # AdamW, as the paper
    weight_decay: float = number(0.03, NON_NEGATIVE)
    warmup_steps: int = number(0, NON_NEGATIVE)  # linear warm-up, then constant
    # which parameters weight decay applies to: "matrices" (ours: not biases, norms, q/v biases or the positional
    # embedding, the usual ViT practice) or "all" (the reference: AdamW's decay on every parameter)
    decay: str = "matrices"

    def __post_init__(self):
        object.__setattr__(self, "betas", tuple(self.betas))
        check_numbers(self, "optim")
        if len(self.betas) != 2:
            raise ValueError(f"optim.betas = {self.betas!r}: give two numbers, each in [0, 1)")
        if self.decay not in DECAY_GROUPS:
            raise ValueError(f"optim.decay {self.decay!r}: choose one of {DECAY_GROUPS}")


@dataclass(frozen=True)
class LossConfig:
    # DWT input only: "uniform" (ours) is one mean over the 12 bands of the visible tokens; "bands" (the reference)
    # is mean(cA) + mean(9 detail bands), so a cA coefficient weighs 3x a detail coefficient (and the loss reads
    # about twice as large)
    dwt_weighting: str = "uniform"

    def __post_init__(self):
        if self.dwt_weighting not in DWT_WEIGHTINGS:
            raise ValueError(f"loss.dwt_weighting {self.dwt_weighting!r}: choose one of {DWT_WEIGHTINGS}")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = number(100_000, AT_LEAST_ONE)
    global_batch: int = number(256, AT_LEAST_ONE)
    micro_batch: int = number(32, AT_LEAST_ONE)
    schedule: str = "cosine"      # beta schedule, T = 1000
    ema_decay: float = number(0.999, FRACTION)
    ema_warmup: bool = True       # decay 1-(1+k)^(-2/3) capped at ema_decay (trainer/train/ema.py): short runs' EMA is usable
    ema_every: int = number(1, AT_LEAST_ONE)  # average every N-th applied optimiser step (the reference's L-DWT runs: 10)
    # warm-up: copy the weights for steps 0..N (ema-pytorch's update_after_step; reference 100)
    ema_update_after: int = number(0, NON_NEGATIVE)
    seed: int = number(0, Allowed(0, 2**32))  # torch generators take seed x 100003 + rank (< 2**64)
    log_every: int = number(50, AT_LEAST_ONE)
    sample_every: int = number(5000, AT_LEAST_ONE)
    ckpt_every: int = number(5000, AT_LEAST_ONE)
    sample_n: int = number(16, AT_LEAST_ONE)
    sample_steps: int = number(50, Allowed(1, 1000, hi_open=False))
    # DDIM eta of the grids: 1 (stochastic) shows young models fairly; 0 saturates them
    sample_eta: float = number(1.0, NON_NEGATIVE)
    tensorboard: bool = False     # also write the training records to RUN_DIR/tensorboard (needs tensorboard)
    # keep only the newest N stepN checkpoints (0: keep all; see trainer/train/checkpoints.py)
    keep_last: int = number(0, NON_NEGATIVE)
    # fp16: this many consecutive overflowing steps stop the run (see trainer/train/loop.py)
    max_nonfinite: int = number(20, AT_LEAST_ONE)

    def __post_init__(self):
        check_numbers(self, "train")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"train.schedule {self.schedule!r}: choose one of {SCHEDULES}")
        try:
            self.sampling
        except ValueError as e:
            raise ValueError(f"train.sample_n / sample_steps / sample_eta: {e}") from None

    @property
    def sampling(self) -> SamplingConfig:
        """The sample grids' settings (DDIM, train.sample_steps, train.sample_eta, train.sample_n, seed 0)."""
        return SamplingConfig(steps=self.sample_steps, eta=self.sample_eta, n=self.sample_n)


SECTIONS = {"model": ModelConfig, "mask": MaskConfig, "data": DataConfig, "optim": OptimConfig,
            "loss": LossConfig, "train": TrainConfig}


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        grid = self.model.model_size // self.model.patch_size
        if self.mask.kind == "block" and self.mask.rate > 0 and grid % self.mask.block:
            raise ValueError(f"mask.block = {self.mask.block}: block masks tile the {grid}x{grid} token grid "
                             f"(model.image_size {self.model.image_size}, patch_size {self.model.patch_size}); "
                             f"choose a block side that divides {grid}")
        if self.loss.dwt_weighting == "bands" and self.model.input != "dwt":
            raise ValueError("loss.dwt_weighting: bands weighs the cA and detail bands of DWT input; with model.input:"
                             " pixel leave it at uniform")

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "ExperimentConfig":
        """From plain values (a YAML file, a checkpoint's config), each coerced to its field's type; errors name
        `where` and the key."""
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected a mapping of sections {list(SECTIONS)}, got {type(d).__name__}")
        unknown = set(d) - {"name", *SECTIONS}
        if unknown:
            raise ValueError(f"{where}: unknown top-level keys {sorted(unknown)}; expected name, {list(SECTIONS)}")
        parts = {}
        for key, kind in SECTIONS.items():
            section = d.get(key) or {}
            if not isinstance(section, dict):
                raise ValueError(f"{where}: '{key}' must be a mapping of keys {sorted(_hints(kind))}, "
                                 f"got {section!r}")
            hints = _hints(kind)
            bad = set(section) - set(hints)
            if bad:
                raise ValueError(f"{where}: unknown keys {sorted(bad)} in '{key}'; allowed: {sorted(hints)}")
            values = {k: coerce(v, hints[k], f"{where}: {key}.{k}") for k, v in section.items()}
            try:
                parts[key] = kind(**values)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
        try:
            return cls(name=str(d.get("name", "run")), **parts)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict | None = None) -> "ExperimentConfig":
        """The YAML file, then `overrides` ({"train.steps": 10}: see `parse_overrides`) on top."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"--config {path}: no such file (see configs/ for the paper's runs)")
        try:
            d = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"--config {path}: not valid YAML: {e}") from None
        if not isinstance(d, dict):
            raise ValueError(f"--config {path}: expected a mapping of sections {list(SECTIONS)}")
        for dotted, value in (overrides or {}).items():  # e.g. {"train.steps": 10}
            section, _, key = dotted.partition(".")
            if not key:
                d[section] = value  # "name"
                continue
            _field_hint(section, key, f"override {dotted}")  # a bad key is the override's fault, not the file's
            if not isinstance(d.get(section) or {}, dict):
                raise ValueError(f"{path}: '{section}' must be a mapping, got {d[section]!r}")
            d[section] = {**(d.get(section) or {}), key: value}
        return cls.from_dict(d, str(path))

    def replace(self, **sections) -> "ExperimentConfig":
        return dataclasses.replace(self, **sections)

    def to_dict(self) -> dict:
        return _plain(asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --- values: YAML or --set text -> the field's type ------------------------------------------------------------

_EXPECTED = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping {k: v}",
             tuple: "a list [a, b, ...]"}


@functools.lru_cache(maxsize=None)
def _hints(kind) -> dict:
    """Field name -> resolved annotation (annotations are strings under `from __future__ import annotations`)."""
    return typing.get_type_hints(kind)


def _field_hint(section: str, key: str, where: str):
    """The annotation of SECTION.KEY; ValueError naming `where` for an unknown section or key."""
    if section not in SECTIONS:
        raise ValueError(f"{where}: unknown section {section!r}; choose one of {list(SECTIONS)} (or name)")
    hints = _hints(SECTIONS[section])
    if key not in hints:
        raise ValueError(f"{where}: unknown key {key!r} in '{section}'; allowed: {sorted(hints)}")
    return hints[key]


def coerce(value, hint, what: str):
    """`value` as type `hint` (int, float, bool, str, dict, tuple[X, ...], X | None); ValueError naming `what`,
    the value and the expected type. A single string for a tuple field is a one-element tuple."""
    if type(None) in typing.get_args(hint) and typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None:
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    kind, args = typing.get_origin(hint) or hint, typing.get_args(hint)
    if kind is tuple:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, (list, tuple)):
            return tuple(coerce(v, args[0], f"{what} (item {i})") if args else v for i, v in enumerate(value))
    elif kind is dict:
        if value is None or isinstance(value, dict):
            return dict(value or {})
    elif kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif kind in (int, float):
        number = None if isinstance(value, bool) else value
        if isinstance(value, str):
            try:
                number = float(value.replace("_", ""))
            except ValueError:
                number = None
        if isinstance(number, (int, float)):
            if kind is float:
                return float(number)
            if float(number).is_integer():
                return int(number)
    else:
        return value
    raise ValueError(f"{what}: expected {_EXPECTED.get(kind, kind.__name__)} ({kind.__name__}), got {value!r}")


def parse_overrides(items: list[str]) -> dict:
    """`--set SECTION.KEY=VALUE` (or `name=VALUE`) items -> {"section.key": value}, each VALUE read as YAML and
    coerced to the field's type; a string field keeps the text as typed. Errors name the --set item."""
    out = {}
    for item in items:
        dotted, sep, text = item.partition("=")
        where = f"--set {item}"
        if not sep or ("." not in dotted and dotted != "name"):
            raise ValueError(f"{where}: write SECTION.KEY=VALUE, e.g. train.steps=10 (sections: {list(SECTIONS)})")
        if dotted == "name":
            out[dotted] = text
            continue
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"{where}: the value is not valid YAML ({str(e).splitlines()[0]})") from None
        section, _, key = dotted.partition(".")
        hint = _field_hint(section, key, where)
        if hint is str and not isinstance(value, str):
            value = text  # `--set model.preset=1` or `name=yes`: the text, not what YAML makes of it
        out[dotted] = coerce(value, hint, where)
    return out


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
        fix = "change train.global_batch or the number of GPUs"
        if global_batch % world == 0:  # the largest micro batch <= this one that divides the per-rank batch
            per_rank = global_batch // world
            fits = max(m for m in range(1, min(micro_batch, per_rank) + 1) if per_rank % m == 0)
            fix = f"use --set train.micro_batch={fits} (gradient accumulation {per_rank // fits}), or {fix}"
        else:
            fix = f"no micro batch fits: {global_batch} images do not split over {world} GPUs; {fix}"
        raise ValueError(f"train.global_batch {global_batch} is not a multiple of train.micro_batch {micro_batch} "
                         f"x world size {world} = {per_step}: {fix}")
    return global_batch // per_step
