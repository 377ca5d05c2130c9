"""The tools users reach for after training: ``mnistdist evaluate | predict | plot``.

One real model is trained once for the module (1 epoch, one process); the commands run as
subprocesses, the image conversion and plotting functions also in-process.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from mnistdist import cli, plots
from mnistdist.config import ConfigError
from mnistdist.rundir import read_metrics
from mnistdist.tools import images, predict
from mnistdist.tools.evaluate import format_confusion
from mnistdist.tools.saved_model import find_run_config, load_weights, resolve_model
from tests.conftest import check, data_root, run_cmd, train_cmd
from tests.synthetic_photos import mnist_coverage, photograph

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NUM_DIGITS = 20  # the first 20 MNIST test images


def mnistdist_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "mnistdist.cli", *args]


def assert_one_line_error(result, *needles: str) -> None:
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def test_set():
    import torchvision

    test = torchvision.datasets.MNIST(str(data_root()), train=False, download=False)
    return test.data.numpy(), test.targets.numpy()


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A real 1-epoch training run (default config)."""
    run_dir = tmp_path_factory.mktemp("tools") / "run"
    check(run_cmd(train_cmd("--run-dir", str(run_dir), "train.epochs=1"), timeout=600))
    assert (run_dir / "model.safetensors").is_file()
    return run_dir


@pytest.fixture(scope="module")
def last_eval(run) -> dict:
    return plots.split_records(read_metrics(run))[1][-1]


# --------------------------------------------------------------------------------------
# evaluate


def test_evaluate_directory_json_matches_training(run, last_eval):
    result = json.loads(check(run_cmd(mnistdist_cmd("evaluate", "--model", str(run), "--json"))).stdout)
    assert result["test_correct"] == last_eval["test_correct"]
    assert result["test_total"] == last_eval["test_total"] == 10000
    assert result["test_loss"] == pytest.approx(last_eval["test_loss"], rel=1e-6)
    confusion = np.array(result["confusion"])
    assert confusion.shape == (10, 10) and confusion.trace() == last_eval["test_correct"]


def test_evaluate_file_prints_table_and_confusion(run, last_eval):
    out = check(run_cmd(mnistdist_cmd("evaluate", "--model", str(run / "model.safetensors")))).stdout
    assert f"({last_eval['test_correct']}/10000)" in out
    loss = float(out.split("test_loss ")[1].split()[0])
    assert loss == pytest.approx(last_eval["test_loss"], abs=1e-6)
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("true\\pred"))
    rows = [[int(v) for v in line.split()] for line in lines[header + 1 : header + 11]]
    assert [r[0] for r in rows] == list(range(10))
    assert sum(r[1 + r[0]] for r in rows) == last_eval["test_correct"]


def test_model_and_config_lookup(tmp_path):
    step = tmp_path / "run" / "checkpoints" / "step-00000300"
    step.mkdir(parents=True)
    (step / "model.safetensors").write_bytes(b"")
    assert resolve_model(step) == step / "model.safetensors"
    assert find_run_config(step / "model.safetensors") is None
    (tmp_path / "run" / "config.yaml").write_text("{}\n")  # RUN_DIR: 2 levels above
    assert find_run_config(step / "model.safetensors") == (tmp_path / "run" / "config.yaml").absolute()
    (step / "config.yaml").write_text("{}\n")  # next to the model wins
    assert find_run_config(step / "model.safetensors") == (step / "config.yaml").absolute()
    (tmp_path / "config.yaml").write_text("{}\n")
    (tmp_path / "deep" / "a" / "b" / "c").mkdir(parents=True)  # 3 levels up is too far
    assert find_run_config(tmp_path / "deep" / "a" / "b" / "c" / "model.safetensors") is None
    with pytest.raises(ConfigError, match="directory holds no model.safetensors"):
        resolve_model(step.parent)
    with pytest.raises(ConfigError, match="no such file or directory"):
        resolve_model(tmp_path / "nope")


# --------------------------------------------------------------------------------------
# predict


def _own_predictions(run: Path, images_u8: np.ndarray) -> np.ndarray:
    """The model's predictions on the original test tensors (no image files involved)."""
    from mnistdist.config import load_config

    cfg = load_config(run / "config.yaml")
    model = load_weights(cfg, run / "model.safetensors")
    probs = predict.predict_probabilities(model, images_u8, cfg.data.normalize_mean, cfg.data.normalize_std)
    return probs.argmax(axis=1)


