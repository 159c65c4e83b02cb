"""Exponential moving average of the model weights, kept in fp32 (DESIGN.md: the classic fp16 mode stores the
module in half precision; the EMA must not be), correct under ZeRO-3.

    ema = EMA(engine.module, decay=0.999)
    ...
    engine.step()
    if engine.was_step_applied():     # an fp16 overflow skips the optimiser step: the EMA must skip it too
        ema.update(engine.module)

Under ZeRO-3 each rank holds a slice of every parameter; `gathered(module)` assembles the full tensors for the
update (every rank keeps the full fp32 EMA: 4 bytes per parameter, 0.9 GB for L). Outside ZeRO-3 it is a no-op.
"""
from __future__ import annotations

import contextlib

import torch

__all__ = ["EMA", "gathered", "is_zero3"]


def is_zero3(module: torch.nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in module.parameters())


@contextlib.contextmanager
def gathered(module: torch.nn.Module, modifier_rank: int | None = None):
    """Full parameters inside the block, under ZeRO-3 (`deepspeed.zero.GatheredParameters`); a no-op otherwise.
    With `modifier_rank`, that rank's in-place changes are broadcast and re-partitioned on exit."""
    if not is_zero3(module):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=modifier_rank):
        yield


class EMA:
    def __init__(self, module: torch.nn.Module, decay: float = 0.999):
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay {decay} must be in [0, 1)")
        self.decay = decay
        with gathered(module):
            self.shadow = {n: p.detach().float().clone() for n, p in module.named_parameters()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        """shadow <- decay * shadow + (1 - decay) * weights, in fp32."""
        with gathered(module):
            for name, p in module.named_parameters():
                self.shadow[name].lerp_(p.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        """Load the EMA weights into `module` (cast to its dtype), e.g. a sampling copy of the model."""
        with gathered(module, modifier_rank=0):
            for name, p in module.named_parameters():
                p.copy_(self.shadow[name].to(p.dtype))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": {k: v.cpu() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        missing, unexpected = set(self.shadow) - set(state["shadow"]), set(state["shadow"]) - set(self.shadow)
        if missing or unexpected:
            raise ValueError(f"EMA state does not match the model: missing {sorted(missing)}, "
                             f"unexpected {sorted(unexpected)}")
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)
