"""Digit images for the model: read a PNG/JPEG and convert it into an MNIST-like 28x28 image.

The conversion follows how MNIST itself was made (LeCun et al.): the digit's bounding box is
scaled to fit a 20x20 box (aspect ratio kept, anti-aliased), and the result is placed in a
28x28 canvas so that its centre of mass lands on the centre (pixel 14, 14, where the MNIST
test set's mean centre of mass lies). MNIST digits are white on black; a black-on-white scan
is inverted first (``polarity``; ``auto`` decides from the image's border pixels).

Photos of digits on paper need more than a scan: the sheet's uneven lighting is estimated and
subtracted, and the digit's pixels are picked by Otsu's threshold, kept out of the sensor
noise (``convert``). A located digit that is implausible (it fills the image, it is tiny, it
barely stands out of the noise) comes with warnings.

Pure numpy/scipy/PIL, unit-tested without a model; ``mnistdist.tools.predict`` classifies the result.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from scipy import ndimage

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
POLARITIES = ("auto", "white-on-black", "black-on-white")
Polarity = Literal["auto", "white-on-black", "black-on-white"]

CANVAS = 28  # MNIST image side
BOX = 20  # the digit's bounding box is scaled to fit BOX x BOX
CENTER = 14.0  # where the centre of mass goes (row, column); MNIST test mean is 13.99 / 14.01
NOISE_FLOOR = 0.1  # after stretching, pixels below this fraction of the peak count as background
MIN_CONTRAST = 10.0  # grey levels (of 255) between background and the brightest stroke

# Photos: uneven lighting, sensor noise (see ``convert``).
BACKGROUND_GRID = 64  # the lighting is estimated on a copy at most this many pixels a side
BACKGROUND_SIGMA = 0.1  # ... fitting planes under a Gaussian window of this sigma (fraction of the side)
BACKGROUND_PASSES = 3  # estimates of the lighting, each without the digit found by the one before
OTSU_SAMPLES = 1_000_000  # Otsu's threshold of a larger image looks at every k-th pixel
WORK_SIDE = 512  # all passes but the last run on a copy at most this many pixels a side
DENOISE_SIGMA = 0.004  # Otsu's threshold is taken after a blur of this sigma (fraction of the longer side)
NOISE_SIGMAS = 4.0  # pixels within this many noise sigmas of the background are background
COMPONENT_GRID = 256  # the digit's connected components are found on a copy at most this size
KEEP_COMPONENT = 0.1  # components of at least this fraction of the largest one's size are the digit
MARGIN = 0.02  # the digit's box may reach this fraction of the image (+ 2 pixels) past Otsu's pixels
PEAK_PERCENTILE = 99.0  # of the digit's pixels: the level stretched to 255 in a noisy image

# Warnings: a located digit that is implausible.
FULL_FRAME = 0.9  # the digit's box covers this fraction of the image or more
TINY = 0.05  # the digit's box's longer side is under this fraction of the image's shorter side
MIN_CONTRAST_TO_NOISE = 6.0  # the digit's peak is under this many noise sigmas (pure noise: ~4-6)
MAX_PIXELS = 40_000_000
"""Largest image read (width x height; 40 megapixels, more than most phone photos). Checked
from the file's header before any pixel is decoded: PNG and JPEG compress so well that a
few hundred KB can ask for gigabytes (a 350 KB all-black RGBA PNG of 88 megapixels took 1.9 GB
to convert), and PIL itself only warns below 179 megapixels."""
MAX_SIDE = 65_535
"""Longest side read (pixels; JPEG's own limit, PNG allows 2**31 - 1). The conversion's work
grows with the pixels and, beyond them, with the longer side (PIL's resampling tables hold a
few numbers per output row or column; the noise estimate samples whole rows): a strip of few
megapixels but millions of pixels long needed more memory than a photo of ``MAX_PIXELS``.
Up to this side a strip of ``MAX_PIXELS`` needs about what the square photo needs. Checked from
the header, with ``MAX_PIXELS``."""
IMAGE_FORMATS = ["PNG", "JPEG"]  # what PIL may open: no TIFF (float pixels), BMP, GIF, ...


class ImageError(ValueError):
    """An input image that cannot be used; the message is one line naming the file."""


# --------------------------------------------------------------------------------------
# Finding and reading images


def _too_large(path: Path, pixels: int, size: str = "") -> ImageError:
    return ImageError(
        f"{path}: image has {pixels // 1_000_000} megapixels ({size}{pixels} pixels); predict reads at most "
        f"{MAX_PIXELS // 1_000_000} megapixels ({MAX_PIXELS} pixels): scale it down first"
    )


def load_grayscale(path: str | os.PathLike) -> np.ndarray:
    """Read a PNG or JPEG file as float32 grey levels 0..255, shape [H, W].

    Only PNG and JPEG are opened, and an image over ``MAX_PIXELS`` or with a side over
    ``MAX_SIDE`` is refused from its header before its pixels are decoded. Colour is converted with the ITU-R 601 luma weights (PIL's
    ``L``); EXIF rotation of photos is applied; transparency is flattened by
    ``flatten_alpha`` (a white digit on a transparent background stays a white digit).
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    try:
        with warnings.catch_warnings():
            # PIL warns from 89.5 megapixels; such an image is refused just below anyway.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(path, formats=IMAGE_FORMATS)  # reads the header only
        with opened:
            width, height = opened.size
            if width * height > MAX_PIXELS:
                raise _too_large(path, width * height, f"{width}x{height} = ")
            if max(width, height) > MAX_SIDE:
                raise ImageError(f"{path}: image is {width}x{height} pixels; predict reads at most "
                                 f"{MAX_SIDE} pixels a side: crop or scale it first")
            im = ImageOps.exif_transpose(opened)  # a loaded copy
            im.load()
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not a readable PNG/JPEG image") from None
    except Image.DecompressionBombError as e:  # PIL's own limit (2 x 89.5 megapixels) in open()
        found = re.search(r"\((\d+) pixels\)", str(e))
        raise _too_large(path, int(found.group(1)) if found else 2 * (Image.MAX_IMAGE_PIXELS or 0)) from None
    except (OSError, ValueError, SyntaxError) as e:
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise ImageError(f"{path}: cannot read image ({reason})") from None

    if im.mode.startswith("I;16"):
        gray = np.asarray(im, dtype=np.float32) / 257.0
    elif im.mode in ("I", "F"):  # (older Pillow reads 16-bit PNG as I)
        gray = np.asarray(im, dtype=np.float32)
        top = float(gray.max()) if gray.size else 0.0
        if np.isfinite(top) and top > 255:
            gray = gray * (255.0 / top)
    elif im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
        gray = flatten_alpha(im)
    else:
        gray = np.asarray(im.convert("L"), dtype=np.float32)
    if not np.isfinite(gray).all():
        raise ImageError(f"{path}: image holds NaN or infinite grey levels")
    return gray


def flatten_alpha(im) -> np.ndarray:
    """Grey levels 0..255 of an image with transparency, composited over the background its
    opaque pixels imply.

    When the opaque pixels cover less than half of the image they are the drawing (a digit on
    a transparent background): they go over black if they are bright (alpha-weighted mean
    luma above 127.5), else over white, so the digit keeps its contrast. When they cover more
    they are a sheet with transparent margins (a window screenshot): the margins take the
    sheet's own side, white for a bright sheet, black for a dark one. A fully transparent
    image is blank (white). 8-bit throughout, so a 40-megapixel RGBA image needs no float copies
    beyond the result.
    """
    from PIL import Image, ImageChops

    if im.mode == "LA":
        luma, alpha = im.getchannel("L"), im.getchannel("A")
    else:
        rgba = im if im.mode == "RGBA" else im.convert("RGBA")
        luma, alpha = rgba.convert("L"), rgba.getchannel("A")  # RGBA -> L ignores alpha
        del rgba
    weight = int(np.asarray(alpha).sum(dtype=np.uint64))  # sum of alpha, 0..255 each
    if weight == 0:
        return np.full((im.height, im.width), 255.0, dtype=np.float32)
    weighted_luma = int(np.asarray(ImageChops.multiply(luma, alpha)).sum(dtype=np.uint64))  # luma * alpha / 255
    bright = 255 * weighted_luma > 127.5 * weight
    drawing = weight < 0.5 * 255 * im.width * im.height
    background = 0 if bright == drawing else 255
    flat = Image.composite(luma, Image.new("L", luma.size, background), alpha)
    return np.asarray(flat, dtype=np.float32)


# --------------------------------------------------------------------------------------
# MNIST-style conversion (pure)


def border_pixels(gray: np.ndarray) -> np.ndarray:
    """The outermost row and column on each side."""
    return np.concatenate([gray[0, :], gray[-1, :], gray[1:-1, 0], gray[1:-1, -1]])


def detect_polarity(gray: np.ndarray) -> Literal["white-on-black", "black-on-white"]:
    """``black-on-white`` when the border (the background, in a framed digit) is mostly bright."""
    return "black-on-white" if float(np.median(border_pixels(gray))) > 127.5 else "white-on-black"


def _resize(img: np.ndarray, height: int, width: int, resample: str = "LANCZOS") -> np.ndarray:
    """Resampling of a float image (PIL's filters scale with the factor, so shrinking averages)."""
    from PIL import Image

    if img.shape == (height, width):
        return img
    out = Image.fromarray(img.astype(np.float32), "F").resize((width, height), Image.Resampling[resample])
    return np.asarray(out, dtype=np.float32)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> tuple[float, float]:
    """Otsu's threshold of ``values`` (the level that maximises the variance between the two
    classes it makes) and its separability, between-class / total variance (0..1: near 1 for a
    two-toned image, 2/pi = 0.64 for Gaussian noise alone).

    Written here on numpy's histogram: scipy has no Otsu, and scikit-image's
    ``threshold_otsu`` would add scikit-image, imageio, tifffile and lazy_loader (37 MB
    installed) for these lines; it returns no separability either."""
    values = np.asarray(values).ravel()
    values = values[:: max(1, values.size // OTSU_SAMPLES)]
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return lo, 0.0
    hist, edges = np.histogram(values, bins, (lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist, dtype=np.float64)[:-1]  # pixels at or below each candidate threshold
    s0 = np.cumsum(hist * centres)[:-1]
    n, s = w0[-1] + hist[-1], s0[-1] + hist[-1] * centres[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (s0 * n - s * w0) ** 2 / (w0 * (n - w0) * n * n)  # w0 w1 (mu0 - mu1)^2 / n^2
    between[(w0 == 0) | (w0 == n)] = 0.0
    k = int(np.argmax(between))
    total = float(((centres - s / n) ** 2 * hist).sum() / n)
    return float(edges[k + 1]), float(between[k] / total) if total > 0 else 0.0


def _cell_fraction(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """The fraction of True pixels of ``mask`` in each cell of a height x width grid."""
    h, w = mask.shape
    rows = np.linspace(0, h, height + 1).round().astype(np.int64)
    cols = np.linspace(0, w, width + 1).round().astype(np.int64)
    counts = np.add.reduceat(np.add.reduceat(mask, cols[:-1], axis=1, dtype=np.int32), rows[:-1], axis=0)
    return (counts / (np.diff(rows)[:, None] * np.diff(cols)[None, :])).astype(np.float32)


def _gaussian_matrix(n: int, sigma: float) -> np.ndarray:
    x = np.arange(n)
    return np.exp(-((x[:, None] - x[None, :]) ** 2) / (2 * sigma**2))


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a float image (edges extended); none under half a pixel."""
    if sigma < 0.5:
        return img
    return ndimage.gaussian_filter(img.astype(np.float32, copy=False), sigma, mode="nearest")


def estimate_background(img: np.ndarray, digit: np.ndarray | None = None) -> np.ndarray:
    """The lighting of the sheet under ``img``, leaving out the ``digit`` pixels.

    Local linear regression (normalized convolution with a plane): around every point, the
    plane that best fits the background pixels under a Gaussian window of sigma
    ``BACKGROUND_SIGMA`` of the longer side. It follows a lighting gradient right up to the
    image's edges, and glare, but not the strokes. Computed on a copy at most
    ``BACKGROUND_GRID`` pixels a side, then scaled back up.
    """
    h, w = img.shape
    scale = min(1.0, BACKGROUND_GRID / max(h, w))
    hs, ws = max(1, round(h * scale)), max(1, round(w * scale))
    small = _resize(img, hs, ws, "BOX").astype(np.float64)
    weight = np.ones((hs, ws))
    if digit is not None:
        cells = 1.0 - _cell_fraction(digit, hs, ws)
        padded = np.pad(cells, 1, mode="edge")  # also leave out the cells around the strokes
        cells = np.min([padded[i : i + hs, j : j + ws] for i in range(3) for j in range(3)], axis=0)
        weight = (cells > 0.99).astype(np.float64)
        if weight.mean() < 0.25:  # the "digit" covers most of the image: ignore it
            weight = np.ones((hs, ws))
    sigma = max(BACKGROUND_SIGMA * max(hs, ws), 1.0)
    gr, gc = _gaussian_matrix(hs, sigma), _gaussian_matrix(ws, sigma)
    ys, xs = np.mgrid[0:hs, 0:ws].astype(np.float64)
    phi = [np.ones_like(ys), ys, xs]  # the plane's basis: 1, y, x
    # Windowed moments about the origin (sums of K * weight * phi_i * phi_j, and * img) ...
    m = np.empty((hs, ws, 3, 3))
    v = np.empty((hs, ws, 3, 1))
    for i in range(3):
        v[..., i, 0] = gr @ (weight * phi[i] * small) @ gc
        for j in range(i, 3):
            m[..., i, j] = m[..., j, i] = gr @ (weight * phi[i] * phi[j]) @ gc
    # ... moved to each cell (basis 1, y - y0, x - x0), where the plane's level is the answer.
    shift = np.zeros((hs, ws, 3, 3))
    shift[..., 0, 0] = shift[..., 1, 1] = shift[..., 2, 2] = 1.0
    shift[..., 1, 0], shift[..., 2, 0] = -ys, -xs
    m = shift @ m @ np.swapaxes(shift, -1, -2)
    v = shift @ v
    mass = m[..., 0, 0]
    m[..., 1, 1] += 1e-3 * mass * sigma**2  # a little ridge on the slopes: a lone row of cells
    m[..., 2, 2] += 1e-3 * mass * sigma**2  # still gives a level
    fallback = float((small * weight).sum() / weight.sum())
    covered = mass > 1e-4 * mass.max()
    level = np.full((hs, ws), fallback)
    level[covered] = np.linalg.solve(m[covered], v[covered])[:, 0, 0]
    return _resize(level.astype(np.float32), h, w, "BILINEAR")


def _digit_region(found: np.ndarray) -> tuple[int, int, int, int]:
    """The box (top, left, bottom, right exclusive) around the pixels of ``found`` that make
    the digit: its connected components (on a copy at most ``COMPONENT_GRID`` pixels a side,
    where a cell with any pixel counts) of at least ``KEEP_COMPONENT`` of the largest one's
    size, leaving out specks and stray marks."""
    h, w = found.shape
    scale = min(1.0, COMPONENT_GRID / max(h, w))
    hs, ws = max(1, round(h * scale)), max(1, round(w * scale))
    cells = found if (hs, ws) == (h, w) else _cell_fraction(found, hs, ws) > 0
    labels, count = ndimage.label(cells, structure=np.ones((3, 3), dtype=bool))  # 8-connected
    if count == 0:
        return 0, 0, h, w
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    boxes = ndimage.find_objects(labels)
    kept = [boxes[k] for k in np.flatnonzero(sizes >= KEEP_COMPONENT * sizes.max())]
    top, left = min(rows.start for rows, _ in kept), min(cols.start for _, cols in kept)
    bottom, right = max(rows.stop for rows, _ in kept), max(cols.stop for _, cols in kept)
    return (int(np.floor(top * h / hs)), int(np.floor(left * w / ws)),
            int(np.ceil(bottom * h / hs)), int(np.ceil(right * w / ws)))


def _noise(img: np.ndarray, step: int = 1) -> float:
    """The sensor noise's standard deviation in ``img``, from differences of pixels ``step``
    apart (far enough apart that a blur leaves them independent): 1.4826 x their median
    absolute deviation / sqrt(2). Strokes and a slow lighting gradient hardly move the
    median. A large image contributes every k-th row and column, about 1M differences."""
    h, w = img.shape
    every = max(1, (h * w) // 500_000)  # rows (columns) used, so no full-size copy is made
    parts = []
    if w > step:
        rows = img[:: min(every, h)]
        parts.append((rows[:, step:] - rows[:, :-step]).ravel())
    if h > step:
        cols = img[:, :: min(every, w)]
        parts.append((cols[step:, :] - cols[:-step, :]).ravel())
    if not parts:
        return 0.0
    d = np.concatenate(parts)
    return 1.4826 * float(np.median(np.abs(d - np.median(d)))) / np.sqrt(2.0)


@dataclass
class Conversion:
    """An image converted for the model, and what was found on the way."""

    image: np.ndarray  # uint8 [28, 28]
    polarity: str  # the one used
    box: tuple[int, int, int, int]  # the digit in the input: top, left, bottom, right (exclusive)
    warnings: list[str]  # one phrase per doubt about the located digit; empty when plausible


def _find_digit(gray: np.ndarray, digit: np.ndarray | None):
    """One pass of ``convert``'s steps 2-3 on the (digit bright) image ``gray``, leaving the
    ``digit`` found by the pass before (any resolution) out of the lighting estimate.
    Returns the flattened (and blurred when noisy) image, its noise sigma, the threshold, the
    digit's pixels and the box around them (top, left, bottom, right exclusive)."""
    sigma = DENOISE_SIGMA * max(gray.shape)
    step = 1 + int(np.ceil(3 * sigma)) if sigma >= 0.5 else 1
    flat = gray - estimate_background(gray, digit)
    smooth = _blur(flat, sigma) if _noise(flat) > 0.5 else flat
    noise = _noise(smooth, step)
    threshold, _ = otsu_threshold(smooth)
    if NOISE_SIGMAS * noise < float(smooth.max()):  # Otsu's, but never within the noise
        threshold = max(threshold, NOISE_SIGMAS * noise)
    found = smooth > threshold
    top, left, bottom, right = _digit_region(found)
    digit = np.zeros_like(found)
    digit[top:bottom, left:right] = found[top:bottom, left:right]
    return smooth, noise, threshold, digit, (top, left, bottom, right)


def convert(gray: np.ndarray, polarity: Polarity = "auto", name: str = "image") -> Conversion:
    """An image of one digit (grey levels 0..255, any size) -> MNIST-like uint8 [28, 28].

    1. polarity: invert black-on-white images (``auto``: decided from the border pixels);
    2. lighting: subtract the sheet's lighting (``estimate_background``, planes fitted to the
       background under a wide window), so a gradient or glare becomes a flat black;
    3. the digit: Otsu's threshold (``otsu_threshold``) of the flattened image, lightly
       blurred when it is noisy, but never within ``NOISE_SIGMAS`` of the noise, picks the
       digit's pixels; its largest connected components are the digit (``_digit_region``),
       which steps 2-3 leave out of the next lighting estimate (``BACKGROUND_PASSES``);
    4. its peak level is stretched to 255; pixels below ``NOISE_FLOOR`` of the peak, or
       within the noise, become 0 (never those over Otsu's threshold); on an evenly lit,
       noise-free scan this is just the background level subtracted and the range stretched;
    5. crop the digit's bounding box and scale it so its longer side is 20 pixels;
    6. paste it into a 28x28 black canvas with its centre of mass at (14, 14) (shifted back
       inside the canvas if the digit is very lopsided).

    Raises ImageError for an image with no contrast at all; a located digit that is not
    plausible (it fills the image, it is tiny, it barely stands out of the noise) is returned
    with ``warnings``.
    """
    gray = np.asarray(gray, dtype=np.float32)
    if gray.ndim != 2 or min(gray.shape) < 2:
        raise ImageError(f"{name}: expected a 2-D image of at least 2x2 pixels, got shape {gray.shape}")
    if not np.isfinite(gray).all():
        raise ImageError(f"{name}: image holds NaN or infinite grey levels")
    if polarity not in POLARITIES:
        raise ValueError(f"polarity must be one of {POLARITIES}; got {polarity!r}")
    if polarity == "auto":
        polarity = detect_polarity(gray)
    if polarity == "black-on-white":
        gray = 255.0 - gray
    height, width = gray.shape

    # The lighting is estimated with the strokes in, then again without the digit found; all
    # passes but the last on a copy at most WORK_SIDE pixels a side (the same image if smaller).
    scale = min(1.0, WORK_SIDE / max(height, width))
    work = _resize(gray, max(2, round(height * scale)), max(2, round(width * scale)), "BOX")
    digit = None
    for final in [False] * (BACKGROUND_PASSES - 1) + [True]:
        smooth, noise, threshold, digit, region = _find_digit(gray if final else work, digit)
    top, left, bottom, right = region
    # The level stretched to 255: the brightest stroke, or a high percentile when noisy.
    if not digit.any():
        peak = 0.0
    elif noise > 0.5:
        peak = float(np.percentile(smooth[digit], PEAK_PERCENTILE))
    else:
        peak = float(smooth[digit].max())
    if peak < MIN_CONTRAST:
        raise ImageError(f"{name}: no digit found (the image is blank or has almost no contrast)")

    # The digit's box: pixels over the noise floor in its region, widened by a margin for the
    # anti-aliased edges.
    margin = 2 + round(MARGIN * max(height, width) + 3 * DENOISE_SIGMA * max(height, width))
    top, bottom = max(top - margin, 0), min(bottom + margin, height)
    left, right = max(left - margin, 0), min(right + margin, width)
    img = np.clip(smooth[top:bottom, left:right] * (255.0 / peak), 0.0, 255.0)
    # Never above Otsu's threshold, so the digit's own pixels stay even in heavy noise.
    floor = min(max(NOISE_FLOOR * peak, NOISE_SIGMAS * noise), threshold) * 255.0 / peak
    img[img < floor] = 0.0
    rows, cols = np.flatnonzero(img.any(axis=1)), np.flatnonzero(img.any(axis=0))
    box = (top + int(rows[0]), left + int(cols[0]), top + int(rows[-1]) + 1, left + int(cols[-1]) + 1)
    img = img[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]

    h, w = img.shape
    scale = BOX / max(h, w)
    img = np.clip(_resize(img, max(1, round(h * scale)), max(1, round(w * scale))), 0.0, 255.0)
    if img.sum() <= 0:  # a digit so thin it vanished when scaled down
        raise ImageError(f"{name}: no digit found after scaling to 20x20")

    h, w = img.shape
    com_r, com_c = ndimage.center_of_mass(img)
    at_r = min(max(round(CENTER - com_r), 0), CANVAS - h)
    at_c = min(max(round(CENTER - com_c), 0), CANVAS - w)
    canvas = np.zeros((CANVAS, CANVAS), dtype=np.float32)
    canvas[at_r : at_r + h, at_c : at_c + w] = img
    return Conversion(np.rint(canvas).astype(np.uint8), polarity, box,
                      _doubts(box, height, width, peak / max(noise, 1e-6)))


def _doubts(box: tuple[int, int, int, int], height: int, width: int, contrast_to_noise: float) -> list[str]:
    """Why the digit found may not be one (``FULL_FRAME``, ``TINY``, ``MIN_CONTRAST_TO_NOISE``)."""
    box_h, box_w = box[2] - box[0], box[3] - box[1]
    doubts = []
    if box_h * box_w >= FULL_FRAME * height * width:
        doubts.append(f"the digit found fills {100 * box_h * box_w / (height * width):.0f}% of the image "
                      "(no digit on a plain background, or cropped too tightly?)")
    if max(box_h, box_w) < TINY * min(height, width):
        doubts.append(f"the digit found is tiny ({box_h}x{box_w} of {height}x{width} pixels: a speck?)")
    if contrast_to_noise < MIN_CONTRAST_TO_NOISE:
        doubts.append(f"the digit found barely stands out of the noise ({contrast_to_noise:.1f} noise sigmas)")
    return doubts


def to_mnist(gray: np.ndarray, polarity: Polarity = "auto", name: str = "image") -> np.ndarray:
    """``convert(...).image``: an image of one digit -> uint8 [28, 28] like MNIST."""
    return convert(gray, polarity, name).image
