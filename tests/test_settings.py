"""trainer.core.settings (SamplingConfig, the registries) and trainer.train.rundir (the run directory)."""
import argparse
import json

import pytest

from trainer.core.settings import DTYPES, SamplingConfig, torch_dtype
from trainer.train.config import ExperimentConfig, TrainConfig
from trainer.train.rundir import RunDir, step_tag, tag_step


def test_sampling_flags_round_trip_and_name_the_folder():
    p = argparse.ArgumentParser()
    SamplingConfig.add_arguments(p, n_default=64)
    assert SamplingConfig.from_args(p.parse_args([])) == SamplingConfig()  # the flags' defaults are the config's
    s = SamplingConfig(sampler="ddpm", steps=50, eta=0.5, clip_mode="reference", n=300, seed=1)
    assert SamplingConfig.from_args(p.parse_args(s.to_args())) == s
    assert s.describe() == "ddpm50-eta0.5-clipreference-n300-seed1"
    assert SamplingConfig(steps=250, n=10000).describe() == "ddim250-eta1-n10000-seed0"


@pytest.mark.parametrize("bad, needle", [(dict(steps=0), "sampling steps 0"), (dict(n=0), "number of images 0"),
                                         (dict(sampler="euler"), "sampler 'euler'"), (dict(eta=-1), "eta -1"),
                                         (dict(eta=float("nan")), "eta nan: must be a finite number >= 0")])
def test_bad_sampling_settings_are_refused(bad, needle):
    with pytest.raises(ValueError, match=needle):
        SamplingConfig(**bad)
    p = argparse.ArgumentParser()
    SamplingConfig.add_arguments(p, n_default=64)
    args = p.parse_args([])
    vars(args).update(bad)
    with pytest.raises(SystemExit, match=f"error: {needle}"):
        SamplingConfig.from_args(args)


def test_the_grids_sampling_comes_from_the_train_section():
    t = TrainConfig(sample_n=9, sample_steps=20, sample_eta=0.0)
    assert t.sampling == SamplingConfig(steps=20, eta=0.0, n=9)
    with pytest.raises(ValueError, match=r"train.sample_steps = 2000: must be an integer in \[1, 1000\]"):
        ExperimentConfig.from_dict({"train": {"sample_steps": 2000}})


def test_dtype_names():
    import torch

    assert [torch_dtype(d) for d in DTYPES] == [torch.float32, torch.float16, torch.bfloat16]
    with pytest.raises(ValueError, match="dtype 'fp8'"):
        torch_dtype("fp8")


def test_run_directory_paths_and_records(tmp_path):
    run = RunDir(tmp_path / "run")
    assert RunDir.of_checkpoint(run.checkpoint(step_tag(1000))) == run
    assert step_tag(1000) == "step00001000" and tag_step("step00001000") == 1000
    assert tag_step(None) == tag_step("nonfinite-step00000003") == 0
    assert run.grid(5) == tmp_path / "run" / "samples" / "step00000005.png"
    assert run.read_metrics() == [] and run.published() == {}
    run.root.mkdir()
    run.append_metrics({"step": 1})
    with open(run.metrics, "a") as f:
        f.write('{"step": 2, "torn')  # a killed run's last line
    assert run.read_metrics() == [{"step": 1}]
    run.record_published(10, {"url": "s3://b/m/step00000010"})
    run.record_published(20, {"url": "s3://b/m/step00000020"})
    assert json.loads(run.published_file.read_text()) == run.published() and list(run.published()) == ["10", "20"]
