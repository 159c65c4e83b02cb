"""Shared test fixtures. Tests run on CPU; GPU cases skip without CUDA."""
from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# ../shared/data beside the checkout (CI and developer machines); override with MASKDM_SHARED_DATA.
SHARED_DATA = Path(os.environ.get("MASKDM_SHARED_DATA", REPO.parent / "shared" / "data"))

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def read_real_faces(n: int, tar_name: str = "lfw-deepfunneled.tar") -> list[np.ndarray]:
    """The first n JPEGs of a real face archive in ../shared/data as uint8 (H, W, 3) arrays (read, never copied)."""
    from PIL import Image

    path = SHARED_DATA / tar_name
    if not path.exists():
        pytest.skip(f"real face data not found at {path} (set MASKDM_SHARED_DATA)")
    images = []
    with tarfile.open(path) as tar:
        for member in tar:
            if member.isfile() and member.name.lower().endswith(".jpg"):
                data = tar.extractfile(member).read()
                images.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
                if len(images) == n:
                    break
    return images


@pytest.fixture
def real_faces():
    return read_real_faces
