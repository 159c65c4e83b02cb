"""trainer.core.diffusion and trainer.core.sampling: closed forms, exact DDIM trajectories, DDPM == DDIM(eta=1),
losses, a training-free toy."""
import math

import numpy as np
import pytest
import torch

from trainer.core.diffusion import alphas_cumprod, dsm_loss, make_betas, msm_loss, posterior_variance, q_sample
from trainer.core.masking import gather_tokens, patchify, visible_indices
from trainer.core.models import build_model
from trainer.core.sampling import ddim_step, ddim_timesteps, ddpm_step, make_clip, sample

EXACT = 1e-10  # float64 arithmetic on the same closed forms


def test_linear_schedule_closed_form():
    b = make_betas("linear")
    assert b.dtype == torch.float64 and b.shape == (1000,)
    assert b[0].item() == pytest.approx(1e-4) and b[-1].item() == pytest.approx(0.02)
    assert np.allclose(np.diff(b.numpy()), (0.02 - 1e-4) / 999)
    ab = alphas_cumprod(b)
    ref = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    np.testing.assert_allclose(ab.numpy(), ref, rtol=1e-12)
    assert make_betas("linear", T=100)[-1].item() == pytest.approx(0.2)  # scaled by 1000/T


def test_cosine_schedule_closed_form():
    T, s = 1000, 0.008
    ab = alphas_cumprod(make_betas("cosine"))
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    for t in [0, 1, 10, 500, 900, 980]:  # alpha_bar_t = f(t+1) / f(0) where beta is not clipped
        assert ab[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-10)
    b = make_betas("cosine")
    assert b.max().item() == pytest.approx(0.999) and (b[-1] == 0.999)  # clipped at the end
    assert (torch.diff(b) >= 0).all()


def test_posterior_variance_hand_computed():
    ab = alphas_cumprod(torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64))  # 0.9, 0.72, 0.504
    np.testing.assert_allclose(ab.numpy(), [0.9, 0.72, 0.504])
    pv = posterior_variance(ab)
    np.testing.assert_allclose(pv.numpy(), [0.0, 0.2 * 0.1 / 0.28, 0.3 * 0.28 / 0.496], rtol=1e-12)


def test_q_sample_formula_and_dtype():
    ab = alphas_cumprod(make_betas("linear"))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 2, 4, 4, generator=g)
    eps = torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([0, 499, 999])
    x_t = q_sample(x0, t, eps, ab)
    for i in range(3):
        a = ab[t[i]].item()
        assert torch.allclose(x_t[i], math.sqrt(a) * x0[i] + math.sqrt(1 - a) * eps[i], atol=1e-6)
    assert q_sample(x0.half(), t, eps.half(), ab).dtype == torch.float16


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("t,t_prev", [(999, 749), (500, 499), (10, 3), (3, -1), (0, -1)])
def test_ddim_eta0_follows_the_true_trajectory_exactly(kind, t, t_prev):
    ab = alphas_cumprod(make_betas(kind))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    x_t = math.sqrt(ab[t]) * x0 + math.sqrt(1 - ab[t]) * eps
    x_prev = ddim_step(x_t, eps, t, t_prev, ab, eta=0.0)
    a_prev = 1.0 if t_prev < 0 else ab[t_prev].item()
    expected = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    assert (x_prev - expected).abs().max().item() < 1e-9 * max(1.0, 1 / math.sqrt(ab[t].item()))


