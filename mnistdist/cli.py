"""Command lines: ``train_dist.py`` / ``mnistdist train``.

User errors (bad config, bad flags, unusable data) print one line and exit 2, before any
process group is started; bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

from mnistdist.config import ConfigError, load_config
from mnistdist.data import DataError
from mnistdist.distributed import launched_world_size, report_exception

EXIT_USAGE = 2
# configs/ next to the package in a source checkout (the supported way to install).
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors in one line (no usage block) with exit code 2."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def train_parser(prog: str = "train_dist.py") -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog,
        description="Train the MNIST MLP on 1..N processes (launch with `accelerate launch` for N > 1).",
        epilog="Overrides are section.key=value, e.g. train.lr=0.05 train.epochs=3 data.pipeline=torchvision.",
    )
    parser.add_argument("--config", type=Path, default=None,
                        help="YAML config (default: configs/default.yaml)")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="directory for config.yaml, metrics.jsonl, model.safetensors (default: runs/<time>-<id>)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides (win over the file)")
    return parser


def train_main(argv: list[str] | None = None, prog: str = "train_dist.py") -> int:
    """Parse, load the config, train, clean up. Returns the process exit code."""
    from mnistdist import training  # heavy imports after argument errors are handled

    args = train_parser(prog).parse_args(argv)
    config_path = args.config
    if config_path is None and DEFAULT_CONFIG.is_file():
        config_path = DEFAULT_CONFIG
    try:
        cfg = load_config(config_path, args.overrides, world_size=launched_world_size())
        training.run(cfg, args.run_dir)
    except (ConfigError, DataError) as e:
        report_exception(e)
        return EXIT_USAGE
    return 0


def evaluate_main(argv: list[str] | None = None, prog: str = "mnistdist evaluate") -> int:
    """Exact test loss/accuracy of a saved model, on 1 process or under ``accelerate launch``."""
    import json

    from mnistdist import training
    from mnistdist.distributed import is_main_process

    parser = _Parser(prog=prog, description="Evaluate saved weights on the 10,000 MNIST test images.")
    parser.add_argument("--model", type=Path, required=True, help="model.safetensors written by training")
    parser.add_argument("--config", type=Path, default=None,
                        help="config of the run (default: config.yaml next to the model, else defaults)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args(argv)
    config_path = args.config
    if config_path is None and (args.model.parent / "config.yaml").is_file():
        config_path = args.model.parent / "config.yaml"
    try:
        if not args.model.is_file():
            raise ConfigError(f"--model {args.model}: no such file")
        cfg = load_config(config_path, args.overrides)
        counts = training.evaluate_model_file(cfg, args.model)
    except (ConfigError, DataError) as e:
        report_exception(e)
        return EXIT_USAGE
    if is_main_process():
        result = {**counts.as_record(), "per_class_acc": counts.per_class_accuracy(),
                  "confusion": counts.confusion.tolist()}
        if args.json:
            print(json.dumps(result))
        else:
            print(f"test_loss {counts.mean_loss:.6f}  test_acc {100 * counts.accuracy:.2f}% "
                  f"({counts.correct}/{counts.total})")
            print("per-class accuracy: " + "  ".join(f"{c}:{100 * a:.1f}%" for c, a in enumerate(result["per_class_acc"])))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``mnistdist <command> ...``"""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "train": lambda rest: train_main(rest, prog="mnistdist train"),
        "evaluate": evaluate_main,
    }
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        stream = sys.stdout if argv and argv[0] in ("-h", "--help") else sys.stderr
        print(f"usage: mnistdist {{{','.join(commands)}}} ... (each takes --help)", file=stream)
        return 0 if stream is sys.stdout else EXIT_USAGE
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
