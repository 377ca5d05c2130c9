"""Synthetic photos of digits on paper, for testing ``mnistdist predict`` on camera images.

A digit (an MNIST test digit, or a printed one drawn with PIL's default font) is laid on a
sheet as ink coverage 0..1 and photographed under uneven lighting:

* reflectance: dark ink (0.08) on light paper (0.85), or with ``polarity="white-on-black"``
  light chalk on a dark board (the same two levels swapped);
* illumination: a linear fall-off across the sheet in a random direction (up to 70% of the
  light lost at strength 1) plus a bright glare spot (up to +70 grey levels);
* camera: Gaussian blur (defocus, sigma up to 4% of the digit's height), then Gaussian sensor
  noise (sigma up to 28 grey levels), rounded to 8 bits.

Everything scales with ``strength`` (0: a clean, evenly lit photo; 1: hard). Pure numpy/PIL,
deterministic for a given ``rng``.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

PAPER, INK = 0.85, 0.08  # reflectances
MAX_FALLOFF = 0.7  # fraction of the light lost across the sheet at strength 1
MAX_GLARE = 70.0  # grey levels added at the glare spot's centre at strength 1
MAX_NOISE = 28.0  # sensor noise sigma, grey levels, at strength 1
MAX_BLUR = 0.04  # defocus sigma as a fraction of the digit's height at strength 1
STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def mnist_coverage(digit: np.ndarray) -> np.ndarray:
    """An MNIST image (uint8 28x28, white on black) cropped to its bounding box, as ink 0..1."""
    rows, cols = np.flatnonzero(digit.any(axis=1)), np.flatnonzero(digit.any(axis=0))
    return digit[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].astype(np.float32) / 255.0


def font_coverage(digit: int, height: int = 120) -> np.ndarray:
    """A printed digit (PIL's default font, scaled) cropped to its bounding box, as ink 0..1."""
    font = ImageFont.load_default(size=height)
    im = Image.new("L", (2 * height, 2 * height), 0)
    ImageDraw.Draw(im).text((height // 2, height // 4), str(digit), fill=255, font=font)
    return mnist_coverage(np.asarray(im))


def _scaled(coverage: np.ndarray, height: int) -> np.ndarray:
    h, w = coverage.shape
    width = max(1, round(w * height / h))
    im = Image.fromarray(coverage.astype(np.float32), "F").resize((width, height), Image.Resampling.BICUBIC)
    return np.clip(np.asarray(im, dtype=np.float32), 0.0, 1.0)


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    if sigma < 0.3:
        return img
    lo, hi = float(img.min()), float(img.max())
    if hi <= lo:
        return img
    scaled = Image.fromarray(np.rint((img - lo) * (255.0 / (hi - lo))).astype(np.uint8))
    blurred = np.asarray(scaled.filter(ImageFilter.GaussianBlur(sigma)), dtype=np.float32)
    return blurred * ((hi - lo) / 255.0) + lo


def photograph(coverage: np.ndarray, strength: float, rng: np.random.Generator,
               polarity: str = "black-on-white", digit_fraction: float | None = None) -> np.ndarray:
    """A uint8 grey photo of the digit ``coverage`` (0..1, cropped) on a sheet.

    The sheet is 160..320 pixels a side (random aspect ratio); the digit's height is
    ``digit_fraction`` of the shorter side (random in 0.35..0.7 when None), placed at random.
    """
    height, width = (int(v) for v in rng.integers(160, 321, size=2))
    frac = rng.uniform(0.35, 0.7) if digit_fraction is None else digit_fraction
    digit_h = max(8, round(frac * min(height, width)))
    ink = _scaled(coverage, digit_h)
    if ink.shape[1] > width - 4:  # a very wide digit: fit the width instead
        ink = _scaled(coverage, max(8, round(digit_h * (width - 4) / ink.shape[1])))
    h, w = ink.shape
    top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
    cover = np.zeros((height, width), np.float32)
    cover[top : top + h, left : left + w] = ink

    background, digit = (PAPER, INK) if polarity == "black-on-white" else (INK, PAPER)
    reflectance = background + (digit - background) * cover

    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * xx / width + np.sin(angle) * yy / height
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
    light = 1.0 - strength * MAX_FALLOFF * ramp
    cy, cx = rng.uniform(0, height), rng.uniform(0, width)
    radius = rng.uniform(0.2, 0.5) * max(height, width)
    glare = strength * MAX_GLARE * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2))

    photo = 255.0 * reflectance * light + glare
    photo = _blur(photo, strength * MAX_BLUR * digit_h)
    photo = photo + rng.normal(0.0, strength * MAX_NOISE, photo.shape)
    return np.clip(np.rint(photo), 0, 255).astype(np.uint8)
