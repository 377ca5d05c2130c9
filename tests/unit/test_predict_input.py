"""``mnistdist predict`` reads digit images, not decompression bombs (fast tier: pure PIL/numpy,
one small subprocess to measure peak memory, one in-process CLI call with a fresh model).

* only PNG and JPEG are opened (a float TIFF or a BMP named .png is "not a readable PNG/JPEG");
* an image over ``images.MAX_PIXELS``, or with a side over ``images.MAX_SIDE``, is refused
  from its header, before any pixel is decoded: one line naming the file, exit 2;
* NaN/Inf grey levels are a one-line error, not a traceback;
* transparent pixels become the background that fits the opaque ones, so a white digit on a
  transparent background is read as a digit.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mnistdist import cli
from mnistdist.tools import images
from tests.conftest import REPO


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def zero_png(path: Path, width: int, height: int, color_type: int = 0, rows: int | None = None) -> Path:
    """A valid all-zero 8-bit PNG written row by row (the test never holds the pixels):
    grey (color_type 0) or RGBA (6). Zeros compress about 1000:1. ``rows`` < height writes
    only that many rows (a truncated file: enough where only the header is meant to be read)."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
    row = b"\0" * (1 + width * channels)  # filter byte 0, then the pixels
    per_block = max(1, 1_000_000 // len(row))  # rows compressed at once: little memory
    count = height if rows is None else rows
    full, rest = divmod(count, per_block)
    # Raw deflate, each full block ended by a full flush: the compressor then starts afresh, so
    # every full block compresses to the same bytes, compressed once (hundreds of MB of zeros
    # take seconds to compress). The zlib header and Adler-32 trailer are written here.
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = row * per_block
    deflated = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH) if full else b""
    checksum = 1
    for _ in range(full):
        checksum = zlib.adler32(block, checksum)
    checksum = zlib.adler32(row * rest, checksum)
    tail = compressor.compress(row * rest) + compressor.flush()
    idat = b"\x78\xda" + deflated * full + tail + struct.pack(">I", checksum)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)))
        f.write(_chunk(b"IDAT", idat))
        f.write(_chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bombs")
    return {
        # 169 Mpx grey: PIL only warns (its error starts at 179 Mpx); before the limit this
        # took 1.3 GB to read.
        "grey-169mpx": zero_png(d / "grey.png", 13000, 13000),
        # 88 Mpx RGBA: under PIL's warning threshold, so not even a warning before the limit.
        "rgba-88mpx": zero_png(d / "rgba.png", 9400, 9400, color_type=6),
    }


# What a user's process sees: a fresh interpreter that reads the image with load_grayscale.
# Peak resident memory is VmHWM (ru_maxrss would include the forked pytest before exec).
PEAK_SCRIPT = r"""
import json, re, sys
from mnistdist.tools import images

def peak_mb():
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) // 1024

results = {}
baseline = peak_mb()
for path in sys.argv[1:]:
    try:
        images.load_grayscale(path)
        outcome = "read"
    except images.ImageError as e:
        outcome = str(e)
    results[path] = {"outcome": outcome, "peak_mb": peak_mb()}
print(json.dumps({"baseline_mb": baseline, "results": results}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc (Linux)")
def test_bombs_are_refused_from_the_header_with_low_peak_memory(bombs):
    sizes = {name: path.stat().st_size for name, path in bombs.items()}
    assert all(size < 400_000 for size in sizes.values()), sizes
    result = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, *map(str, bombs.values())],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "DecompressionBombWarning" not in result.stderr  # refused, not warned about
    report = json.loads(result.stdout)
    print(f"\nfile sizes {sizes}; peak memory {report}")  # shown with pytest -s
    for name, path in bombs.items():
        outcome = report["results"][str(path)]
        assert outcome["outcome"].startswith(f"{path}: "), outcome
        assert "megapixels" in outcome["outcome"] and "\n" not in outcome["outcome"], outcome
        # Refused from the header: nothing near the 169-676 MB of pixels is ever allocated.
        assert outcome["peak_mb"] < report["baseline_mb"] + 60, (name, report)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc (Linux)")
def test_an_extreme_aspect_ratio_is_refused_from_the_header(tmp_path):
    """A strip a few pixels wide holds few megapixels, but the conversion's work also grows
    with the longer side (resampling tables, noise samples per row): such a strip needed more
    memory than a photo of MAX_PIXELS. It is refused by its longer side, from the header."""
    strips = [zero_png(tmp_path / "wide.png", 20_000_000, 2), zero_png(tmp_path / "tall.png", 2, 20_000_000)]
    result = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, *map(str, strips)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for path, size in zip(strips, ("20000000x2", "2x20000000")):
        outcome = report["results"][str(path)]
        assert outcome["outcome"] == (f"{path}: image is {size} pixels; predict reads at most "
                                      f"{images.MAX_SIDE} pixels a side: crop or scale it first"), outcome
        assert outcome["peak_mb"] < report["baseline_mb"] + 60, report


def test_side_limit_is_checked_before_decoding(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "MAX_SIDE", 10)
    Image.new("L", (10, 10)).save(tmp_path / "ok.png")
    Image.new("L", (11, 2)).save(tmp_path / "wide.png")
    Image.new("L", (2, 11)).save(tmp_path / "tall.jpg")
    assert images.load_grayscale(tmp_path / "ok.png").shape == (10, 10)
    for name, size in (("wide.png", "11x2"), ("tall.jpg", "2x11")):
        with pytest.raises(images.ImageError, match=f"{name}: image is {size} pixels; .* at most 10 pixels a side"):
            images.load_grayscale(tmp_path / name)


def test_over_pils_own_limit_is_the_same_one_line(tmp_path):
    # PIL raises DecompressionBombError itself above 2 x 89.5 Mpx, in open(): the same message
    # as ours. Only the header is read, so one row of pixel data will do.
    bomb = zero_png(tmp_path / "huge.png", 20000, 10000, rows=1)
    with pytest.raises(images.ImageError) as info:
        images.load_grayscale(bomb)
    assert str(info.value).startswith(f"{bomb}: image has 200 megapixels")
    assert f"at most {images.MAX_PIXELS // 1_000_000} megapixels" in str(info.value)


def test_pixel_limit_is_checked_before_decoding(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "MAX_PIXELS", 100)
    Image.new("L", (10, 10)).save(tmp_path / "ok.png")
    Image.new("L", (11, 10)).save(tmp_path / "big.png")
    Image.new("L", (10, 11)).save(tmp_path / "big.jpg")
    assert images.load_grayscale(tmp_path / "ok.png").shape == (10, 10)
    for name in ("big.png", "big.jpg"):
        with pytest.raises(images.ImageError, match=f"{name}: image has 0 megapixels .*110 pixels"):
            images.load_grayscale(tmp_path / name)


def _fresh_model(tmp_path: Path) -> Path:
    from safetensors.torch import save_file

    from mnistdist.config import Config
    from mnistdist.training import build_model

    model = build_model(Config())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    return tmp_path / "model.safetensors"


def test_cli_refuses_a_bomb_with_exit_2_and_one_line(bombs, tmp_path, capsys):
    model = _fresh_model(tmp_path)
    code = cli.main(["predict", "--model", str(model), str(bombs["grey-169mpx"])])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.splitlines() == [err] and err.startswith(f"error: {bombs['grey-169mpx']}: image has 169 megapixels")


def test_help_states_the_pixel_limit(capsys):
    with pytest.raises(SystemExit):
        cli.main(["predict", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert f"{images.MAX_PIXELS // 1_000_000} megapixels and {images.MAX_SIDE} pixels a side" in out


# --------------------------------------------------------------------------------------
# Only PNG and JPEG; no NaN


def _digit() -> np.ndarray:
    img = np.zeros((40, 30), np.float32)
    img[8:32, 13:18] = 255.0
    img[8:12, 8:18] = 255.0
    return img


@pytest.mark.parametrize("fmt,mode", [("TIFF", "F"), ("BMP", "L"), ("GIF", "L")])
def test_only_png_and_jpeg_are_opened(tmp_path, fmt, mode):
    img = _digit()
    if mode == "F":
        img[0, 0] = np.nan  # a 32-bit float TIFF with NaN, renamed .png
    Image.fromarray(img if mode == "F" else img.astype(np.uint8), mode).save(tmp_path / "x.bin", format=fmt)
    (tmp_path / "x.bin").rename(tmp_path / "x.png")
    with pytest.raises(images.ImageError, match="x.png: not a readable PNG/JPEG image"):
        images.load_grayscale(tmp_path / "x.png")


def test_cli_float_tiff_named_png_is_one_line(tmp_path, capsys):
    img = _digit()
    img[:5] = np.inf
    Image.fromarray(img, "F").save(tmp_path / "f.png", format="TIFF")
    code = cli.main(["predict", "--model", str(_fresh_model(tmp_path)), str(tmp_path / "f.png")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.splitlines() == [err] and "f.png: not a readable PNG/JPEG image" in err, err


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_to_mnist_refuses_non_finite_grey_levels(bad):
    img = _digit()
    img[3, 3] = bad
    with pytest.raises(images.ImageError, match=r"^d.png: image holds NaN or infinite grey levels$"):
        images.to_mnist(img, name="d.png")


def test_sixteen_bit_png_still_reads(tmp_path):
    Image.fromarray((_digit() * 257).astype(np.uint16)).save(tmp_path / "d16.png")
    np.testing.assert_array_equal(images.to_mnist(images.load_grayscale(tmp_path / "d16.png")),
                                  images.to_mnist(_digit()))


# --------------------------------------------------------------------------------------
# Transparency


def _rgba(rgb_fg: int, rgb_bg: int, alpha_fg: int, alpha_bg: int) -> Image.Image:
    digit = _digit() > 0
    rgba = np.zeros((*digit.shape, 4), np.uint8)
    rgba[..., :3] = np.where(digit[..., None], rgb_fg, rgb_bg)
    rgba[..., 3] = np.where(digit, alpha_fg, alpha_bg)
    return Image.fromarray(rgba, "RGBA")


@pytest.mark.parametrize("hidden_rgb", [0, 255])  # what the invisible background pixels hold
def test_white_digit_on_transparent_background_is_a_digit(tmp_path, hidden_rgb):
    _rgba(255, hidden_rgb, 255, 0).save(tmp_path / "w.png")
    expected = images.to_mnist(_digit())
    np.testing.assert_array_equal(images.to_mnist(images.load_grayscale(tmp_path / "w.png")), expected)


@pytest.mark.parametrize("hidden_rgb", [0, 255])
def test_black_digit_on_transparent_background_is_a_digit(tmp_path, hidden_rgb):
    _rgba(0, hidden_rgb, 255, 0).save(tmp_path / "b.png")
    gray = images.load_grayscale(tmp_path / "b.png")
    np.testing.assert_array_equal(gray, 255.0 - _digit())  # composited over white
    np.testing.assert_array_equal(images.to_mnist(gray), images.to_mnist(_digit()))


def test_white_digit_la_and_palette_with_transparency(tmp_path):
    digit = (_digit() > 0).astype(np.uint8) * 255
    Image.fromarray(np.stack([digit, digit], axis=-1), "LA").save(tmp_path / "la.png")
    pal = Image.fromarray((_digit() > 0).astype(np.uint8), "P")
    pal.putpalette([0, 0, 0, 255, 255, 255])
    pal.save(tmp_path / "p.png", transparency=0)  # palette index 0 (the background) transparent
    expected = images.to_mnist(_digit())
    for name in ("la.png", "p.png"):
        np.testing.assert_array_equal(images.to_mnist(images.load_grayscale(tmp_path / name)), expected, name)


def test_sheet_with_transparent_margins_keeps_its_background(tmp_path):
    """A white sheet (most of the image opaque) with a black digit and transparent corners,
    like a window screenshot: the margins take the sheet's white, not black blobs."""
    sheet = 255.0 - _digit()
    rgba = np.zeros((*sheet.shape, 4), np.uint8)
    rgba[..., :3] = sheet.astype(np.uint8)[..., None]
    rgba[..., 3] = 255
    rgba[:4, :4, 3] = rgba[-4:, -4:, 3] = 0
    rgba[:4, :4, :3] = rgba[-4:, -4:, :3] = 0  # hidden pixels black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "sheet.png")
    gray = images.load_grayscale(tmp_path / "sheet.png")
    np.testing.assert_array_equal(gray, sheet)


# --------------------------------------------------------------------------------------
# Every image is predicted or reported


def test_bad_images_are_reported_one_line_each_and_the_others_predicted(tmp_path, capsys):
    """A blank, an unreadable and a too-long image among good ones, a missing path and an empty
    directory: the good images are predicted (table, --json, --save-converted), each bad input
    gets one 'error:' line naming it, --json lists them, and the exit code is 2 at the end."""
    folder = tmp_path / "images"
    folder.mkdir()
    for name, shift in (("a.png", 0), ("c.png", 3), ("e.jpg", 6)):
        Image.fromarray(np.roll(_digit(), shift, axis=1).astype(np.uint8)).save(folder / name)
    Image.new("L", (50, 40), 255).save(folder / "b-blank.png")
    (folder / "d-text.png").write_text("not an image\n")
    zero_png(folder / "f-strip.png", images.MAX_SIDE + 1, 2)
    (tmp_path / "empty").mkdir()
    missing = tmp_path / "missing.png"
    model = _fresh_model(tmp_path)
    good = [str(folder / n) for n in ("a.png", "c.png", "e.jpg")]
    bad = [(str(folder / "b-blank.png"), "no digit found"), (str(folder / "d-text.png"), "not a readable PNG/JPEG"),
           (str(folder / "f-strip.png"), "pixels a side"), (str(missing), "no such file or directory"),
           (str(tmp_path / "empty"), "directory holds no .png/.jpg/.jpeg files")]
    argv = ["predict", "--model", str(model), str(folder), str(missing), str(tmp_path / "empty")]

    def errors(err: str) -> list[str]:
        return [line for line in err.splitlines() if not line.startswith("warning: ")]

    assert cli.main([*argv, "--save-converted", str(tmp_path / "seen")]) == 2
    captured = capsys.readouterr()
    assert [row.split()[0] for row in captured.out.splitlines()[1:]] == good
    lines = errors(captured.err)
    assert len(lines) == len(bad), lines
    for line, (path, reason) in zip(lines, bad):
        assert line.startswith(f"error: {path}: ") and reason in line, line
    assert sorted(p.name for p in (tmp_path / "seen").iterdir()) == ["0000-a.png", "0002-c.png", "0004-e.png"]

    assert cli.main([*argv, "--json"]) == 2
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert [r["path"] for r in report["predictions"]] == good
    assert [e["path"] for e in report["errors"]] == [path for path, _ in bad]
    assert [f"error: {e['error']}" for e in report["errors"]] == errors(captured.err)


def test_only_bad_images_print_no_table(tmp_path, capsys):
    Image.new("L", (50, 40), 255).save(tmp_path / "blank.png")
    assert cli.main(["predict", "--model", str(_fresh_model(tmp_path)), str(tmp_path / "blank.png")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith(f"error: {tmp_path / 'blank.png'}: no digit found")
