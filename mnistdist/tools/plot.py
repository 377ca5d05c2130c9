"""``mnistdist plot RUN_DIR``: the run's plots, drawn again (or for the first time).

The plots themselves are ``mnistdist.plots``, which training also calls when it finishes; this
command adds reading a run directory and, when ``metrics.jsonl`` has no confusion matrix,
evaluating the run's model for one.
"""

from __future__ import annotations

import argparse
import math
import reprlib
import sys
from pathlib import Path
from typing import Any

from mnistdist import plots, rundir
from mnistdist.config import ConfigError

PLOTTED_KEYS = ("step", "epoch", "train_loss", "test_loss", "test_acc")
"""The values of a metrics.jsonl record that become points of a plot."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Plot a run: loss.png, accuracy.png and confusion.png (into RUN_DIR/plots/ unless --out)."
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory (holds metrics.jsonl)")
    parser.add_argument("--out", type=Path, default=None, help="directory for the PNG files (default: RUN_DIR/plots)")
    parser.add_argument("--no-evaluate", action="store_true",
                        help="when metrics.jsonl has no confusion matrix, skip confusion.png instead of "
                             "evaluating RUN_DIR/model.safetensors")


def main(args: argparse.Namespace) -> int:
    """Write the plots and print their paths."""
    metrics_file = rundir.RunDir(args.run_dir).metrics
    if not args.run_dir.is_dir():
        raise ConfigError(f"{args.run_dir}: no such directory")
    if not metrics_file.is_file():
        raise ConfigError(f"{metrics_file}: no such file (not a run directory?)")
    train, evals = plots.split_records(rundir.read_metrics(args.run_dir, warn=True))
    if not train and not evals:
        raise ConfigError(f"{metrics_file}: no training or evaluation lines to plot")
    check_records(metrics_file, train, evals)
    confusion = plots.last_confusion(evals)
    if confusion is None:
        confusion = confusion_by_evaluating(args.run_dir, args.no_evaluate)
    try:
        written = plots.write_run_plots(args.run_dir, confusion, out_dir=args.out)
    except OSError as e:
        raise ConfigError(f"cannot write plots: {e.strerror or e} ({e.filename or args.out})") from None
    for path in written:
        print(path)
    return 0


def _is_number(value: Any) -> bool:
    """A finite int or float (not a bool; not an int beyond float's range)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _is_counts(value: Any) -> bool:
    """A confusion matrix: NUM_CLASSES rows of NUM_CLASSES whole numbers >= 0."""
    from mnistdist.model import NUM_CLASSES

    return (isinstance(value, list) and len(value) == NUM_CLASSES
            and all(isinstance(row, list) and len(row) == NUM_CLASSES for row in value)
            and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for row in value for c in row))


def check_records(path: Path, train: list[dict], evals: list[dict]) -> None:
    """Refuse values training never writes (it writes NaN and Inf as null): a ConfigError
    naming the file, the record's step and the key, instead of matplotlib failing on them."""
    for record in [*train, *evals]:
        where = f"{path}: the record of step {reprlib.repr(record['step'])}"
        for key in PLOTTED_KEYS:
            value = record.get(key)
            if key in record and not (_is_number(value) or (value is None and key != "step")):
                allowed = "a finite number" if key == "step" else "a finite number (or null)"
                raise ConfigError(f"{where}: {key}: must be {allowed}; got {reprlib.repr(value)}")
    if evals and evals[-1].get("confusion") is not None and not _is_counts(evals[-1]["confusion"]):
        raise ConfigError(f"{path}: the record of step {reprlib.repr(evals[-1]['step'])}: confusion: must be "
                          "10x10 counts (whole numbers >= 0)")


def confusion_by_evaluating(run_dir: Path, skip: bool) -> list[list[int]] | None:
    """The test confusion matrix of RUN_DIR/model.safetensors, or None (with a note) when it
    cannot be had."""
    from mnistdist import training
    from mnistdist.data import DataError
    from mnistdist.tools.saved_model import load_weights, model_and_config

    model_file = run_dir / rundir.MODEL
    reason = None
    if skip:
        reason = "--no-evaluate"
    elif not model_file.is_file():
        reason = f"{model_file} does not exist"
    else:
        try:
            _, cfg = model_and_config(model_file, None)
            load_weights(cfg, model_file)
            print(f"metrics.jsonl has no confusion matrix; evaluating {model_file}", file=sys.stderr)
            return training.evaluate_model_file(cfg, model_file).confusion.tolist()
        except (ConfigError, DataError) as e:
            reason = f"evaluating {model_file} failed: {' '.join(str(e).split())[:300]}"
    print(f"note: no confusion matrix in metrics.jsonl and {reason}; skipping confusion.png", file=sys.stderr)
    return None
