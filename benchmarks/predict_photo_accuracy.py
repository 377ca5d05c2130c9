"""Accuracy of ``mnistdist predict``'s conversion on synthetic photos of MNIST test digits.

Photos come from tests/synthetic_photos.py (uneven lighting, glare, blur, sensor noise, both
polarities) at each strength; each is converted with ``predict.to_mnist`` and classified by a
trained model. ``--before REV`` also runs the conversion as of a git revision
(mnistdist/tools/images.py, or mnistdist/predict.py before it moved), for a before/after table::

    MNISTDIST_DATA_ROOT=../shared/data python benchmarks/predict_photo_accuracy.py \
        --model runs/seed --before HEAD~1 --per-strength 200

Prints one line per strength: accuracy; how many photos were refused ("no digit found"),
carried a doubt about the digit found (conversion warnings; current code only), or got a
most probable class under 50%.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mnistdist.config import load_config  # noqa: E402
from mnistdist.tools import images, predict  # noqa: E402
from mnistdist.tools.saved_model import load_weights  # noqa: E402
from tests.synthetic_photos import STRENGTHS, mnist_coverage, photograph  # noqa: E402


def module_at(rev: str):
    for where in ("mnistdist/tools/images.py", "mnistdist/predict.py"):
        shown = subprocess.run(["git", "show", f"{rev}:{where}"], cwd=REPO, capture_output=True, text=True)
        if shown.returncode == 0:
            break
    else:
        raise SystemExit(f"--before {rev}: no mnistdist/tools/images.py or mnistdist/predict.py there")
    source = shown.stdout
    path = Path(tempfile.mkdtemp()) / "predict_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("predict_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def convert(module, photo: np.ndarray):
    """(uint8 28x28 or None when refused, warnings)"""
    try:
        if hasattr(module, "convert"):
            result = module.convert(photo)
            return result.image, result.warnings
        return module.to_mnist(photo), []
    except module.ImageError:
        return None, []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a run directory")
    parser.add_argument("--per-strength", type=int, default=200)
    parser.add_argument("--before", default=None, metavar="REV", help="also measure the conversion at this git revision")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torchvision

    root = os.environ.get("MNISTDIST_DATA_ROOT") or str(REPO.parent / "shared" / "data")
    test = torchvision.datasets.MNIST(root, train=False, download=False)
    test_images, labels = test.data.numpy(), test.targets.numpy()
    cfg = load_config(args.model / "config.yaml")
    model = load_weights(cfg, args.model / "model.safetensors")
    modules = {"after": images}
    if args.before:
        modules = {"before": module_at(args.before), "after": images}

    print(f"{'strength':>8}  " + "  ".join(f"{name:>7} refused doubted lowprob" for name in modules))
    for strength in STRENGTHS:
        rng = np.random.default_rng([args.seed, round(strength * 1000)])
        picks = rng.choice(len(test_images), args.per_strength, replace=False)
        photos = [photograph(mnist_coverage(test_images[i]), strength, rng,
                             polarity=("black-on-white", "white-on-black")[k % 2]) for k, i in enumerate(picks)]
        cells = []
        for module in modules.values():
            converted = [convert(module, p) for p in photos]
            ok = np.array([image is not None for image, _ in converted])
            digits = np.stack([np.zeros((28, 28), np.uint8) if image is None else image for image, _ in converted])
            probs = predict.predict_probabilities(model, digits, cfg.data.normalize_mean, cfg.data.normalize_std)
            correct = (probs.argmax(axis=1) == labels[picks]) & ok
            doubted = str(sum(bool(doubts) for _, doubts in converted)) if hasattr(module, "convert") else "-"
            low = int(((probs.max(axis=1) < 0.5) & ok).sum())
            cells.append(f"{100 * correct.mean():6.1f}% {len(ok) - ok.sum():7d} {doubted:>7} {low:7d}")
        print(f"{strength:8.2f}  " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
