"""``mnistdist plot RUN_DIR``: the run's plots, drawn again (or for the first time).

The plots themselves are ``mnistdist.plots``, which training also calls when it finishes; this
command adds reading a run directory and, when ``metrics.jsonl`` has no confusion matrix,
evaluating the run's model for one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mnistdist import plots, rundir
from mnistdist.config import ConfigError


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
