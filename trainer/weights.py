"""Pre-trained weights for fine-tuning (`finetune.py --init`): where they come from and how they are applied.

Sources (never unpickling code: safetensors, or `torch.load(weights_only=True)`):
- a DeepSpeed run directory, its `checkpoints/` folder or one tag folder: the EMA weights from the client state
  of rank 0's model-states file (the weights the paper samples from and publishes);
- a `.safetensors` file, local or any fsspec URL (`s3://...`): an exported model (`python -m trainer.export`).
"""
from __future__ import annotations

import io
from pathlib import Path

import torch

__all__ = ["load_pretrained", "apply_pretrained"]

MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


def _deepspeed_tag_dir(path: Path) -> Path:
    for ckpt in (path, path / "checkpoints"):
        if (ckpt / "latest").is_file():
            return ckpt / (ckpt / "latest").read_text().strip()
    return path


def load_pretrained(source: str) -> dict[str, torch.Tensor]:
    """{parameter name: fp32 tensor} from a DeepSpeed checkpoint (EMA weights) or a safetensors file/URL."""
    from safetensors.torch import load as load_safetensors

    if source.endswith(".safetensors"):
        if "://" in source:
            import fsspec

            with fsspec.open(source, "rb") as f:
                return {k: v.float() for k, v in load_safetensors(f.read()).items()}
        if not Path(source).is_file():
            raise SystemExit(f"error: --init {source}: no such file")
        return {k: v.float() for k, v in load_safetensors(Path(source).read_bytes()).items()}
    tag = _deepspeed_tag_dir(Path(source))
    states = next((tag / n for n in MODEL_STATES if (tag / n).is_file()), None)
    if states is None:
        raise SystemExit(f"error: --init {source}: neither a .safetensors file nor a DeepSpeed checkpoint "
                         f"(no checkpoints/latest, and no {MODEL_STATES[0]} in {tag})")
    client = torch.load(io.BytesIO(states.read_bytes()), map_location="cpu", weights_only=True)
    if "ema" not in client:
        raise SystemExit(f"error: --init {source}: {states} has no EMA weights (not a maskdm checkpoint)")
    return dict(client["ema"]["shadow"])


def apply_pretrained(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Copy matching weights into `model`; return (missing, unexpected) key lists. A key present in both with
    another shape is an error that names it (e.g. a model built for another resolution)."""
    own = model.state_dict()
    wrong = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
             for k, v in state.items() if k in own and own[k].shape != v.shape]
    if wrong:
        raise SystemExit("error: pre-trained weights do not fit the model (check model.preset / image_size / "
                         "patch_size against the pre-training config):\n  " + "\n  ".join(wrong))
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return missing, unexpected
