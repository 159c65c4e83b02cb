"""Decode -> orient -> crop -> antialiased resize -> JPEG + Haar DWT, for one source image (pure, no I/O).

Decoding. Large JPEGs are decoded at reduced size with libjpeg's DCT scaling (`Image.draft`, scales 1/2, 1/4, 1/8),
choosing the smallest scale at which the crop still has at least `size` pixels a side; the final resize is then
a small antialiased step (or none: a 1024 px CelebA-HQ image decodes straight to 256 px). EXIF orientation is
applied (boxes refer to the image as displayed). Modes: L, P, CMYK, I;16 (16-bit, scaled by 1/257), RGBA/LA/PA
(composited over white) all become 8-bit RGB. Pillow's decompression-bomb limit (`max_pixels`) is enforced.

Crops. A face box (x, y, w, h) becomes a square of side `box_scale * max(w, h)` centred on the box; without a box,
or for plain folders, the centred square of side min(W, H). Where the square leaves the image it is padded by
replicating the edge pixels (no black bars for the model to learn). The square is resized to `size` with Pillow's
LANCZOS filter (antialiased when downscaling).

Every rejected input raises `BadInput(reason)`, with `reason` one of REASONS, so the job can count it.
"""
from __future__ import annotations

import hashlib
import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from pipeline.schema import JPEG_QUALITY, encode_dwt

REASONS = ("empty file", "not an image", "truncated or corrupt image", "too large (decompression bomb)",
           "too small", "box outside image", "unreadable file", "unexpected error")
DEFAULT_BOX_SCALE = 1.3
DEFAULT_MIN_SIDE = 32        # skip sources whose crop square is smaller than this many pixels
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default limit (about 9459 x 9459)
# The largest crop a shard set may hold (--size), and so the largest image or member a reader of shards accepts:
# the trainer refuses anything bigger from a tar header or an image header, before reading or decoding it.
MAX_CROP_SIDE = 2048
SHARD_IMAGE_FORMATS = ("JPEG",)  # what a shard's `jpg` member may be (docs/format.md)

__all__ = ["BadInput", "CropResult", "process_image", "face_square", "centre_square", "haar_dwt_uint8", "haar_dwt_f16",
           "haar_idwt_to_uint8", "crop_from_dwt_f16", "encode_jpeg", "image_grid",
           "REASONS", "DEFAULT_BOX_SCALE", "DEFAULT_MIN_SIDE", "DEFAULT_MAX_PIXELS", "MAX_CROP_SIDE",
           "SHARD_IMAGE_FORMATS", "open_image", "max_member_bytes"]


class BadInput(Exception):
    """A source image that cannot become a sample; `reason` is one of REASONS, `detail` says more."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class CropResult:
    jpg: bytes
    dwt: bytes | None
    meta: dict  # original width/height, face box, crop box, resize scale, sha256 of the source bytes


def face_square(box, box_scale: float = DEFAULT_BOX_SCALE) -> tuple[float, float, float, float]:
    """Loose face box (x, y, w, h) -> square (left, top, right, bottom) of side box_scale * max(w, h)."""
    x, y, w, h = box
    side = box_scale * max(w, h)
    cx, cy = x + w / 2, y + h / 2
    return (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)


def centre_square(width: int, height: int) -> tuple[float, float, float, float]:
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return (left, top, left + side, top + side)


def haar_dwt_uint8(crop: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (12, H/2, W/2) float32 orthonormal Haar DWT of crop/255 (same layout as trainer.dwt)."""
    x = crop.astype(np.float32).transpose(2, 0, 1) * (1.0 / 255.0)  # (3, H, W)
    a, b = x[:, 0::2, 0::2], x[:, 0::2, 1::2]
    c, d = x[:, 1::2, 0::2], x[:, 1::2, 1::2]
    s, t, u, v = a + b, c + d, a - b, c - d
    return np.concatenate([s + t, s - t, u + v, u - v], axis=0) * 0.5


# Every band coefficient of a uint8 crop is k * 0.5/255 for an integer k in [-510, 1020] (sums and differences
# of four pixels): compute k exactly in int16 and look its float16 up, which is 3-4x faster than float maths
# followed by numpy's float32 -> float16 conversion, and rounds each value once (from float64).
_F16_LUT = (np.arange(-510, 1021, dtype=np.float64) * (0.5 / 255)).astype(np.float16)


