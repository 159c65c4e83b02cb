"""trainer/pretrain.py with one fault injected into rank 1, for tests that launch it with the real DeepSpeed
launcher in place of trainer/pretrain.py (production code reads no fault switches; this test-only script patches the
training modules, then runs pretrain.py as the launcher would). MASKDM_TEST_FAULT names the fault:

    raise-mid-step   rank 1 raises in the loss of its 3rd micro-batch (rank 0 goes on into the gradient all-reduce)
    die-in-save      rank 1 exits (as if killed) when it starts writing its optimizer partition of a checkpoint
"""
import os
import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FAULT, RANK = os.environ["MASKDM_TEST_FAULT"], int(os.environ["RANK"])

if RANK == 1 and FAULT == "raise-mid-step":
    from trainer.train import loop

    real_loss, calls = loop.msm_loss, [0]

    def msm_loss(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("injected fault: rank 1 fails mid-step")
        return real_loss(*args, **kwargs)

    loop.msm_loss = msm_loss
elif RANK == 1 and FAULT == "die-in-save":
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    real_save = TorchCheckpointEngine.save

    def save(self, state_dict, path):
        if "optim_states" in str(path):
            os._exit(9)
        return real_save(self, state_dict, path)

    TorchCheckpointEngine.save = save
else:
    assert RANK == 0 and FAULT in ("raise-mid-step", "die-in-save"), FAULT

runpy.run_path(str(REPO / "trainer" / "pretrain.py"), run_name="__main__")
