"""``mnistdist predict`` on photos of digits on paper (fast tier: pure numpy/PIL, one in-process
CLI call with an untrained model; no real MNIST).

A printed digit photographed under uneven lighting with sensor noise (tests/synthetic_photos.py)
used to be misread: a fixed threshold above the border's level let the lit part of the sheet
through, so the "digit" was the lit area and the real strokes shrank to a few pixels. Now the
lighting is estimated and subtracted, and Otsu's threshold (kept out of the noise) picks the
digit. A located digit that is not plausible, or a most probable class under 50%, is warned
about: one line per image on stderr, ``warnings`` in the JSON, ``!`` in the table.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mnistdist import cli
from mnistdist.tools import images, predict
from tests.synthetic_photos import font_coverage, photograph

SHIFTS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]


def stroke_extent(img: np.ndarray) -> int:
    """The longer side of the bounding box of the bright pixels (>= 128): the strokes, not a
    faint background. About 18-20 for a digit converted like MNIST (scaled into 20x20)."""
    rows, cols = np.flatnonzero((img >= 128).any(axis=1)), np.flatnonzero((img >= 128).any(axis=0))
    return 0 if rows.size == 0 else int(max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1)


def best_shift_corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(float), b.astype(float).ravel()
    return max(np.corrcoef(np.roll(a, s, (0, 1)).ravel(), b)[0, 1] for s in SHIFTS)


# --------------------------------------------------------------------------------------
# Otsu


def test_otsu_threshold_separates_two_levels_and_not_noise():
    rng = np.random.default_rng(0)
    dark, bright = rng.normal(40, 5, 900), rng.normal(200, 5, 100)
    threshold, separability = images.otsu_threshold(np.concatenate([dark, bright]))
    assert dark.max() < threshold < bright.min() and separability > 0.95
    _, noise_only = images.otsu_threshold(rng.normal(128, 20, 100_000))
    assert noise_only == pytest.approx(2 / np.pi, abs=0.02)  # one Gaussian split in two
    assert images.otsu_threshold(np.full(10, 7.0)) == (7.0, 0.0)


# --------------------------------------------------------------------------------------
# The converted digit stays large


@pytest.mark.parametrize("polarity", ["black-on-white", "white-on-black"])
@pytest.mark.parametrize("digit", [3, 7])  # the examples: a 3 read as 1, a 7 as 5
def test_lit_noisy_photo_keeps_the_digit_large(digit, polarity):
    """Strength 0.75: 52% of the light lost across the sheet, glare, blur, noise sigma 21.
    The fixed threshold left strokes 0-11 pixels long here, correlating 0.1-0.5 with the
    clean digit; now 18-19 pixels (MNIST: 20), 0.72-0.9."""
    coverage = font_coverage(digit)
    clean = images.to_mnist(coverage * 255.0, "white-on-black")
    assert stroke_extent(clean) >= 18
    for seed in range(3):
        photo = photograph(coverage, 0.75, np.random.default_rng([digit, seed]), polarity=polarity)
        converted = images.to_mnist(photo)
        extent, corr = stroke_extent(converted), best_shift_corr(converted, clean)
        assert extent >= 16 and corr >= 0.65, f"seed {seed}: strokes span {extent} pixels, correlation {corr:.2f}"


def test_evenly_lit_scan_is_left_as_it_was():
    """No lighting to remove, no noise: the digit's grey levels are only stretched, as before."""
    img = np.zeros((40, 30), np.float32)
    img[8:32, 13:18] = 255.0
    img[8:12, 8:18] = 180.0
    out = images.convert(255.0 - img)  # grey paper would do as well
    assert out.polarity == "black-on-white" and out.box == (8, 8, 32, 18) and out.warnings == []
    assert stroke_extent(out.image) == 20 and out.image.max() == 255
    assert sorted(set(out.image[out.image > 0].tolist()))[-1] == 255


# --------------------------------------------------------------------------------------
# Warnings


def _blob(height: int = 200, width: int = 240) -> np.ndarray:
    """A dark ellipse filling the frame on light paper, with a little noise."""
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.full((height, width), 220.0)
    img[((yy - height / 2) / (height / 2 - 2)) ** 2 + ((xx - width / 2) / (width / 2 - 2)) ** 2 < 1] = 30.0
    return np.clip(img + np.random.default_rng(1).normal(0, 8, img.shape), 0, 255)


def test_implausible_digits_are_warned_about():
    blank = np.clip(np.random.default_rng(0).normal(128, 20, (200, 240)), 0, 255)
    assert images.convert(blank).warnings, "a blank noisy image"
    full = images.convert(_blob())
    assert any("fills" in w and "of the image" in w for w in full.warnings), full.warnings
    rect = np.full((200, 240), 230.0)
    rect[3:-3, 3:-3] = 25.0
    assert any("fills" in w for w in images.convert(rect).warnings)
    speck = np.full((300, 300), 230.0)
    speck[150:153, 100:103] = 20.0
    assert any("tiny" in w for w in images.convert(speck).warnings)
    # Plausible digits are not: a clean printed one, a photo of one.
    assert images.convert(255.0 - np.pad(font_coverage(7) * 255.0, 20)).warnings == []
    for polarity in ("black-on-white", "white-on-black"):
        photo = images.convert(photograph(font_coverage(3), 0.75, np.random.default_rng(2), polarity=polarity))
        assert photo.polarity == polarity and photo.warnings == []


def test_low_probability_is_warned_about():
    probabilities = np.array([[0.45, 0.35, 0.2] + [0.0] * 7, [0.0] * 9 + [1.0]])
    preds = predict.top_k(probabilities, ["a.png", "b.png"], 2, [[], ["doubt"]])
    assert preds[0].warnings == ["low probability (45.0% for 0, under 50%)"]
    assert preds[1].warnings == ["doubt"]
    assert predict.warning_lines(preds) == ["warning: a.png: low probability (45.0% for 0, under 50%)",
                                            "warning: b.png: doubt"]
    assert predict.top_k(probabilities[1:], ["c.png"], 1)[0].warnings == []


def _fresh_model(tmp_path: Path) -> Path:
    from safetensors.torch import save_file

    from mnistdist.config import Config
    from mnistdist.training import build_model

    model = build_model(Config())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    return tmp_path / "model.safetensors"


def test_cli_warns_one_line_per_image(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(photograph(font_coverage(3), 0.75, np.random.default_rng(0))).save(images / "a-photo.png")
    Image.fromarray(_blob().astype(np.uint8)).save(images / "b-blob.jpg", quality=90)
    model = _fresh_model(tmp_path)

    assert cli.main(["predict", "--model", str(model), "--json", str(images)]) == 0
    captured = capsys.readouterr()
    records = json.loads(captured.out)["predictions"]
    assert [Path(r["path"]).name for r in records] == ["a-photo.png", "b-blob.jpg"]
    assert any("fills" in w for w in records[1]["warnings"])
    expected = [f"warning: {r['path']}: {'; '.join(r['warnings'])}" for r in records if r["warnings"]]
    assert captured.err.splitlines() == expected  # an untrained model may add "low probability"

    assert cli.main(["predict", "--model", str(model), str(images)]) == 0
    captured = capsys.readouterr()
    rows = captured.out.splitlines()[1:]
    assert [row.endswith("  !") for row in rows] == [bool(r["warnings"]) for r in records]
    assert captured.err.splitlines() == expected