def test_predict_real_digits_as_png(run, test_set, tmp_path):
    test_images, labels = test_set[0][:NUM_DIGITS], test_set[1][:NUM_DIGITS]
    own = _own_predictions(run, test_images)
    for sub in ("white_on_black", "black_on_white", "upscaled"):
        (tmp_path / sub).mkdir()
    for i, (img, label) in enumerate(zip(test_images, labels)):
        name = f"{i:02d}_label{label}.png"
        Image.fromarray(img).save(tmp_path / "white_on_black" / name)
        Image.fromarray(255 - img).save(tmp_path / "black_on_white" / name)
        big = Image.fromarray(255 - img).resize((112, 112), Image.Resampling.BICUBIC)
        big.save(tmp_path / "upscaled" / name.replace(".png", ".jpeg"), quality=95)
    (tmp_path / "upscaled" / "notes.txt").write_text("not an image: directories expand to images only\n")

    dirs = [str(tmp_path / sub) for sub in ("white_on_black", "black_on_white", "upscaled")]
    out = json.loads(check(run_cmd(mnistdist_cmd("predict", "--model", str(run), "--json", "--top-k", "3", *dirs))).stdout)
    records = out["predictions"]
    assert len(records) == 3 * NUM_DIGITS
    for k, record in enumerate(records):
        i = k % NUM_DIGITS
        assert Path(record["path"]).name.startswith(f"{i:02d}_")  # sorted within each directory
        assert len(record["top_k"]) == 3 and record["top_k"][0]["class"] == record["predicted"]
        assert record["top_k"][0]["probability"] >= record["top_k"][1]["probability"] >= record["top_k"][2]["probability"]
        if own[i] == labels[i]:
            assert record["predicted"] == labels[i], f"{record['path']}: {record['top_k']}"
    assert sum(own == labels) >= NUM_DIGITS - 2  # the comparison is not vacuous

    # Forcing the polarity agrees with auto on black-on-white scans; the table lists every file.
    table = check(run_cmd(mnistdist_cmd("predict", "--model", str(run / "model.safetensors"), "--invert",
                                        dirs[1]))).stdout.splitlines()
    assert len(table) == 1 + NUM_DIGITS
    for line, record in zip(table[1:], records[NUM_DIGITS : 2 * NUM_DIGITS]):
        path, predicted = line.split()[:2]
        assert path == record["path"] and int(predicted) == record["predicted"]


PHOTO_STRENGTH = 0.5  # tests/synthetic_photos.py: 35% of the light lost across the sheet, glare, noise sigma 14
NUM_PHOTOS = 200


def test_predict_reads_photos_of_digits(run, test_set):
    """Photos of MNIST test digits on paper (or chalk on a board), unevenly lit, blurred and
    noisy. Measured with a 1-epoch model (benchmarks/predict_photo_accuracy.py): 95.5-98% at this
    strength over four seeds of 200 photos, 16.5% with the fixed threshold used before."""
    from mnistdist.config import load_config

    test_images, labels = test_set
    rng = np.random.default_rng(0)
    picks = rng.choice(len(test_images), NUM_PHOTOS, replace=False)
    conversions = [images.convert(photograph(mnist_coverage(test_images[i]), PHOTO_STRENGTH, rng,
                                              polarity=("black-on-white", "white-on-black")[k % 2]))
                   for k, i in enumerate(picks)]
    cfg = load_config(run / "config.yaml")
    model = load_weights(cfg, run / "model.safetensors")
    probs = predict.predict_probabilities(model, predict.stack_images(conversions),
                                          cfg.data.normalize_mean, cfg.data.normalize_std)
    accuracy = float((probs.argmax(axis=1) == labels[picks]).mean())
    doubted = sum(bool(c.warnings) for c in conversions)
    print(f"\nphotos at strength {PHOTO_STRENGTH}: accuracy {accuracy:.1%}, {doubted} with warnings")
    assert accuracy >= 0.90
    assert doubted <= NUM_PHOTOS // 50  # plausible digits are hardly ever doubted
    assert [c.polarity for c in conversions[:2]] == ["black-on-white", "white-on-black"]


# --------------------------------------------------------------------------------------
# plot


def _assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


def test_plot_command(run, tmp_path):
    out = tmp_path / "plots"
    result = check(run_cmd(mnistdist_cmd("plot", str(run), "--out", str(out))))
    written = [Path(line) for line in result.stdout.split()]
    assert sorted(p.name for p in written) == ["accuracy.png", "confusion.png", "loss.png"]
    for path in written:
        assert path.parent == out
        _assert_png(path)


