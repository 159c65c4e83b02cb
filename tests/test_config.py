"""trainer.train.config: the shipped configs load, bad keys are named, batch arithmetic, ds_configs hold no batch/LR."""
import json
from pathlib import Path

import pytest

from trainer.train.config import ExperimentConfig, batch_arithmetic

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
    assert "torch_autocast" not in d  # clips scaled gradients in fp16 (docs/design.md)


# --- values: coerced to the field's type, from --set and YAML files alike; errors name the flag or the file --------

def load_with(*sets: str, config=REPO / "configs" / "quickstart.yaml"):
    from trainer.train.cli import load, parse

    args = parse(["--config", str(config), "--deepspeed_config", str(REPO / "ds_configs" / "zero2_fp16.json"),
                  "--run-dir", "unused", *[x for s in sets for x in ("--set", s)]], "pretrain")
    return load(args)[0]


def test_set_values_take_the_field_type():
    cfg = load_with("optim.lr=1e-3", "train.steps=1e4", "data.sources=/path/shards", "optim.betas=[0.9, 1e-3]",
                    "model.preset=tiny", "train.tensorboard=false", "name=my run")
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)  # YAML alone reads 1e-3 as a string
    assert cfg.train.steps == 10_000 and isinstance(cfg.train.steps, int)
    assert cfg.data.sources == ("/path/shards",)  # one string is one source, not one per character
    assert cfg.optim.betas == (0.9, 1e-3) and cfg.model.preset == "tiny" and cfg.train.tensorboard is False
    assert cfg.name == "my run"
    assert load_with("data.sources=[a, b]", "data.weights=[1, 3e-1]").data.weights == (1.0, 0.3)


@pytest.mark.parametrize("item, needles", [
    ("train.steps=abc", ["--set train.steps=abc", "expected an integer", "'abc'"]),
    ("train.steps=2.5", ["--set train.steps=2.5", "expected an integer", "2.5"]),
    ("optim.lr=fast", ["--set optim.lr=fast", "expected a number", "'fast'"]),
    ("train.tensorboard=maybe", ["--set train.tensorboard=maybe", "expected true or false"]),
    ("data.weights=[1, x]", ["--set data.weights=[1, x]", "(item 1)", "expected a number", "'x'"]),
    ("model.overrides=3", ["--set model.overrides=3", "expected a mapping"]),
    ("optim.lrr=1e-3", ["--set optim.lrr=1e-3: unknown key 'lrr' in 'optim'; allowed:", "'lr'", "'warmup_steps'"]),
    ("optimizer.lr=1e-3", ["--set optimizer.lr=1e-3: unknown section 'optimizer'", "'optim'"]),
    ("train.steps", ["--set train.steps", "SECTION.KEY=VALUE"]),
    ("data.sources=[a", ["--set data.sources=[a", "not valid YAML"]),
])
def test_bad_set_values_name_the_flag_key_value_and_type(item, needles):
    with pytest.raises(SystemExit) as e:
        load_with(item)
    msg = str(e.value)
    assert msg.startswith("error: ") and all(n in msg for n in needles), msg
    assert "quickstart.yaml" not in msg  # the --set item is at fault, not the config file


