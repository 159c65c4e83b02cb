"""Reading checkpoint files without running code from them.

A `.pt` file is a pickle, and unpickling can call any importable function: a planted `*_model_states.pt` would run
a shell command in whoever resumes, fine-tunes from or converts the run. maskdm's own reads use
`torch.load(weights_only=True)` (tensors, containers and plain data only). DeepSpeed's readers (resuming,
`zero_to_fp32`, `ds_to_universal`) pass `weights_only=False`, so they run inside `weights_only_loads()`, which
forces weights-only loading for its duration and allows exactly the DeepSpeed classes its checkpoints hold
(`DEEPSPEED_TYPES`: found by saving ZeRO-1/2/3 checkpoints in fp32, fp16 and bf16 and converting them to the
universal form with DeepSpeed 0.19.8; tests/test_trust.py checks them). A file holding anything else stops the
command with one line naming it.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import pickle
import re
from pathlib import Path

import torch

__all__ = ["load", "weights_only_loads", "refusal", "DEEPSPEED_TYPES"]

# Classes pickled in DeepSpeed checkpoints: loss scalers (fp16/bf16/fp32 optimizer states), the ZeRO stage enum, and
# the fragment addresses of bf16/fp16 optimizer states. Their constructors only store numbers.
DEEPSPEED_TYPES = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                   "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                   "deepspeed.runtime.zero.config.ZeroStageEnum",
                   "deepspeed.utils.tensor_fragment.fragment_address")
# the lines of torch's refusal that say nothing about the file
TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def _deepspeed_types() -> list[type]:
    out = []
    for name in DEEPSPEED_TYPES:
        module, _, attr = name.rpartition(".")
        out.append(getattr(importlib.import_module(module), attr))
    return out


def refusal(path, err: Exception) -> str:
    """The one-line message for a file that weights-only unpickling refused (torch's own message is a page)."""
    text = str(err)
    found = re.search(r"GLOBAL [\w.]+", text)
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith(TORCH_BOILERPLATE)]
    why = found.group(0) if found else (lines or [text])[0][:200]
    return (f"error: {path} holds objects other than tensors and plain data (refused to unpickle: {why}); "
            f"only load checkpoints you trust, and if maskdm wrote this file, report it")


def load(path: str | Path) -> dict:
    """torch.load of one checkpoint file, weights only, on the CPU; SystemExit naming the file if it holds code."""
    try:
        return torch.load(io.BytesIO(Path(path).read_bytes()), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise SystemExit(refusal(path, e)) from None


@contextlib.contextmanager
def weights_only_loads():
    """While DeepSpeed code runs inside: every `torch.load` is weights-only, with DEEPSPEED_TYPES allowed, and a
    refused file raises SystemExit naming it. Not thread-safe (it swaps `torch.load`): use it around one load."""
    original = torch.load

    def guarded(f, *args, **kwargs):
        kwargs.pop("pickle_module", None)  # weights-only loading uses torch's restricted unpickler
        kwargs["weights_only"] = True
        try:
            return original(f, *args, **kwargs)
        except pickle.UnpicklingError as e:
            raise SystemExit(refusal(getattr(f, "name", f), e)) from None

    torch.load = guarded
    try:
        with torch.serialization.safe_globals(_deepspeed_types()):
            yield
    finally:
        torch.load = original
