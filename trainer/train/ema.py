"""Exponential moving average of the model weights, kept in fp32 (docs/design.md: the classic fp16 mode stores the
module in half precision; the EMA must not be), correct under ZeRO-3.

    ema = EMA(engine.module, decay=0.999)
    ...
    engine.step()
    if engine.was_step_applied():     # an fp16 overflow skips the optimiser step: the EMA must skip it too
        ema.update(engine.module)

Warm-up (`warmup=True`, `train.ema_warmup`, on by default in training) and cadence (`every`, `after`:
`train.ema_every`, `train.ema_update_after`) follow the widely used ema-pytorch package (inv_gamma 1, power 2/3,
min_value 0), which the reference implementation uses. Call k = 0, 1, ... (one call per applied optimiser step):
    k % every != 0            -> no change (the reference's L-DWT runs: every 10 steps)
    k <= after                -> copy the weights (ema-pytorch's update_after_step; the reference: 100)
    the first averaging call  -> copy (ema-pytorch initialises its EMA there, then averages it with itself)
    otherwise                 -> decay min(decay, 1 - (1 + k - after)^(-2/3))
With after = 0 and every = 1 (our defaults) the first two updates copy the weights, then the horizon grows with the run
(decay 0.8 after 10 updates, 0.95 after 100, 0.99 after 1000) until it reaches the configured rate. Without the
warm-up every averaging step uses the configured rate from the first one (0.999 from step 0 keeps 61% of the initial
weights after 500 steps); `every` still applies. The call count is in the state, so a resumed run continues the
same schedule exactly.

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


WARMUP_POWER = 2 / 3  # ema-pytorch's default for long runs (its docs: 2/3 for ~1M steps, 3/4 for shorter)


class EMA:
    def __init__(self, module: torch.nn.Module, decay: float = 0.999, warmup: bool = False, every: int = 1,
                 after: int = 0):
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay {decay} must be in [0, 1)")
        if every < 1 or after < 0:
            raise ValueError(f"EMA every {every} must be >= 1 and after {after} >= 0")
        self.decay, self.warmup, self.every, self.after, self.updates = decay, warmup, every, after, 0
        with gathered(module):
            self.shadow = {n: p.detach().float().clone() for n, p in module.named_parameters()}

    def current_decay(self, k: int | None = None) -> float:
        """The decay of call k (default: the next call), whether or not that call averages (see the docstring)."""
        k = self.updates if k is None else k
        if not self.warmup:
            return self.decay
        first = (self.after // self.every + 1) * self.every  # ema-pytorch's first averaging call copies too
        if k <= self.after or k == first:
            return 0.0
        return min(self.decay, 1.0 - (1.0 + k - self.after) ** -WARMUP_POWER)

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> bool:
        """One call per applied optimiser step: shadow <- d * shadow + (1 - d) * weights, in fp32, with
        d = `current_decay()`, on every `every`-th call. Returns whether the shadow was updated."""
        k = self.updates
        self.updates += 1
        if k % self.every:
            return False
        d = self.current_decay(k)
        with gathered(module):
            for name, p in module.named_parameters():
                self.shadow[name].lerp_(p.detach().float(), 1.0 - d)
        return True

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        """Load the EMA weights into `module` (cast to its dtype), e.g. a sampling copy of the model."""
        with gathered(module, modifier_rank=0):
            for name, p in module.named_parameters():
                p.copy_(self.shadow[name].to(p.dtype))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "every": self.every, "after": self.after,
                "updates": self.updates,
                "shadow": {k: v.cpu() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        missing, unexpected = set(self.shadow) - set(state["shadow"]), set(state["shadow"]) - set(self.shadow)
        if missing or unexpected:
            raise ValueError(f"EMA state does not match the model: missing {sorted(missing)}, "
                             f"unexpected {sorted(unexpected)}")
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)
        # checkpoints from before the warm-up existed: their EMA ran at the full rate from the start
        self.updates = int(state.get("updates", 10**9))