def test_yaml_values_take_the_field_type_and_errors_name_the_file(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("optim: {lr: 1e-3, betas: [0.9, 1e-2]}\ndata: {sources: shards/one}\ntrain: {steps: 2e3}\n"
                    "mask:\n")
    cfg = ExperimentConfig.from_yaml(path)
    assert (cfg.optim.lr, cfg.optim.betas, cfg.data.sources, cfg.train.steps) == (1e-3, (0.9, 1e-2), ("shards/one",),
                                                                                 2000)
    assert isinstance(cfg.optim.lr, float) and isinstance(cfg.train.steps, int)
    path.write_text("train: {steps: abc}\n")
    with pytest.raises(ValueError, match=rf"{path}: train.steps: expected an integer \(int\), got 'abc'"):
        ExperimentConfig.from_yaml(path)
    with pytest.raises(SystemExit, match=rf"error: {path}: train.steps: expected an integer"):
        load_with(config=path)
    path.write_text("train: [1, 2]\n")
    with pytest.raises(ValueError, match=rf"{path}: 'train' must be a mapping"):
        ExperimentConfig.from_yaml(path)
    path.write_text("train: {steps: [1\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        ExperimentConfig.from_yaml(path)


def test_bad_batch_suggests_the_micro_batch_that_fits():
    with pytest.raises(ValueError, match=r"256 .*micro_batch 32 x world size 16 = 512: use --set "
                                         r"train.micro_batch=16 \(gradient accumulation 1\)"):
        batch_arithmetic(256, 32, 16)
    with pytest.raises(ValueError, match=r"--set train.micro_batch=32 \(gradient accumulation 4\)"):
        batch_arithmetic(256, 48, 2)  # 128 per rank: 32 is the largest divisor <= 48
    with pytest.raises(ValueError, match="no micro batch fits: 100 images do not split over 3 GPUs"):
        batch_arithmetic(100, 32, 3)


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
@pytest.mark.parametrize("world", [1, 2, 8, 16, 32, 64])
def test_the_suggested_micro_batch_works_for_every_shipped_config(path, world):
    import re

    t = ExperimentConfig.from_yaml(path).train
    try:
        batch_arithmetic(t.global_batch, t.micro_batch, world)
        return
    except ValueError as e:
        msg = str(e)
    if t.global_batch % world:
        assert "no micro batch fits" in msg
        return
    micro = int(re.search(r"--set train.micro_batch=(\d+)", msg).group(1))
    assert micro < t.micro_batch and batch_arithmetic(t.global_batch, micro, world) >= 1
    assert not [m for m in range(micro + 1, t.micro_batch) if t.global_batch % (m * world) == 0]  # the largest


def test_paper_fidelity_keys_default_to_ours_and_validate(tmp_path):
    cfg = ExperimentConfig()
    assert (cfg.model.dwt_tokens, cfg.loss.dwt_weighting, cfg.optim.decay) == ("joint", "uniform", "matrices")
    assert (cfg.train.ema_every, cfg.train.ema_update_after, cfg.train.ema_warmup) == (1, 0, True)
    assert cfg.model.token_sets == 1
    ref = ExperimentConfig.from_dict({"model": {"preset": "tiny", "input": "dwt", "image_size": 32,
                                                "dwt_tokens": "split"},
                                      "loss": {"dwt_weighting": "bands"}, "optim": {"decay": "all"},
                                      "train": {"ema_every": 10, "ema_update_after": 100}})
    assert ref.model.token_sets == 2 and ref.model.build().cfg.split_bands == 3
    assert ExperimentConfig.from_dict(ref.to_dict()) == ref
    for d, needle in [({"model": {"dwt_tokens": "both"}}, "model.dwt_tokens"),
                      ({"model": {"input": "pixel", "dwt_tokens": "split"}}, "needs model.input: dwt"),
                      ({"model": {"input": "pixel"}, "loss": {"dwt_weighting": "bands"}}, "leave it at uniform"),
                      ({"loss": {"dwt_weighting": "cA"}}, "loss.dwt_weighting"),
                      ({"optim": {"decay": "some"}}, "optim.decay"),
                      ({"train": {"ema_update_after": -1}}, "ema_update_after")]:
        with pytest.raises(ValueError, match=needle):
            ExperimentConfig.from_dict(d, "x.yaml")
    old = ExperimentConfig().to_dict()
    del old["loss"]  # a checkpoint written before the loss section existed
    assert ExperimentConfig.from_dict(old).loss.dwt_weighting == "uniform"


def test_workers_beyond_the_cores_are_named_with_a_count_that_fits(monkeypatch):
    import os

    from trainer.train import loop

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7}, raising=False)
    assert ExperimentConfig().data.workers == 8        # the default (docs/performance.md, loader figures)
    assert loop._workers_warning(0, 8) is None          # loading in the training processes
    assert loop._workers_warning(8, 1) is None          # one rank: 8 workers on 8 cores
    warning = loop._workers_warning(8, 2)
    assert "data.workers 8 x 2 ranks = 16 loader processes on 8 cores" in warning and "data.workers=3" in warning