def test_write_run_plots(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = [
        {"epoch": 1, "step": 50, "train_loss": 0.9, "lr": 0.1, "samples_per_s": 1000.0},
        {"epoch": 1, "step": 100, "train_loss": None, "lr": 0.1, "samples_per_s": 1000.0},  # NaN -> null
        {"epoch": 1, "step": 100, "test_loss": 0.3, "test_acc": 0.91, "test_correct": 9100, "test_total": 10000},
        {"epoch": 2, "step": 150, "train_loss": 0.2, "lr": 0.05, "samples_per_s": 1000.0},
        {"epoch": 2, "step": 200, "test_loss": 0.2, "test_acc": 0.95, "test_correct": 9500, "test_total": 10000},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"epoch": 3, "st')
    written = plots.write_run_plots(run)  # no confusion anywhere: that plot is skipped
    assert [p.name for p in written] == ["loss.png", "accuracy.png"]
    confusion = (np.eye(10, dtype=int) * 950 + 5).tolist()
    written = plots.write_run_plots(run, confusion)
    assert [p.name for p in written] == ["loss.png", "accuracy.png", "confusion.png"]
    for path in written:
        assert path.parent == run / "plots"
        _assert_png(path)
    # a confusion matrix in the last evaluation line is used when none is passed
    lines[-1]["confusion"] = confusion
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert [p.name for p in plots.write_run_plots(run, out_dir=tmp_path / "o")] == ["loss.png", "accuracy.png", "confusion.png"]
    with pytest.raises(ValueError, match="10x10"):
        plots.write_run_plots(run, [[1, 2], [3, 4]])


# --------------------------------------------------------------------------------------
# command lines: --help and one-line errors


@pytest.mark.parametrize("command", ["train", "evaluate", "predict", "plot"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_console_script_help():
    script = Path(sys.executable).parent / "mnistdist"
    if not script.exists():
        pytest.skip("console script not installed (pip install -e .)")
    out = check(run_cmd([str(script), "predict", "--help"])).stdout
    assert "--polarity" in out and "IMAGE_OR_DIR" in out


def test_bad_paths_are_one_line_errors(run, tmp_path):
    """In real processes: one line on stderr, exit 2, no traceback."""
    text_png = tmp_path / "x.png"
    text_png.write_text("this is not an image\n")
    cases = [
        (mnistdist_cmd("evaluate", "--model", str(tmp_path / "missing.safetensors")), "no such file"),
        (mnistdist_cmd("predict", "--model", str(run), str(tmp_path / "missing.png")), "missing.png: no such file"),
        (mnistdist_cmd("predict", "--model", str(run), str(text_png)), "x.png: not a readable"),
    ]
    for cmd, needle in cases:
        assert_one_line_error(run_cmd(cmd, timeout=120), needle)


def test_more_errors_in_process(run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    blank = tmp_path / "blank.png"
    Image.new("L", (50, 40), 255).save(blank)
    good = tmp_path / "good.png"
    Image.fromarray((np.eye(28) * 255).astype(np.uint8)).save(good)
    text_png = tmp_path / "x.png"
    text_png.write_text("this is not an image\n")
    for argv, needle in [
        (["predict", "--model", str(tmp_path / "missing"), str(good)], "no such file or directory"),
        (["predict", "--model", str(text_png), str(good)], "not mnistdist model weights"),
        (["evaluate", "--model", str(tmp_path)], "directory holds no model.safetensors"),
        (["predict", "--model", str(run), str(tmp_path / "empty")], "holds no .png/.jpg/.jpeg"),
        (["predict", "--model", str(run), str(blank)], "no digit found"),
        (["predict", "--model", str(run), "--top-k", "11", str(good)], "--top-k"),
        (["predict", "--model", str(run), "--invert", "--polarity", "white-on-black", str(good)], "contradicts"),
        (["plot", str(tmp_path / "no-run")], "no such directory"),
        (["plot", str(tmp_path)], "metrics.jsonl: no such file"),
    ]:
        try:
            code = cli.main(argv)
        except SystemExit as e:  # argparse-level errors
            code = e.code
        assert code == 2, argv
        captured = capsys.readouterr()
        err = captured.err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], (argv, err)
        assert captured.out == ""


# --------------------------------------------------------------------------------------
# the image conversion (pure)


SHIFTS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]


def _best_shift_mae(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference after the best shift by at most one pixel (centring rounds)."""
    a, b = a.astype(float), b.astype(float)
    return min(np.abs(np.roll(a, s, (0, 1)) - b).mean() for s in SHIFTS)


def _best_shift_corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(float), b.astype(float).ravel()
    return max(np.corrcoef(np.roll(a, s, (0, 1)).ravel(), b)[0, 1] for s in SHIFTS)


def _bbox(img: np.ndarray) -> tuple[int, int]:
    rows, cols = np.flatnonzero(img.any(axis=1)), np.flatnonzero(img.any(axis=0))
    return rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1


def test_mnist_round_trip_stays_close(test_set):
    for img in test_set[0][:100]:
        for polarity, given in (("auto", img), ("white-on-black", img), ("auto", 255 - img), ("black-on-white", 255 - img)):
            out = images.to_mnist(given, polarity)
            assert out.shape == (28, 28) and out.dtype == np.uint8
            assert _best_shift_mae(out, img) < 1.5
        big = np.asarray(Image.fromarray(img).resize((112, 112), Image.Resampling.BICUBIC), dtype=np.float32)
        out = images.to_mnist(big)
        assert _best_shift_mae(out, img) < 20  # resampling blurs; an empty image would be ~33 off
        assert _best_shift_corr(out, img) > 0.85


def test_conversion_fits_20x20_keeps_aspect_and_centres():
    img = np.full((300, 200), 230.0)  # grey paper
    img[40:200, 150:190] = 10.0  # a dark bar, 160 x 40, far from the centre
    out = images.to_mnist(img)  # auto: bright border -> black-on-white
    assert _bbox(out) == (20, 5)
    rows, cols = ndimage.center_of_mass(out.astype(np.float64))
    assert abs(rows - 14) <= 0.5 and abs(cols - 14) <= 0.5
    assert out.max() == 255 and out[0].max() == 0  # stretched, background black
    wide = np.zeros((30, 90))
    wide[10:20, 5:85] = 255
    assert _bbox(images.to_mnist(wide)) == (2, 20)
    small = np.zeros((28, 28))
    small[12:16, 12:14] = 255  # a tiny digit is scaled up to the 20x20 box too
    assert _bbox(images.to_mnist(small)) == (20, 10)


def test_polarity_detection_and_noise():
    digit = np.zeros((64, 64))
    digit[10:54, 28:36] = 200.0
    assert images.detect_polarity(digit) == "white-on-black"
    assert images.detect_polarity(255 - digit) == "black-on-white"
    expected = images.to_mnist(digit)
    np.testing.assert_array_equal(images.to_mnist(255 - digit), expected)
    np.testing.assert_array_equal(images.to_mnist(255 - digit, "black-on-white"), expected)
    noisy = digit + np.random.default_rng(0).uniform(0, 15, digit.shape)  # JPEG-like background noise
    assert _bbox(images.to_mnist(noisy)) == _bbox(expected)
    with pytest.raises(images.ImageError, match="no digit found"):
        images.to_mnist(np.full((30, 30), 128.0), name="flat.png")
    with pytest.raises(ValueError):
        images.to_mnist(digit, "sideways")


def test_load_grayscale_modes(tmp_path):
    rgba = Image.new("RGBA", (40, 40), (0, 0, 0, 0))  # transparent, with an opaque black stroke
    rgba.paste((0, 0, 0, 255), (18, 5, 22, 35))
    rgba.save(tmp_path / "stroke.png")
    gray = images.load_grayscale(tmp_path / "stroke.png")
    assert gray.shape == (40, 40) and gray[0, 0] == 255 and gray[20, 20] == 0  # over white
    Image.fromarray((np.arange(40 * 40).reshape(40, 40) * 40).astype(np.uint16)).save(tmp_path / "deep.png")
    assert images.load_grayscale(tmp_path / "deep.png").max() <= 255
    Image.new("RGB", (30, 20), (255, 0, 0)).save(tmp_path / "red.jpg")
    assert images.load_grayscale(tmp_path / "red.jpg").shape == (20, 30)
    (tmp_path / "x.png").write_text("text")
    with pytest.raises(images.ImageError, match="not a readable"):
        images.load_grayscale(tmp_path / "x.png")
    with pytest.raises(images.ImageError, match="no such file"):
        images.load_grayscale(tmp_path / "missing.png")


def test_expand_inputs_and_formatting(tmp_path):
    for name in ("b.PNG", "a.jpeg", "c.jpg", "d.txt", "e.gif"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    single = tmp_path / "d.txt"
    assert predict.expand_inputs([tmp_path, single]) == [tmp_path / n for n in ("a.jpeg", "b.PNG", "c.jpg")] + [single]
    assert predict.expand_inputs([tmp_path / "nope"]) == [
        predict.BadInput(str(tmp_path / "nope"), f"{tmp_path / 'nope'}: no such file or directory")]
    probs = np.full((2, 10), 0.05)
    probs[0, 7], probs[0, 1] = 0.5, 0.1
    probs[1, 3] = 0.55
    preds = predict.top_k(probs, ["one.png", "two.png"], 2)
    assert [(p.predicted, [c for c, _ in p.top_k]) for p in preds] == [(7, [7, 1]), (3, [3, 0])]
    table = predict.format_table(preds).splitlines()
    assert table[1].split()[:3] == ["one.png", "7", "50.0%"]
    assert format_confusion(np.eye(10, dtype=int).tolist()).count("\n") == 11
