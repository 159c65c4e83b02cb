"""trainer.train.ema: the update formula in fp32 (also for an fp16 module), copy back, state round trip; and the same
EMA under ZeRO-1 and ZeRO-3 with the real DeepSpeed launcher on CPU (2 ranks)."""
import sys

import pytest
import torch

from helpers import REPO, free_port, launcher_env, run_launcher
from trainer.core.models import build_model
from trainer.train.ema import EMA


def test_update_formula_and_fp32_shadow():
    torch.manual_seed(0)
    model = build_model("tiny", 3, 16)
    ema = EMA(model, decay=0.9)
    before = {k: v.clone() for k, v in ema.shadow.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for name, p in model.named_parameters():
        assert torch.allclose(ema.shadow[name], 0.9 * before[name] + 0.1 * p)
    half = build_model("tiny", 3, 16).half()
    ema16 = EMA(half, decay=0.5)
    assert all(v.dtype == torch.float32 for v in ema16.shadow.values())


def test_copy_to_and_state_round_trip():
    torch.manual_seed(1)
    model, other = build_model("tiny", 3, 16), build_model("tiny", 3, 16)
    ema = EMA(model, 0.99)
    ema.copy_to(other)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))
    fresh = EMA(other, 0.99)
    fresh.load_state_dict(ema.state_dict())
    assert all(torch.equal(fresh.shadow[k], ema.shadow[k]) for k in ema.shadow)
    with pytest.raises(ValueError, match="missing"):
        EMA(build_model("tiny", 3, 16, depth=(2, 1, 2)), 0.9).load_state_dict(ema.state_dict())


SCRIPT = r'''
import argparse, os, torch, deepspeed
from trainer.core.models import build_model
from trainer.train.ema import EMA
p = argparse.ArgumentParser(); p.add_argument("--local_rank", type=int); p.add_argument("--out"); a = p.parse_args()
deepspeed.init_distributed()
for stage in (1, 3):  # one launch, two engines of their own, each from the same seed and data
    torch.manual_seed(0)
    model = build_model("tiny", 3, 16)
    # plain SGD: Adam's 1/sqrt(v) would magnify the (legitimate) rounding differences between ZeRO-1's all-reduce
    # and ZeRO-3's reduce-scatter on near-zero gradients; this test is about the EMA, not the optimiser
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": stage}, "gradient_clipping": 1.0, "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    assert engine.zero_optimization_stage() == stage
    ema = EMA(engine.module, 0.5)
    g = torch.Generator().manual_seed(100 + engine.global_rank)
    for step in range(3):
        x = torch.randn(2, 3, 16, 16, generator=g); t = torch.randint(0, 1000, (2,), generator=g)
        loss = (engine(x, t) - x).square().mean()
        engine.backward(loss); engine.step()
        if engine.was_step_applied():
            ema.update(engine.module)
    if engine.global_rank == 0:
        torch.save(ema.state_dict(), f"{a.out}/ema{stage}.pt")
    engine.destroy()
# as trainer/train/loop.py does: a gloo thread still in the last collective at interpreter shutdown can abort the rank
# with "terminate called without an active exception" (exit -6); tear the group down first
torch.distributed.barrier()
torch.distributed.destroy_process_group()
'''


@pytest.mark.slow
def test_ema_is_the_same_under_zero1_and_zero3(tmp_path):
    script = tmp_path / "ema_ds.py"
    script.write_text(SCRIPT)
    env = {**launcher_env(), "PYTHONPATH": str(REPO)}
    r = run_launcher([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
                      "--master_port", str(free_port()), str(script), "--out", str(tmp_path)], env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = {stage: torch.load(tmp_path / f"ema{stage}.pt", weights_only=True)["shadow"] for stage in (1, 3)}
    assert results[1].keys() == results[3].keys()
    for k in results[1]:
        assert results[3][k].shape == results[1][k].shape, k  # full tensors, not ZeRO-3 slices
        assert torch.allclose(results[1][k], results[3][k], atol=1e-5), k
    torch.manual_seed(0)
    init = build_model("tiny", 3, 16)  # the scripts' starting weights
    assert any(not torch.allclose(results[1][n], p, atol=1e-4) for n, p in init.named_parameters())  # it moved


def test_warmup_copies_first_then_follows_the_schedule_capped_at_the_rate():
    torch.manual_seed(2)
    model = build_model("tiny", 3, 16)
    ema = EMA(model, decay=0.99, warmup=True)
    decays = []
    for k in range(2000):
        decays.append(ema.current_decay())
        if k < 3:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1.0)
            ema.update(model)
            if k == 0:  # decay 0 at the first update: the shadow is the weights
                assert all(torch.equal(ema.shadow[n], p.float()) for n, p in model.named_parameters())
        else:
            ema.updates += 1  # the schedule only depends on the count
    assert decays[0] == 0.0 and abs(decays[10] - (1 - 11 ** (-2 / 3))) < 1e-12
    assert all(a <= b for a, b in zip(decays, decays[1:])) and decays[-1] == 0.99
    assert EMA(model, decay=0.99).current_decay() == 0.99  # off: the configured rate from the first update


