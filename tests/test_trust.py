"""No code runs from a checkpoint: every read of a run (fine-tuning from it, resuming it under the real launcher,
converting it to a universal checkpoint, exporting, sampling and evaluating it) unpickles weights only, and a file
holding anything else stops the command with one line naming it. A planted pickle whose `__reduce__` would create a
marker file stands for a shell command; the marker must never appear."""
import json
import os
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers import fake_run, launch, png_bytes, records, write, write_config
from trainer.train.safeload import DEEPSPEED_TYPES, weights_only_loads

pytestmark = pytest.mark.slow

REFUSED = "holds objects other than tensors and plain data (refused to unpickle: GLOBAL posix.system)"


class Payload:
    """Unpickling this runs `touch MARKER` (what a hostile checkpoint would do with a real command)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def plant(path: Path, marker: Path) -> Path:
    """Add a payload to the pickle at `path` (a new file if there is none), keeping what it held, so that a reader
    that unpickles it would go on as usual after running the payload."""
    state = torch.load(path, weights_only=False) if path.exists() else {}
    state["payload"] = Payload(marker)
    torch.save(state, path)
    return path


def refused(path: Path) -> str:
    return re.escape(f"error: {path} {REFUSED}")


def assert_refused(call, path: Path, marker: Path) -> None:
    """`call()` stops with the one-line refusal naming `path`, and the payload never ran."""
    try:
        call()
        message = None
    except SystemExit as e:
        message = str(e)
    assert not marker.exists(), "the planted payload ran"
    assert message is not None and "\n" not in message and re.match(refused(path), message), message


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory, train_shards):
    """A ZeRO-2 bf16 run on 2 ranks trained to step 2 of 4: its optimizer states hold DeepSpeed's loss scaler, ZeRO
    stage enum and fragment addresses, the classes the weights-only loads allow."""
    root = tmp_path_factory.mktemp("bf16")
    cfg, dsc = write_config(root, train_shards, steps=4, ckpt_every=2, stage=2)
    dsc.write_text(json.dumps({**json.loads(dsc.read_text()), "bf16": {"enabled": True}}))
    launch(cfg, dsc, root / "run", "--until-step", 2)
    return cfg, dsc, root / "run"


def copy_run(bf16_run, dest: Path) -> Path:
    shutil.copytree(bf16_run[2], dest)
    return dest


TAG = "step00000002"


# --- the guard itself ---------------------------------------------------------------------------------------------

def test_the_guard_allows_deepspeed_states_refuses_the_rest_and_restores_torch_load(tmp_path, bf16_run):
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    ckpt = bf16_run[2] / "checkpoints"
    held = {g for f in ckpt.rglob("*.pt") for g in torch.serialization.get_unsafe_globals_in_checkpoint(f)}
    assert held and held <= set(DEEPSPEED_TYPES)  # exactly what the allowlist names, nothing beyond it
    scaler = tmp_path / "scaler.pt"
    torch.save({"loss_scaler": DynamicLossScaler(8.0, 10, 1.0, 2, False)}, scaler)
    original = torch.load
    with weights_only_loads():
        assert torch.load(scaler, weights_only=False)["loss_scaler"].cur_scale == 8.0
        with pytest.raises(SystemExit, match=refused(tmp_path / "p.pt")):
            torch.load(str(plant(tmp_path / "p.pt", tmp_path / "marker")), weights_only=False)
    assert torch.load is original and not (tmp_path / "marker").exists()
    with pytest.raises(Exception, match="Unsupported global"):  # allowed only while DeepSpeed reads a checkpoint
        torch.load(scaler, weights_only=True)


# --- each way a run is read ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("planted", ["a_model_states.pt", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"])
def test_finetune_init_from_a_run_never_runs_a_payload(tmp_path, bf16_run, planted):
    from trainer.weights.load import load_pretrained

    run = copy_run(bf16_run, tmp_path / "run")
    clean = load_pretrained(str(run), "online")  # what finetune.py --init RUN_DIR reads by default
    path = plant(run / "checkpoints" / TAG / planted, tmp_path / "marker")
    assert_refused(lambda: load_pretrained(str(run), "online"), path, tmp_path / "marker")
    assert clean


@pytest.mark.parametrize("planted", ["mp_rank_00_model_states.pt", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"])
def test_universal_conversion_never_runs_a_payload(tmp_path, bf16_run, planted):
    from trainer.train.checkpoints import convert_to_universal

    run = copy_run(bf16_run, tmp_path / "run")
    ckpt = run / "checkpoints"
    shutil.copytree(ckpt / TAG, ckpt / "clean")
    assert convert_to_universal(ckpt, "clean", log=lambda *a: None) == "clean_universal"  # its workers, guarded
    path = plant(ckpt / TAG / planted, tmp_path / "marker")
    assert_refused(lambda: convert_to_universal(ckpt, TAG, log=lambda *a: None), path, tmp_path / "marker")
    assert not (ckpt / f"{TAG}_universal").exists() and not list(ckpt.glob(".tmp-*"))


def test_export_sample_and_evaluate_refuse_a_payload_in_one_line(tmp_path):
    from trainer.evaluate import main as evaluate_main
    from trainer.export import main as export_main
    from trainer.sample import main as sample_main

    run = fake_run(tmp_path / "run")
    path = plant(run / "checkpoints" / "step00000003" / "mp_rank_00_model_states.pt", tmp_path / "marker")
    write(tmp_path / "ref" / "0.png", png_bytes(Image.new("RGB", (16, 16))))
    for command, args in [(export_main, [str(run), "--out", str(tmp_path / "x" / "model.safetensors")]),
                          (sample_main, ["--ckpt", str(run), "--n", "1", "--out", str(tmp_path / "s")]),
                          (evaluate_main, ["--ckpt", str(run), "--ref", str(tmp_path / "ref"), "--n", "1",
                                           "--out", str(tmp_path / "e")])]:
        assert_refused(lambda: command(args), path, tmp_path / "marker")


def test_resume_under_the_launcher_is_weights_only(tmp_path, bf16_run):
    cfg, dsc, _ = bf16_run
    good = copy_run(bf16_run, tmp_path / "good")
    r = launch(cfg, dsc, good)  # a bf16 checkpoint resumes through the guard
    assert '"resumed"' in r.stdout and [x["step"] for x in records(good)] == [2, 4]

    bad = copy_run(bf16_run, tmp_path / "bad")
    path = plant(bad / "checkpoints" / TAG / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", tmp_path / "marker")
    r = launch(cfg, dsc, bad, check=False)  # rank 1 refuses its optimizer states: the job ends
    assert not (tmp_path / "marker").exists(), "the planted payload ran"
    assert r.returncode != 0 and re.search(refused(path), r.stdout + r.stderr), r.stdout[-3000:] + r.stderr[-3000:]
    assert [x["step"] for x in records(bad)] == [2]

    from trainer.train.checkpoints import convert_to_universal  # a universal checkpoint is read the same way

    uni = copy_run(bf16_run, tmp_path / "universal")
    tag = convert_to_universal(uni / "checkpoints", TAG, log=lambda *a: None)
    path = plant(uni / "checkpoints" / tag / "zero" / "head.weight" / "fp32.pt", tmp_path / "marker")
    r = launch(cfg, dsc, uni, "--resume", tag, check=False)
    assert not (tmp_path / "marker").exists(), "the planted payload ran"
    assert r.returncode != 0 and re.search(refused(path), r.stdout + r.stderr), r.stdout[-3000:] + r.stderr[-3000:]