@pytest.mark.parametrize("t,t_prev", [(999, 998), (500, 499), (1, 0), (0, -1), (999, 749), (20, 3)])
def test_ddim_eta1_equals_ddpm_ancestral(t, t_prev):
    ab = alphas_cumprod(make_betas("linear"))
    g = torch.Generator().manual_seed(1)
    x_t, eps, z = (torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    a = ddpm_step(x_t, eps, t, ab, t_prev=t_prev, noise=z)
    b = ddim_step(x_t, eps, t, t_prev, ab, eta=1.0, noise=z)
    assert (a - b).abs().max().item() < EXACT * 100
    if t_prev == t - 1 and t > 0:  # the added variance is DDPM's tilde_beta_t
        zero = ddpm_step(x_t, eps, t, ab, noise=torch.zeros_like(z))
        assert torch.allclose((a - zero) / z, posterior_variance(ab)[t].sqrt().to(z))


def test_ddpm_last_step_returns_x0_prediction():
    ab = alphas_cumprod(make_betas("cosine"))
    x0 = torch.rand(1, 3, 4, 4, dtype=torch.float64)
    eps = torch.randn_like(x0)
    x_t = math.sqrt(ab[0]) * x0 + math.sqrt(1 - ab[0]) * eps
    assert torch.allclose(ddpm_step(x_t, eps, 0, ab), x0, atol=1e-12)


def test_clipping_reprojects_eps():
    ab = alphas_cumprod(make_betas("linear"))
    x_t = torch.full((1, 12, 2, 2), 50.0, dtype=torch.float64)
    eps = torch.zeros_like(x_t)  # x0_hat = x_t / sqrt(ab_t): far outside every band's range
    out = ddim_step(x_t, eps, 10, -1, ab, clip=make_clip("dwt"))  # t_prev=-1 returns the clipped x0_hat
    assert out[:, :3].max() == 3 and out[:, 3:].max() == 1
    pix = ddim_step(x_t[:, :3], eps[:, :3], 10, -1, ab, clip=make_clip("pixel"))
    assert pix.max() == 1
    assert make_clip("none") is None
    # to an intermediate step, eps is re-derived from the clipped x0 (what the reference samplers do)
    t, t_prev = 10, 5
    x0c = make_clip("dwt")(x_t / math.sqrt(ab[t]))
    eps_c = (x_t - math.sqrt(ab[t]) * x0c) / math.sqrt(1 - ab[t])
    expected = math.sqrt(ab[t_prev]) * x0c + math.sqrt(1 - ab[t_prev]) * eps_c
    out = ddim_step(x_t, eps, t, t_prev, ab, clip=make_clip("dwt"))
    assert torch.allclose(out, expected, atol=1e-10)
    raw = math.sqrt(ab[t_prev]) * x0c + math.sqrt(1 - ab[t_prev]) * eps
    assert not torch.allclose(out, raw)
    # clip mode "reference" (the MaskDM reference's sampler): the clipped x0 with the model's raw eps
    ref = ddim_step(x_t, eps, t, t_prev, ab, clip=make_clip("dwt"), clip_mode="reference")
    assert torch.allclose(ref, raw, atol=1e-10)
    with pytest.raises(ValueError, match="clip mode"):
        ddim_step(x_t, eps, t, t_prev, ab, clip=make_clip("dwt"), clip_mode="both")


def test_clip_mode_changes_samples_only_where_clipping_bites():
    torch.manual_seed(0)
    model = build_model("tiny", 3, 16).eval()
    ab = alphas_cumprod(make_betas("cosine"))
    draw = lambda mode, clip: sample(model, (2, 3, 16, 16), ab, steps=5, eta=1.0, clip=clip, clip_mode=mode,  # noqa
                                     generator=torch.Generator().manual_seed(1))
    assert torch.equal(draw("rederive", None), draw("reference", None))  # nothing clipped: the same
    assert not torch.allclose(draw("rederive", make_clip("pixel")), draw("reference", make_clip("pixel")))
    with pytest.raises(ValueError, match="clip mode"):
        draw("raw", None)


def test_ddim_timesteps():
    assert ddim_timesteps(1000, 4) == [999, 749, 499, 249]
    assert ddim_timesteps(10, 10) == list(range(9, -1, -1))
    assert ddim_timesteps(1000, 1) == [999]
    ts = ddim_timesteps(1000, 250)
    assert len(ts) == 250 and len(set(ts)) == 250 and ts[0] == 999
    with pytest.raises(ValueError):
        ddim_timesteps(1000, 0)


MU, SIGMA = 0.7, 0.3


def toy_samples(kind, sampler, steps, eta, n=40_000):
    """1-D data x0 ~ N(mu, s^2). x_t ~ N(sqrt(ab) mu, ab s^2 + 1 - ab), and the optimal (posterior-mean) noise
    predictor is E[eps | x_t] = sqrt(1-ab) (x_t - sqrt(ab) mu) / (ab s^2 + 1 - ab): no training needed."""
    ab = alphas_cumprod(make_betas(kind))
    abf = ab.float()

    def eps_fn(x_t, t):
        a = abf[t].view(-1, 1)
        return (1 - a).sqrt() * (x_t - a.sqrt() * MU) / (a * SIGMA ** 2 + 1 - a)

    return sample(eps_fn, (n, 1), ab, sampler=sampler, steps=steps, eta=eta,
                  generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind,sampler,steps,eta", [("linear", "ddpm", 1000, 0.0), ("cosine", "ddpm", 1000, 0.0),
                                                    ("linear", "ddim", 1000, 0.0), ("cosine", "ddim", 250, 0.0),
                                                    ("cosine", "ddim", 1000, 1.0)])
