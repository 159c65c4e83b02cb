"""trainer.core.dwt against PyWavelets' dwt2(..., 'haar'), on hand-computed, random and real images."""
import numpy as np
import pytest
import pywt
import torch

from helpers import requires_cuda
from trainer.core.dwt import clip_bands, denormalize_bands, dwt2, idwt2, normalize_bands

FP32_TOL = 1e-5  # the bound for fp32 against pywt (fp64); observed errors are ~1e-7


def pywt_dwt(x: np.ndarray) -> np.ndarray:
    """Reference: (B, C, H, W) -> (B, 4C, H/2, W/2) as [cA, cH, cV, cD] along channels, in float64."""
    cA, (cH, cV, cD) = pywt.dwt2(x.astype(np.float64), "haar", axes=(-2, -1))
    return np.concatenate([cA, cH, cV, cD], axis=1)


def test_hand_computed_block():
    x = torch.tensor([[0.0, 1.0], [4.0, 5.0]]).view(1, 1, 2, 2)  # a=0 b=1 c=4 d=5
    y = dwt2(x).flatten().tolist()
    assert y == [5.0, -4.0, -1.0, 0.0]  # cA=(0+1+4+5)/2, cH=(0+1-4-5)/2, cV=(0-1+4-5)/2, cD=(0-1-4+5)/2
    assert idwt2(dwt2(x)).flatten().tolist() == [0.0, 1.0, 4.0, 5.0]


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (1, 3, 6, 10), (3, 1, 32, 16), (1, 3, 256, 256)])
def test_matches_pywt_random(shape):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    y = dwt2(x)
    assert y.shape == (shape[0], 4 * shape[1], shape[2] // 2, shape[3] // 2)
    assert y.dtype == torch.float32
    np.testing.assert_allclose(y.numpy(), pywt_dwt(x.numpy()), rtol=0, atol=FP32_TOL)


def test_matches_pywt_real_faces(real_faces):
    faces = real_faces(4)  # 250x250 LFW crops
    x = torch.from_numpy(np.stack(faces)).permute(0, 3, 1, 2).float() / 255  # (4, 3, 250, 250) in [0, 1]
    ref = pywt_dwt(x.numpy())
    assert np.abs(dwt2(x).numpy() - ref).max() < FP32_TOL
    # channel order [cA(R,G,B), cH(R,G,B), ...]: the first channel is the approximation of the red plane
    cA_red = pywt.dwt2(x[0, 0].double().numpy(), "haar")[0]
    np.testing.assert_allclose(dwt2(x)[0, 0].numpy(), cA_red, atol=FP32_TOL)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_perfect_reconstruction(dtype, tol):
    x = torch.rand(2, 3, 16, 12, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = dwt2(x)
    assert y.dtype == dtype
    assert (idwt2(y) - x).abs().max().item() < tol
    # and the other way round: every (B, 12, h, w) is the DWT of some image
    z = torch.randn(2, 12, 5, 7, dtype=torch.float64)
    assert (dwt2(idwt2(z)) - z).abs().max().item() < 1e-12


def test_orthonormal_energy_preserved():
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    assert torch.allclose((dwt2(x) ** 2).sum(), (x ** 2).sum())


def test_band_ranges_normalisation_and_clipping():
    x = torch.rand(8, 3, 16, 16)
    x[0] = 0
    x[1] = 1
    y = dwt2(x)
    assert y[:, :3].min() >= 0 and y[:, :3].max() <= 2 + 1e-6  # cA of [0, 1] images lies in [0, 2]
    assert y[:, 3:].abs().max() <= 1 + 1e-6  # details in [-1, 1]
    n = normalize_bands(y)
    assert torch.allclose(n[:, :3], 2 * y[:, :3] - 1) and torch.equal(n[:, 3:], y[:, 3:])
    assert torch.allclose(denormalize_bands(n), y)
    wild = torch.full((1, 12, 2, 2), 5.0)
    c = clip_bands(wild)
    assert c[:, :3].max() == 3 and c[:, 3:].max() == 1
    assert clip_bands(-wild).min() == -1


def test_odd_size_rejected():
    with pytest.raises(AssertionError, match="even"):
        dwt2(torch.zeros(1, 3, 5, 4))


@requires_cuda
def test_cuda_fp16_matches_cpu():
    x = torch.rand(2, 3, 64, 64)
    y = dwt2(x.cuda().half()).float().cpu()
    assert (y - dwt2(x)).abs().max() < 2e-3
    assert (idwt2(dwt2(x.cuda())).cpu() - x).abs().max() < 1e-6
