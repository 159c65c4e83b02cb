"""trainer.config: the shipped configs load, bad keys are named, batch arithmetic, ds_configs hold no batch/LR."""
import json
from pathlib import Path

import pytest

from trainer.config import ExperimentConfig, batch_arithmetic

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load_and_round_trip(path):
    cfg = ExperimentConfig.from_yaml(path)
    assert ExperimentConfig.from_dict(cfg.to_dict()) == cfg
    import yaml

    assert ExperimentConfig.from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


def test_paper_settings():
    pre = ExperimentConfig.from_yaml(REPO / "configs" / "vggface2_pretrain_S.yaml")
    assert (pre.model.preset, pre.mask.kind, pre.mask.rate, pre.mask.block) == ("S", "block", 0.9, 4)
    assert (pre.train.global_batch, pre.optim.lr, pre.train.schedule) == (256, 2e-4, "cosine")
    assert pre.optim.betas == (0.99, 0.99) and pre.optim.weight_decay == 0.03 and pre.train.ema_decay == 0.999
    dwt = ExperimentConfig.from_yaml(REPO / "configs" / "celebahq_pretrain_L_dwt.yaml")
    assert (dwt.model.in_channels, dwt.model.model_size, dwt.mask.rate) == (12, 128, 0.7)


def test_unknown_and_invalid_keys_are_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {preset: S, dim: 3}\n")
    with pytest.raises(ValueError, match=r"unknown keys \['dim'\] in 'model'"):
        ExperimentConfig.from_yaml(bad)
    bad.write_text("mask: {rate: 1.0}\n")
    with pytest.raises(ValueError, match="mask.rate"):
        ExperimentConfig.from_yaml(bad)
    bad.write_text("optimizer: {}\n")
    with pytest.raises(ValueError, match="unknown top-level keys"):
        ExperimentConfig.from_yaml(bad)
    with pytest.raises(ValueError, match="no such file"):
        ExperimentConfig.from_yaml(tmp_path / "missing.yaml")
    cfg = ExperimentConfig.from_yaml(REPO / "configs" / "quickstart.yaml", {"train.steps": 7})
    assert cfg.train.steps == 7


def test_batch_arithmetic():
    assert batch_arithmetic(256, 32, 8) == 1
    assert batch_arithmetic(256, 8, 4) == 8
    with pytest.raises(ValueError, match="micro_batch"):
        batch_arithmetic(256, 48, 2)


@pytest.mark.parametrize("path", sorted((REPO / "ds_configs").glob("*.json")), ids=lambda p: p.name)
def test_ds_configs_hold_no_batch_or_lr(path):
    d = json.loads(path.read_text())
    assert "gradient_clipping" in d
    assert not {k for k in d if "batch" in k or k in ("optimizer", "scheduler")}
    assert "torch_autocast" not in d  # clips scaled gradients in fp16 (DESIGN.md)
