"""``mnistdist evaluate``: exact test loss, accuracy and confusion matrix of saved weights, on
one process or under ``accelerate launch`` (the evaluation itself is ``training.evaluate_model_file``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mnistdist.tools.saved_model import load_weights, model_and_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Evaluate saved weights on the 10,000 MNIST test images."
    parser.add_argument("--model", type=Path, required=True,
                        help="model.safetensors written by training, or a checkpoint directory holding one")
    parser.add_argument("--config", type=Path, default=None,
                        help="config of the run (default: config.yaml next to the model or up to 2 "
                             "directories above it, else the defaults)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")


def main(args: argparse.Namespace) -> int:
    """Evaluate, then print the result (main process only)."""
    from mnistdist import training
    from mnistdist.ranks import check_launch, is_main_process

    check_launch()
    model_file, cfg = model_and_config(args.model, args.config, args.overrides)
    load_weights(cfg, model_file)  # a bad file is one line here, before any process group
    counts = training.evaluate_model_file(cfg, model_file)
    if is_main_process():
        result = {**counts.as_record(), "per_class_acc": counts.per_class_accuracy(),
                  "confusion": counts.confusion.tolist()}
        if args.json:
            print(json.dumps(result))
        else:
            print(f"test_loss {counts.mean_loss:.6f}  test_acc {100 * counts.accuracy:.2f}% "
                  f"({counts.correct}/{counts.total})")
            print("per-class accuracy: " + "  ".join(f"{c}:{100 * a:.1f}%" for c, a in enumerate(result["per_class_acc"])))
            print(format_confusion(result["confusion"]))
    return 0


def format_confusion(confusion: list[list[int]]) -> str:
    """The confusion matrix as an aligned table (rows = true class, columns = predicted)."""
    width = max(4, *(len(str(v)) for row in confusion for v in row))
    lines = ["confusion matrix (rows: true class, columns: predicted class)",
             "true\\pred " + " ".join(f"{c:>{width}}" for c in range(len(confusion)))]
    for c, row in enumerate(confusion):
        lines.append(f"{c:>10} " + " ".join(f"{v:>{width}}" for v in row))
    return "\n".join(lines)