def test_toy_gaussian_recovered_with_optimal_eps(kind, sampler, steps, eta):
    x = toy_samples(kind, sampler, steps, eta)
    # standard errors: mean s/sqrt(n) = 0.0015, std s/sqrt(2n) = 0.001; discretisation adds a little (and the
    # last step returns the posterior mean E[x0 | x_t], which shrinks the variance by ~0.1%)
    assert x.mean().item() == pytest.approx(MU, abs=0.01)
    assert x.std().item() == pytest.approx(SIGMA, abs=0.01)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_toy_gaussian_error_shrinks_with_steps(eta):
    """Few large steps with the posterior-mean predictor under-disperse (the reverse variance is too small,
    Bao et al. 2022, Analytic-DPM); the error must shrink steadily as the step count grows."""
    errors = [abs(toy_samples("linear", "ddim", steps, eta).std().item() - SIGMA) for steps in (10, 50, 250)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[0] > 0.05  # so the test would notice a sampler that ignores the step count


def test_sample_is_seeded_and_runs_a_real_model():
    torch.manual_seed(0)
    model = build_model("tiny", 12, 16).eval()
    ab = alphas_cumprod(make_betas("cosine"))
    run = lambda seed: sample(model, (2, 12, 16, 16), ab, steps=5, eta=0.0, clip=make_clip("dwt"),  # noqa: E731
                              generator=torch.Generator().manual_seed(seed))
    a, b, c = run(0), run(0), run(1)
    assert a.shape == (2, 12, 16, 16) and torch.equal(a, b) and not torch.equal(a, c)
    assert a[:, :3].max() <= 3 and a[:, 3:].abs().max() <= 1  # the last step returns the clipped x0_hat
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(model, (1, 12, 16, 16), ab, steps=5, eta=0.0, sampler="euler")


def test_msm_loss_is_the_visible_patch_mse():
    torch.manual_seed(0)
    model = build_model("tiny", 3, 32)
    ab = alphas_cumprod(make_betas("linear"))
    x0, noise = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    t = torch.tensor([100, 800])
    visible = visible_indices("block", 8, 0.75, 2, block=2, generator=torch.Generator().manual_seed(0))
    loss = msm_loss(model, x0, t, noise, ab, visible)
    pred = model(q_sample(x0, t, noise, ab), t, visible=visible)
    manual = ((pred - gather_tokens(patchify(noise, 4), visible)) ** 2).mean()
    assert loss.dtype == torch.float32 and torch.allclose(loss, manual)
    # dropped patches (data and noise alike) do not enter the loss
    keep = torch.zeros(2, 64, dtype=torch.bool).scatter_(1, visible, True)
    mask = keep.view(2, 1, 8, 1, 8, 1).expand(2, 3, 8, 4, 8, 4).reshape(2, 3, 32, 32)
    other = msm_loss(model, torch.where(mask, x0, 5.0), t, torch.where(mask, noise, -3.0), ab, visible)
    assert torch.equal(loss, other)
    # rate 0 is DSM on the full image
    all_visible = visible_indices("block", 8, 0.0, 2)
    assert torch.allclose(msm_loss(model, x0, t, noise, ab, all_visible), dsm_loss(model, x0, t, noise, ab),
                          atol=1e-6)
    loss.backward()
    assert model.head.weight.grad.abs().sum() > 0


def test_bands_weighting_is_mean_ca_plus_mean_details():
    """loss.dwt_weighting: bands (the reference) = mean over cA values + mean over the 9 detail bands' values, in
    every layout: full image, joint tokens (4x4x12 per token), split tokens (a pair of token sets)."""
    torch.manual_seed(0)
    ab = alphas_cumprod(make_betas("cosine"))
    x0, noise, t = torch.randn(2, 12, 16, 16), torch.randn(2, 12, 16, 16), torch.tensor([50, 900])
    g = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    joint = build_model("tiny", 12, 16)
    split = build_model("tiny", 12, 16, split_bands=3)
    with torch.no_grad():
        x_t = q_sample(x0, t, noise, ab)
        err = (joint(x_t, t) - noise) ** 2  # (B, 12, H, W)
        assert torch.allclose(msm_loss(joint, x0, t, noise, ab, None, "bands"),
                              err[:, :3].mean() + err[:, 3:].mean(), atol=1e-6)
        assert torch.allclose(msm_loss(joint, x0, t, noise, ab, None, "uniform"), err.mean(), atol=1e-6)
        # joint tokens: a token holds 16 cells x 12 bands; the cA values are 3 of each cell's 12
        vis = visible_indices("patch", 4, 0.5, 2, generator=g())
        tok = (joint(x_t, t, visible=vis) - gather_tokens(patchify(noise, 4), vis)) ** 2  # (B, S, 192)
        cells = tok.view(2, 8, 16, 12)
        assert torch.allclose(msm_loss(joint, x0, t, noise, ab, vis, "bands"),
                              cells[..., :3].mean() + cells[..., 3:].mean(), atol=1e-6)
        # split tokens: each set's own mean, summed; uniform: one mean over both sets' values
        vis2 = visible_indices("patch", 4, 0.5, 2, generator=g(), sets=2)
        ca, detail = split(x_t, t, visible=vis2)
        tca, tdetail = split.token_targets(noise, vis2)
        e_ca, e_detail = (ca - tca) ** 2, (detail - tdetail) ** 2
        assert torch.allclose(msm_loss(split, x0, t, noise, ab, vis2, "bands"), e_ca.mean() + e_detail.mean(),
                              atol=1e-6)
        assert torch.allclose(msm_loss(split, x0, t, noise, ab, vis2, "uniform"),
                              (e_ca.sum() + e_detail.sum()) / (e_ca.numel() + e_detail.numel()), atol=1e-6)
    # a cA error weighs 3x a detail error under bands, the same under uniform
    class Const(torch.nn.Module):
        def __init__(self, out):
            super().__init__()
            self.out = out

        def forward(self, x, t, visible=None):
            return self.out

    zero = torch.zeros_like(noise)
    ca_off, detail_off = noise.clone(), noise.clone()
    ca_off[:, 0] += 1.0  # one cA channel off by 1
    detail_off[:, 3] += 1.0  # one detail channel off by 1
    bands = [msm_loss(Const(p), zero, t, noise, ab, None, "bands") for p in (ca_off, detail_off)]
    uniform = [msm_loss(Const(p), zero, t, noise, ab, None, "uniform") for p in (ca_off, detail_off)]
    assert torch.allclose(bands[0], 3 * bands[1]) and torch.allclose(uniform[0], uniform[1])
    with pytest.raises(ValueError, match="weighting"):
        msm_loss(Const(ca_off), zero, t, noise, ab, None, "per-band")


@pytest.mark.parametrize("split", [False, True])
def test_noise_drawn_for_the_visible_patches_only_has_the_old_distribution(split):
    """The loop draws the noise for the visible tokens only (msm_loss(noise=None, generator=...)); before, it drew
    it for the full image and dropped the masked patches. Same model, x0, t and mask: the losses of 400 draws of
    each way come from one distribution (two-sample Kolmogorov-Smirnov), and the drawn tokens are N(0, 1)."""
    from scipy import stats

    torch.manual_seed(0)
    C, split_bands = (12, 3) if split else (3, 0)
    model = build_model("tiny", C, 16, split_bands=split_bands).eval()
    ab = alphas_cumprod(make_betas("cosine"))
    x0, t = torch.randn(4, C, 16, 16), torch.tensor([10, 300, 600, 990])
    visible = visible_indices("block", 4, 0.5, 4, block=2, generator=torch.Generator().manual_seed(1),
                              sets=2 if split else 1)
    new_gen, old_gen = torch.Generator().manual_seed(2), torch.Generator().manual_seed(3)
    with torch.no_grad():
        new = [msm_loss(model, x0, t, None, ab, visible, generator=new_gen).item() for _ in range(400)]
        old = [msm_loss(model, x0, t, torch.randn(x0.shape, generator=old_gen), ab, visible).item()
               for _ in range(400)]
    assert stats.ks_2samp(new, old).pvalue > 1e-3
    drawn = []

    class Recorder(torch.nn.Module):  # what the model is given
        def token_targets(self, x, visible):
            return model.token_targets(x, visible)

        def forward(self, x, t, visible=None):
            drawn.append(x)
            return model(x, t, visible=visible)

    zero = torch.zeros_like(x0)
    ab_one = torch.zeros_like(ab)  # alpha_bar = 0: x_t is the noise itself
    with torch.no_grad():
        msm_loss(Recorder(), zero, t, None, ab_one, visible, generator=torch.Generator().manual_seed(5))
    given, visible_x0 = drawn[0], model.token_targets(x0, visible)
    values = torch.cat([d.flatten() for d in (given if split else (given,))])
    assert values.numel() == sum(x.numel() for x in (visible_x0 if split else (visible_x0,)))  # visible only
    assert stats.kstest(values.numpy(), "norm").pvalue > 1e-3
