"""``mnistdist predict``: classify your own digit images with saved weights (one process, CPU).

Each image is converted like MNIST (``mnistdist.tools.images``), then the model gives every
class a probability. A doubtful digit (conversion warnings) or answer (the most probable class
under ``LOW_PROBABILITY``) gets one ``warning:`` line on stderr, ``warnings`` in ``--json`` and
``!`` in the table. A bad input (missing, unreadable, too large, no digit) gets one ``error:``
line and is listed under ``errors`` in ``--json``; the other images are still predicted, and
the exit code is 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mnistdist.cli import EXIT_USAGE
from mnistdist.config import ConfigError
from mnistdist.tools import images
from mnistdist.tools.images import Conversion, ImageError, Polarity
from mnistdist.tools.saved_model import load_weights, model_and_config

if TYPE_CHECKING:
    from torch import nn

LOW_PROBABILITY = 0.5  # the most probable class has less: a warning


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Classify images of handwritten digits (PNG/JPEG, any size). Each image is converted "
        "the way MNIST was made: grayscale, uneven lighting subtracted, the digit picked by Otsu's "
        "threshold, its bounding box scaled into 20x20 keeping its aspect ratio, centred by centre "
        "of mass in 28x28, white digit on black. An image whose digit looks implausible (filling "
        "the image, tiny, lost in noise) or whose most probable class has under 50% gets one "
        "'warning:' line on stderr, 'warnings' in --json and '!' in the table. A bad image (unreadable, too "
        "large, no digit found) gets one 'error:' line and is listed under 'errors' in --json; the others are "
        "still predicted, and the exit code is 2.")
    parser.add_argument("--model", type=Path, required=True,
                        help="model.safetensors written by training, or a checkpoint directory holding one")
    parser.add_argument("--config", type=Path, default=None,
                        help="config of the run (default: config.yaml next to the model or up to 2 "
                             "directories above it, else the defaults)")
    parser.add_argument("--polarity", choices=images.POLARITIES, default=None,
                        help="auto (default) decides from the border pixels; black-on-white inverts "
                             "(scans, paper); white-on-black is MNIST's own")
    parser.add_argument("--invert", action="store_true", help="same as --polarity black-on-white")
    parser.add_argument("--top-k", type=int, default=3, metavar="K", help="classes to show per image (1..10, default 3)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--save-converted", type=Path, default=None, metavar="DIR",
                        help="also write each converted 28x28 image (what the model sees) as DIR/<name>.png")
    parser.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR",
                        help="PNG/JPEG files, or directories (their *.png/*.jpg/*.jpeg files, sorted); "
                             f"at most {images.MAX_PIXELS // 1_000_000} megapixels and {images.MAX_SIDE} pixels "
                             "a side each (larger ones are refused before decoding: scale them down)")


def main(args: argparse.Namespace) -> int:
    """Convert, classify, print the table (or JSON), the errors and the warnings; 2 when any
    input was bad."""
    if args.invert and args.polarity not in (None, "black-on-white"):
        raise ConfigError(f"--invert contradicts --polarity {args.polarity}")
    polarity = "black-on-white" if args.invert else (args.polarity or "auto")
    if not 1 <= args.top_k <= 10:
        raise ConfigError(f"--top-k must be in 1..10; got {args.top_k}")
    model_file, cfg = model_and_config(args.model, args.config)
    model = load_weights(cfg, model_file)  # a bad model stops everything, before any image is read
    converted, errors = convert_inputs(expand_inputs(args.images), polarity)
    paths = [path for _, path, _ in converted]
    conversions = [conversion for _, _, conversion in converted]
    if args.save_converted is not None and converted:
        save_converted(args.save_converted, converted)
    predictions = []
    if converted:
        digits = stack_images(conversions)
        probabilities = predict_probabilities(model, digits, cfg.data.normalize_mean, cfg.data.normalize_std)
        predictions = top_k(probabilities, paths, args.top_k, [c.warnings for c in conversions])
    if args.json:
        print(json.dumps({"model": str(model_file), "polarity": polarity,
                          "predictions": [p.as_record() for p in predictions],
                          "errors": [e.as_record() for e in errors]}))
    elif predictions:
        print(format_table(predictions))
    for line in warning_lines(predictions):  # a doubtful digit or answer: one line per image
        print(line, file=sys.stderr)
    return EXIT_USAGE if errors else 0


# --------------------------------------------------------------------------------------
# Inputs


@dataclass
class BadInput:
    """An input that gave no prediction, and why (one line naming it)."""

    path: str
    error: str

    def as_record(self) -> dict:
        return {"path": self.path, "error": self.error}


def expand_inputs(paths: Iterable[str | os.PathLike]) -> list[Path | BadInput]:
    """Files as given; directories replaced by their *.png/*.jpg/*.jpeg files (not recursive),
    sorted by name; a missing path or a directory without images is a BadInput in its place."""
    out: list[Path | BadInput] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in images.IMAGE_SUFFIXES)
            out.extend(found or [BadInput(str(p), f"{p}: directory holds no {'/'.join(images.IMAGE_SUFFIXES)} files")])
        elif p.is_file():
            out.append(p)
        else:
            out.append(BadInput(str(p), f"{p}: no such file or directory"))
    return out


def convert_inputs(inputs: Sequence[Path | BadInput], polarity: Polarity = "auto",
                   report: bool = True) -> tuple[list[tuple[int, Path, Conversion]], list[BadInput]]:
    """Read and convert every image of ``inputs`` (from ``expand_inputs``), one after another:
    ``(position in inputs, path, conversion)`` of each good one, and the bad ones (an
    ImageError), in input order; with ``report``, each bad one's ``error:`` line goes to stderr
    as it is met. A bad image does not stop the others."""
    converted, bad = [], []
    for i, item in enumerate(inputs):
        if isinstance(item, Path):
            try:
                converted.append((i, item, images.convert(images.load_grayscale(item), polarity, name=str(item))))
                continue
            except ImageError as e:
                item = BadInput(str(item), str(e))
        bad.append(item)
        if report:
            print(f"error: {item.error}", file=sys.stderr, flush=True)
    return converted, bad


def stack_images(conversions: Sequence[Conversion]) -> np.ndarray:
    """The converted images, uint8 [N, 28, 28]."""
    return np.stack([c.image for c in conversions])


def save_converted(out_dir: Path, converted: Sequence[tuple[int, Path, Conversion]]) -> None:
    """Each converted image as ``out_dir/NNNN-<name>.png``, NNNN its position among the inputs."""
    from PIL import Image

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for i, path, conversion in converted:
            Image.fromarray(conversion.image).save(out_dir / f"{i:04d}-{path.stem}.png")
    except OSError as e:
        raise ConfigError(f"--save-converted {out_dir}: cannot write ({e.strerror or e})") from None


# --------------------------------------------------------------------------------------
# Prediction


@dataclass
class Prediction:
    path: str
    predicted: int
    top_k: list[tuple[int, float]]  # (class, probability), most probable first
    warnings: list[str] = field(default_factory=list)  # doubts about the digit or the answer

    def as_record(self) -> dict:
        return {
            "path": self.path,
            "predicted": self.predicted,
            "probability": self.top_k[0][1],
            "top_k": [{"class": c, "probability": p} for c, p in self.top_k],
            "warnings": list(self.warnings),
        }


def predict_probabilities(model: nn.Module, images_u8: np.ndarray, mean: float, std: float) -> np.ndarray:
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


def top_k(probabilities: np.ndarray, paths: Sequence[str | os.PathLike], k: int,
          warnings: Sequence[Sequence[str]] | None = None) -> list[Prediction]:
    """The ``k`` most probable classes of each image (ties broken by the lower class), with
    the conversion's ``warnings`` of each image, and one more when the most probable class
    has less than ``LOW_PROBABILITY``."""
    preds = []
    for i, (path, row) in enumerate(zip(paths, probabilities)):
        order = sorted(range(len(row)), key=lambda c: (-row[c], c))[:k]
        doubts = list(warnings[i]) if warnings is not None else []
        if row[order[0]] < LOW_PROBABILITY:
            doubts.append(f"low probability ({100 * row[order[0]]:.1f}% for {order[0]}, "
                          f"under {100 * LOW_PROBABILITY:.0f}%)")
        preds.append(Prediction(str(path), order[0], [(c, float(row[c])) for c in order], doubts))
    return preds


def format_table(predictions: Sequence[Prediction]) -> str:
    """Aligned text: path, predicted class, its probability, the other top-k classes; a
    trailing ``!`` marks an image with warnings."""
    width = max([len("image"), *(len(p.path) for p in predictions)])
    lines = [f"{'image':<{width}}  pred   prob  top-k"]
    for p in predictions:
        rest = "  ".join(f"{c}:{100 * q:.1f}%" for c, q in p.top_k)
        flag = "  !" if p.warnings else ""
        lines.append(f"{p.path:<{width}}  {p.predicted:>4}  {100 * p.top_k[0][1]:5.1f}%  {rest}{flag}")
    return "\n".join(lines)


def warning_lines(predictions: Sequence[Prediction]) -> list[str]:
    """One line per image with warnings: ``warning: PATH: first; second``."""
    return [f"warning: {p.path}: {'; '.join(p.warnings)}" for p in predictions if p.warnings]