def test_warmup_state_resumes_exactly_and_old_states_count_as_warmed_up():
    torch.manual_seed(3)
    model = build_model("tiny", 3, 16)
    a = EMA(model, 0.999, warmup=True)
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.9)
        a.update(model)
    b = EMA(model, 0.999, warmup=True)
    b.load_state_dict(a.state_dict())
    assert b.updates == 5 and b.current_decay() == a.current_decay()
    old = {k: v for k, v in a.state_dict().items() if k != "updates"}  # a checkpoint from before the warm-up
    c = EMA(model, 0.999, warmup=True)
    c.load_state_dict(old)
    assert c.current_decay() == 0.999


def ema_pytorch_decays(n: int, beta: float, every: int, after: int) -> list[float | None]:
    """The decay ema-pytorch (0.2.x, as the reference uses it: inv_gamma 1, power 2/3, min_value 0) applies at its
    update() call k = 0..n-1: None when the call does not average, 0.0 when it copies, written out from its source."""
    out, initted = [], False
    for k in range(n):
        step_after = k + 1  # its counter is incremented before the decay is read
        if k % every:
            out.append(None)
        elif k <= after:
            out.append(0.0)
        elif not initted:  # it copies the weights into the EMA, then averages that with the same weights
            initted = True
            out.append(0.0)
        else:
            epoch = max(step_after - after - 1, 0)
            out.append(0.0 if epoch <= 0 else min(max(1 - (1 + epoch) ** (-2 / 3), 0.0), beta))
    return out


@pytest.mark.parametrize("every,after", [(1, 0), (10, 100), (3, 5)])
def test_cadence_and_warmup_follow_ema_pytorch(every, after):
    torch.manual_seed(4)
    model = build_model("tiny", 3, 16)
    ema = EMA(model, decay=0.999, warmup=True, every=every, after=after)
    expected = ema_pytorch_decays(400, 0.999, every, after)
    shadow = {n: p.detach().clone() for n, p in model.named_parameters()}
    for k, d in enumerate(expected):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        changed = ema.update(model)
        assert changed == (d is not None), k
        if d is not None:
            assert ema.current_decay(k) == pytest.approx(d, abs=1e-15), k
            for n, p in model.named_parameters():
                shadow[n] = shadow[n] * d + p.detach() * (1 - d)
    for n in shadow:
        assert torch.allclose(ema.shadow[n], shadow[n], atol=1e-6), n


def test_cadence_resumes_exactly():
    torch.manual_seed(5)
    model = build_model("tiny", 3, 16)
    steps = [{n: torch.randn_like(p) * 0.01 for n, p in model.named_parameters()} for _ in range(60)]
    params = dict(model.named_parameters())

    def run(ema, chunk):
        for delta in chunk:
            with torch.no_grad():
                for n, d in delta.items():
                    params[n].add_(d)
            ema.update(model)

    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    straight = EMA(model, 0.99, warmup=True, every=10, after=12)
    run(straight, steps)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(start[n])
    first = EMA(model, 0.99, warmup=True, every=10, after=12)
    run(first, steps[:27])  # stop mid-cadence, inside the copy phase's end
    resumed = EMA(model, 0.99, warmup=True, every=10, after=12)
    resumed.load_state_dict(first.state_dict())
    run(resumed, steps[27:])
    assert resumed.updates == straight.updates == 60
    assert all(torch.equal(resumed.shadow[n], straight.shadow[n]) for n in straight.shadow)