# --- ranges: every number field is checked once, on construction; the message names key, value and range ---------

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("section, key, value, allowed", [
    ("optim", "lr", NAN, "must be a finite number > 0"),
    ("optim", "lr", INF, "must be a finite number > 0"),
    ("optim", "lr", 0.0, "must be a finite number > 0"),
    ("optim", "betas", [1.5, -2], "each item must be a finite number in [0, 1)"),
    ("optim", "betas", [0.9, NAN], "each item must be a finite number in [0, 1)"),
    ("optim", "weight_decay", -0.1, "must be a finite number >= 0"),
    ("optim", "warmup_steps", -1, "must be an integer >= 0"),
    ("model", "image_size", 0, "must be an integer >= 2"),
    ("model", "patch_size", 0, "must be an integer >= 1"),
    ("mask", "block", 0, "must be an integer >= 1"),
    ("mask", "rate", 1.0, "must be a finite number in [0, 1)"),
    ("mask", "rate", NAN, "must be a finite number in [0, 1)"),
    ("data", "buffer", 0, "must be an integer >= 1"),
    ("data", "shards_per_chunk", -3, "must be an integer >= 1"),
    ("data", "workers", -1, "must be an integer >= 0"),
    ("data", "prefetch", 0, "must be an integer >= 1"),
    ("data", "weights", [1, -1], "each item must be a finite number >= 0"),
    ("data", "weights", [1, INF], "each item must be a finite number >= 0"),
    ("train", "seed", -1, "must be an integer in [0, 4294967296)"),
    ("train", "sample_eta", NAN, "must be a finite number >= 0"),
    ("train", "sample_eta", INF, "must be a finite number >= 0"),
    ("train", "ckpt_every", 0, "must be an integer >= 1"),
    ("train", "log_every", 0, "must be an integer >= 1"),
    ("train", "sample_every", 0, "must be an integer >= 1"),
    ("train", "sample_steps", 1001, "must be an integer in [1, 1000]"),
    ("train", "ema_decay", -0.5, "must be a finite number in [0, 1)"),
    ("train", "keep_last", -2, "must be an integer >= 0"),
    ("train", "steps", 0, "must be an integer >= 1"),
])
def test_out_of_range_values_name_key_value_and_range(tmp_path, section, key, value, allowed):
    shown = repr(tuple(float(v) for v in value) if isinstance(value, list) else value)
    expected = f"{section}.{key} = {shown}: {allowed}"
    with pytest.raises(ValueError) as e:
        ExperimentConfig.from_dict({section: {key: value}}, "exp.yaml")
    assert str(e.value) == f"exp.yaml: {expected}"
    text = {NAN: ".nan", INF: ".inf"}  # the same through a YAML file and through --set, as the CLI reports it
    yaml_value = ("[" + ", ".join(text.get(v, str(v)) for v in value) + "]" if isinstance(value, list)
                  else text.get(value, str(value)))
    with pytest.raises(SystemExit) as e:
        load_with(f"{section}.{key}={yaml_value}")
    assert str(e.value).startswith("error: ") and str(e.value).endswith(expected), e.value


def test_every_number_field_declares_its_range():
    import dataclasses
    import typing

    from trainer.train.config import SECTIONS

    for name, kind in SECTIONS.items():
        for f in dataclasses.fields(kind):
            hint = typing.get_type_hints(kind)[f.name]
            numeric = {int, float} & {*typing.get_args(hint), hint, *(a for t in typing.get_args(hint)
                                                                       for a in typing.get_args(t))}
            assert not numeric or "allowed" in f.metadata, f"{name}.{f.name} declares no range (config.number)"


def test_block_side_must_tile_the_token_grid():
    with pytest.raises(ValueError, match=r"mask.block = 3: block masks tile the 16x16 token grid .* divides 16"):
        ExperimentConfig.from_dict({"model": {"preset": "tiny", "input": "pixel", "image_size": 32, "patch_size": 2},
                                    "mask": {"kind": "block", "block": 3}})
    ExperimentConfig.from_dict({"model": {"preset": "tiny", "input": "pixel", "image_size": 32, "patch_size": 2},
                                "mask": {"kind": "block", "block": 3, "rate": 0.0}})  # no masks drawn: any block


def test_weights_one_per_source_and_not_all_zero():
    with pytest.raises(ValueError, match=r"data.weights = \(1.0,\): one weight >= 0 per data.sources entry \(2 now\)"):
        ExperimentConfig.from_dict({"data": {"sources": ["a", "b"], "weights": [1]}})
    with pytest.raises(ValueError, match=r"data.weights = \(0.0, 0.0\).*not all 0"):
        ExperimentConfig.from_dict({"data": {"sources": ["a", "b"], "weights": [0, 0]}})


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_in_range(path):
    ExperimentConfig.from_yaml(path)
