"""Classify your own digit images: turn a PNG/JPEG into an MNIST-like 28x28 image, then predict.

The conversion follows how MNIST itself was made (LeCun et al.): the digit's bounding box is
scaled to fit a 20x20 box (aspect ratio kept, anti-aliased), and the result is placed in a
28x28 canvas so that its centre of mass lands on the centre (pixel 14, 14, where the MNIST
test set's mean centre of mass lies). MNIST digits are white on black; a black-on-white scan
is inverted first (``polarity``; ``auto`` decides from the image's border pixels).

Everything here except ``predict_probabilities`` is pure numpy/PIL so it can be
unit-tested without a model.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
POLARITIES = ("auto", "white-on-black", "black-on-white")
Polarity = Literal["auto", "white-on-black", "black-on-white"]

CANVAS = 28  # MNIST image side
BOX = 20  # the digit's bounding box is scaled to fit BOX x BOX
CENTER = 14.0  # where the centre of mass goes (row, column); MNIST test mean is 13.99 / 14.01
NOISE_FLOOR = 0.1  # after stretching, pixels below this fraction of the peak count as background
MIN_CONTRAST = 10.0  # grey levels (of 255) between background and the brightest stroke
MAX_PIXELS = 40_000_000
"""Largest image read (width x height; 40 megapixels, more than most phone photos). Checked
from the file's header before any pixel is decoded: PNG and JPEG compress so well that a
few hundred KB can ask for gigabytes (a 350 KB all-black RGBA PNG of 88 megapixels took 1.9 GB
to convert), and PIL itself only warns below 179 megapixels."""
IMAGE_FORMATS = ["PNG", "JPEG"]  # what PIL may open: no TIFF (float pixels), BMP, GIF, ...


class ImageError(ValueError):
    """An input image that cannot be used; the message is one line naming the file."""


# --------------------------------------------------------------------------------------
# Finding and reading images


def expand_inputs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given; directories replaced by their *.png/*.jpg/*.jpeg files (not recursive),
    sorted by name. Raises ImageError for a missing path or a directory without images."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ImageError(f"{p}: directory holds no {'/'.join(IMAGE_SUFFIXES)} files")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise ImageError(f"{p}: no such file or directory")
    return out


def _too_large(path: Path, pixels: int, size: str = "") -> ImageError:
    return ImageError(
        f"{path}: image has {pixels // 1_000_000} megapixels ({size}{pixels} pixels); predict reads at most "
        f"{MAX_PIXELS // 1_000_000} megapixels ({MAX_PIXELS} pixels): scale it down first"
    )


def load_grayscale(path: str | os.PathLike) -> np.ndarray:
    """Read a PNG or JPEG file as float32 grey levels 0..255, shape [H, W].

    Only PNG and JPEG are opened, and an image over ``MAX_PIXELS`` is refused from its header
    before its pixels are decoded. Colour is converted with the ITU-R 601 luma weights (PIL's
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


def _resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Anti-aliased resampling of a float image (PIL's Lanczos filter scales with the factor)."""
    from PIL import Image

    if img.shape == (height, width):
        return img
    out = Image.fromarray(img.astype(np.float32)).resize((width, height), Image.Resampling.LANCZOS)
    return np.clip(np.asarray(out, dtype=np.float32), 0.0, 255.0)


def center_of_mass(img: np.ndarray) -> tuple[float, float]:
    """Intensity-weighted mean (row, column) of a non-negative image."""
    total = float(img.sum())
    rows = float((img.sum(axis=1) * np.arange(img.shape[0])).sum()) / total
    cols = float((img.sum(axis=0) * np.arange(img.shape[1])).sum()) / total
    return rows, cols


def to_mnist(gray: np.ndarray, polarity: Polarity = "auto", name: str = "image") -> np.ndarray:
    """An image of one digit (grey levels 0..255, any size) -> uint8 [28, 28] like MNIST.

    1. polarity: invert black-on-white images (``auto``: decided from the border pixels);
    2. background: subtract the border's median level and stretch so the brightest stroke is
       255; pixels under ``NOISE_FLOOR`` of that (JPEG noise, paper grain) become 0;
    3. crop the digit's bounding box and scale it so its longer side is 20 pixels;
    4. paste it into a 28x28 black canvas with its centre of mass at (14, 14) (shifted back
       inside the canvas if the digit is very lopsided).
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

    background = float(np.median(border_pixels(gray)))
    peak = float(gray.max())
    if peak - background < MIN_CONTRAST:
        raise ImageError(f"{name}: no digit found (the image is blank or has almost no contrast)")
    img = np.clip((gray - background) * (255.0 / (peak - background)), 0.0, 255.0)
    img[img < NOISE_FLOOR * 255.0] = 0.0

    rows = np.flatnonzero(img.any(axis=1))
    cols = np.flatnonzero(img.any(axis=0))
    img = img[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    h, w = img.shape
    scale = BOX / max(h, w)
    img = _resize(img, max(1, round(h * scale)), max(1, round(w * scale)))
    if img.sum() <= 0:  # a digit so thin it vanished when scaled down
        raise ImageError(f"{name}: no digit found after scaling to 20x20")

    h, w = img.shape
    com_r, com_c = center_of_mass(img)
    top = min(max(round(CENTER - com_r), 0), CANVAS - h)
    left = min(max(round(CENTER - com_c), 0), CANVAS - w)
    canvas = np.zeros((CANVAS, CANVAS), dtype=np.float32)
    canvas[top : top + h, left : left + w] = img
    return np.rint(canvas).astype(np.uint8)


def load_digits(paths: Sequence[Path], polarity: Polarity = "auto") -> np.ndarray:
    """Read and convert every image; uint8 [N, 28, 28]. Raises ImageError on the first bad one."""
    return np.stack([to_mnist(load_grayscale(p), polarity, name=str(p)) for p in paths])


# --------------------------------------------------------------------------------------
# Prediction


@dataclass
class Prediction:
    path: str
    predicted: int
    top_k: list[tuple[int, float]]  # (class, probability), most probable first

    def as_record(self) -> dict:
        return {
            "path": self.path,
            "predicted": self.predicted,
            "probability": self.top_k[0][1],
            "top_k": [{"class": c, "probability": p} for c, p in self.top_k],
        }


def predict_probabilities(model, images_u8: np.ndarray, mean: float, std: float):
    """Softmax probabilities [N, 10] (float64 numpy) of uint8 [N, 28, 28] images, normalized
    exactly as in training (``data.normalize``)."""
    import torch

    from mnistdist.data import normalize

    device = next(model.parameters()).device
    x = normalize(torch.from_numpy(np.ascontiguousarray(images_u8)).to(device), mean, std)
    model.eval()
    with torch.no_grad():
        logits = model(x).float()
    return logits.softmax(dim=1).double().cpu().numpy()


def top_k(probabilities: np.ndarray, paths: Sequence[str | os.PathLike], k: int) -> list[Prediction]:
    """The ``k`` most probable classes of each image (ties broken by the lower class)."""
    preds = []
    for path, row in zip(paths, probabilities):
        order = sorted(range(len(row)), key=lambda c: (-row[c], c))[:k]
        preds.append(Prediction(str(path), order[0], [(c, float(row[c])) for c in order]))
    return preds


def format_table(predictions: Sequence[Prediction]) -> str:
    """Aligned text: path, predicted class, its probability, the other top-k classes."""
    width = max([len("image"), *(len(p.path) for p in predictions)])
    lines = [f"{'image':<{width}}  pred   prob  top-k"]
    for p in predictions:
        rest = "  ".join(f"{c}:{100 * q:.1f}%" for c, q in p.top_k)
        lines.append(f"{p.path:<{width}}  {p.predicted:>4}  {100 * p.top_k[0][1]:5.1f}%  {rest}")
    return "\n".join(lines)