def haar_dwt_f16(crop: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (12, H/2, W/2) float16: `haar_dwt_uint8` rounded to float16, computed exactly."""
    H, W, _ = crop.shape
    x = np.ascontiguousarray(crop.transpose(2, 0, 1)).astype(np.int16).reshape(3, H // 2, 2, W // 2, 2)
    a, b, c, d = x[:, :, 0, :, 0], x[:, :, 0, :, 1], x[:, :, 1, :, 0], x[:, :, 1, :, 1]
    s, t, u, v = a + b, c + d, a - b, c - d
    k = np.empty((12, H // 2, W // 2), np.int16)
    np.add(s, t, out=k[0:3])
    np.subtract(s, t, out=k[3:6])
    np.add(u, v, out=k[6:9])
    np.subtract(u, v, out=k[9:12])
    k += 510
    return _F16_LUT.take(k)


# ... and back: the k of each float16 bit pattern that `_F16_LUT` holds (distinct: float16's spacing below 4, 1/512,
# is under that of k, 1/510), and _NOT_K for every other pattern.
_NOT_K = np.int16(-32768)
_K_OF_F16 = np.full(1 << 16, _NOT_K, np.int16)
_K_OF_F16[_F16_LUT.view(np.uint16)] = np.arange(-510, 1021, dtype=np.int16)


def crop_from_dwt_f16(bands: np.ndarray) -> np.ndarray | None:
    """The (H, W, 3) uint8 crop whose `haar_dwt_f16` is `bands` (exactly), or None when `bands` is no such DWT:
    each value gives back its k (`_K_OF_F16`), and the four k of a 2x2 block give its pixels as sums / 4."""
    k = _K_OF_F16.take(np.ascontiguousarray(bands, dtype="<f2").view(np.uint16))  # (12, h, w)
    if (k == _NOT_K).any():
        return None
    kA, kH, kV, kD = k[0:3], k[3:6], k[6:9], k[9:12]
    _, h, w = kA.shape
    x = np.empty((3, h, 2, w, 2), np.int16)
    x[:, :, 0, :, 0], x[:, :, 0, :, 1] = kA + kH + kV + kD, kA + kH - kV - kD
    x[:, :, 1, :, 0], x[:, :, 1, :, 1] = kA - kH + kV - kD, kA - kH - kV + kD
    if (x & 3).any() or x.min() < 0 or x.max() > 4 * 255:
        return None
    return np.ascontiguousarray((x >> 2).reshape(3, 2 * h, 2 * w).transpose(1, 2, 0)).astype(np.uint8)


def encode_jpeg(crop: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> the sample's JPEG bytes: quality JPEG_QUALITY, 4:4:4 (no chroma subsampling)."""
    out = io.BytesIO()
    Image.fromarray(crop).save(out, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return out.getvalue()


def haar_idwt_to_uint8(bands: np.ndarray) -> np.ndarray:
    """Inverse of `haar_dwt_uint8`: (12, h, w) float -> (2h, 2w, 3) uint8 image (rounded, clipped)."""
    cA, cH, cV, cD = np.split(bands.astype(np.float32), 4, axis=0)  # each (3, h, w)
    p, q, r, s = cA + cH, cV + cD, cA - cH, cV - cD
    C, h, w = cA.shape
    x = np.empty((C, 2 * h, 2 * w), np.float32)
    x[:, 0::2, 0::2], x[:, 0::2, 1::2] = (p + q) * 0.5, (p - q) * 0.5
    x[:, 1::2, 0::2], x[:, 1::2, 1::2] = (r + s) * 0.5, (r - s) * 0.5
    return np.clip(x.transpose(1, 2, 0) * 255 + 0.5, 0, 255).astype(np.uint8)


def image_grid(images, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """(B, H, W, 3) uint8 images -> one (rows*(H+pad)+pad, nrow*(W+pad)+pad, 3) picture on white, in rows of
    `nrow` (default: a square-ish grid)."""
    images = np.asarray(images)
    B, H, W, _ = images.shape
    nrow = nrow or math.ceil(math.sqrt(B))
    rows = math.ceil(B / nrow)
    grid = np.full((rows * (H + pad) + pad, nrow * (W + pad) + pad, 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, nrow)
        grid[pad + r * (H + pad):pad + r * (H + pad) + H, pad + c * (W + pad):pad + c * (W + pad) + W] = im
    return grid


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit (or 32-bit int) grey: rescale, never clip
        arr = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        grey = np.clip(arr * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")  # L, P, CMYK (Pillow undoes Adobe's inverted CMYK), 1, F


def max_member_bytes(side: int) -> int:
    """The largest tar member a sample of `side` px crops may have: its dwt.f16 bands (12 x (side/2)^2 float16 =
    6 bytes a pixel), with 1 MiB to spare for a JPEG of the crop (at quality 95 well under 6 bytes a pixel) and
    its metadata."""
    return 6 * side * side + (1 << 20)


def open_image(data: bytes, max_pixels: int, formats: tuple[str, ...] | None = None) -> Image.Image:
    """Parse the header only (cheap): size, format, EXIF; refuse an image over `max_pixels` or (given `formats`,
    Pillow format names) of another format, before anything is decoded. Decoding happens on `load()`."""
    if not data:
        raise BadInput("empty file")
    try:
        with warnings.catch_warnings():  # the limit is ours (max_pixels), checked below: no warning noise
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=formats)
    except Image.UnidentifiedImageError:
        raise BadInput("not an image", f"not {' or '.join(formats)}" if formats else "") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadInput("too large (decompression bomb)", str(e)) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadInput("truncated or corrupt image", str(e)) from None
    W, H = im.size
    if W * H > max_pixels:
        raise BadInput("too large (decompression bomb)", f"{W}x{H} > {max_pixels} pixels")
    return im


def _load(im: Image.Image, crop_fraction: float, size: int, oriented: bool) -> Image.Image:
    """Decode, with DCT scaling (JPEG) so that a crop covering `crop_fraction` of the shorter side keeps at least
    `size` px; then apply the EXIF orientation if there is one (`oriented`)."""
    if im.format == "JPEG":
        W, H = im.size
        scale = min(W, H) * crop_fraction / size  # > 1: the crop has more pixels than we keep
        if scale >= 2:
            im.draft("RGB", (math.ceil(W / scale), math.ceil(H / scale)))
    try:
        im.load()
    except (OSError, SyntaxError, ValueError) as e:  # truncated data, broken tables
        raise BadInput("truncated or corrupt image", str(e)) from None
    if not oriented:
        return im
    try:
        return ImageOps.exif_transpose(im)
    except Exception as e:  # noqa: BLE001 - a broken EXIF block must not lose an otherwise good image
        warnings.warn(f"ignoring unreadable EXIF orientation: {e}", stacklevel=2)
        return im


def process_image(data: bytes, *, size: int = 256, box=None, box_scale: float = DEFAULT_BOX_SCALE,
                  with_dwt: bool = True, min_side: int = DEFAULT_MIN_SIDE,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> CropResult:
    """Source bytes -> CropResult. `box` (x, y, w, h) in displayed-image pixels, or None for a centre square."""
    im = open_image(data, max_pixels)
    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - unreadable EXIF: treat as unrotated
        orientation = 1
    rotated = orientation in (5, 6, 7, 8)
    W, H = (im.height, im.width) if rotated else im.size  # the size as displayed
    if box is not None:
        square = face_square(box, box_scale)
        l, t, r, b = square
        if r <= 0 or b <= 0 or l >= W or t >= H:
            raise BadInput("box outside image", f"box {tuple(box)} vs image {W}x{H}")
    else:
        square = centre_square(W, H)
    side = square[2] - square[0]
    if side < min_side:
        raise BadInput("too small", f"crop side {side:.0f} px < {min_side} px (image {W}x{H})")
    im = _load(im, side / min(W, H), size, oriented=orientation not in (None, 1))
    # map the square into the decoded image (DCT scaling: 1, 1/2, 1/4 or 1/8, per axis after libjpeg's rounding)
    rx, ry = im.size[0] / W, im.size[1] / H
    l, t, r, b = square
    crop = _crop_square(_to_rgb(im), (l + r) / 2 * rx, (t + b) / 2 * ry, side * (rx + ry) / 2, size)
    dwt = encode_dwt(haar_dwt_f16(crop)) if with_dwt else None
    meta = {"width": W, "height": H, "box": list(box) if box is not None else None,
            "crop": [round(v, 2) for v in square], "scale": round(size / side, 6),
            "sha256": hashlib.sha256(data).hexdigest()}
    return CropResult(encode_jpeg(crop), dwt, meta)


def _crop_square(im: Image.Image, cx: float, cy: float, side: float, size: int) -> np.ndarray:
    """Crop the square of `side` px centred on (cx, cy) (it may leave the image: edge-padded there), resize it
    to size x size -> (size, size, 3) uint8. One integer side for both axes keeps the square square."""
    n = max(1, int(round(side)))
    l, t = int(round(cx - n / 2)), int(round(cy - n / 2))
    r, b = l + n, t + n
    W, H = im.size
    il, it, ir, ib = max(l, 0), max(t, 0), min(r, W), min(b, H)
    if ir <= il or ib <= it:  # touches the image by less than a pixel after rounding
        raise BadInput("box outside image", f"crop square ({l}, {t}, {r}, {b}) leaves no pixel of a {W}x{H} image")
    region = im.crop((il, it, ir, ib))
    if (il, it, ir, ib) != (l, t, r, b):
        arr = np.asarray(region)
        arr = np.pad(arr, ((it - t, b - ib), (il - l, r - ir), (0, 0)), mode="edge")
        region = Image.fromarray(arr)
    if region.size != (size, size):
        region = region.resize((size, size), Image.LANCZOS)
    return np.asarray(region, dtype=np.uint8)
