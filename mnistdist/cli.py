"""Command lines: ``train_dist.py`` / ``mnistdist train|evaluate|predict|plot``.

User errors (bad config, bad flags, unusable data) print one line and exit 2, before any
process group is started; bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
from pathlib import Path
from typing import NoReturn

from mnistdist import rundir
from mnistdist.config import (DEFAULT_CONFIG, ConfigError, load_config, resolve_config_path, shipped_configs,
                              to_yaml, version_string)
from mnistdist.signals import Preempted, TrainingStopped

# torch, accelerate and what imports them (checkpoint, data, distributed) are imported by the
# commands that need them: `mnistdist sweep --list`, `compare` and `--help` start in well
# under a second instead of ~2.5 s (a Slurm array task calls `sweep --print-run-dir` first).


def report_exception(exc: BaseException, label: str = "error") -> None:
    """``label: message`` on stderr (see distributed.report_exception)."""
    from mnistdist import distributed

    distributed.report_exception(exc, label)


def is_main_process() -> bool:
    from mnistdist import distributed

    return distributed.is_main_process()

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors in one line (no usage block) with exit code 2."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _config_sections() -> str:
    """One line per config section, from the dataclasses' docstrings."""
    import dataclasses
    import typing

    from mnistdist.config import Config

    hints = typing.get_type_hints(Config)
    lines = []
    for f in dataclasses.fields(Config):
        keys = ", ".join(x.name for x in dataclasses.fields(hints[f.name]))
        lines.append(f"  {f.name:<11} {keys}")
    return "\n".join(lines)


def train_parser(prog: str = "train_dist.py") -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog,
        description="Train the MNIST MLP on 1..N processes: `python train_dist.py` for one; "
                    "`python -m mnistdist.launch` / `accelerate launch` / `torchrun` for N.",
        epilog="Overrides are section.key=value after the flags (values are YAML), e.g.\n"
               "  train.lr=0.05 train.epochs=3 dist.device=cpu\n"
               "--section.key=value is the same (the form `wandb agent` uses).\nConfig sections and their keys:\n" + _config_sections()
               + "\nEvery key is documented in mnistdist/config.py; --print-config shows the resolved values.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, default=None,
                        help=f"YAML config file, or a shipped one by name: {', '.join(shipped_configs())} "
                             "(default: default)")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="directory for config.yaml, metrics.jsonl, model.safetensors (default: runs/<time>-<id>)")
    parser.add_argument("--resume", default="auto", metavar="auto|never|PATH",
                        help="auto: continue from the newest valid checkpoint in --run-dir (default); "
                             "never: start fresh; PATH: a checkpoint directory")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume a checkpoint although keys that change training (lr, loss, epochs, seed, ...) "
                             "now have other values; the new values apply from the resumed step on")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (file + environment + overrides) as YAML and exit")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides, e.g. train.lr=0.05 (win over the environment and the file)")
    return parser


_DASHED_OVERRIDE = re.compile(r"--([A-Za-z_]\w*\.[A-Za-z_]\w*)(=.*)?", re.DOTALL)


def undash_overrides(argv: list[str]) -> list[str]:
    """``--train.lr=0.05`` -> ``train.lr=0.05``: the form ``wandb agent`` passes a sweep's
    parameters in (its ``${args}``). ``--train.lr 0.05`` (no ``=``) is refused: the value
    could not be told from the next argument."""
    out = []
    for arg in argv:
        match = _DASHED_OVERRIDE.fullmatch(arg)
        if match is None:
            out.append(arg)
        elif match.group(2) is None:
            raise ConfigError(f"{arg}: give a value with '=', e.g. {arg}=VALUE (or {arg[2:]}=VALUE)")
        else:
            out.append(arg[2:])
    return out


def train_main(argv: list[str] | None = None, prog: str = "train_dist.py") -> int:
    """Parse, load the config, train, clean up. Returns the process exit code."""
    from mnistdist import training  # heavy imports after argument errors are handled
    from mnistdist.checkpoint import CheckpointError
    from mnistdist.data import DataError
    from mnistdist.distributed import check_launch, launched_world_size

    try:
        argv = undash_overrides(list(sys.argv[1:] if argv is None else argv))
    except ConfigError as e:
        report_exception(e)
        return EXIT_USAGE
    args = train_parser(prog).parse_intermixed_args(argv)  # overrides may come before or after flags
    config_path = args.config
    if config_path is None and DEFAULT_CONFIG.is_file():
        config_path = DEFAULT_CONFIG
    if args.resume not in ("auto", "never") and not Path(args.resume).exists():
        report_exception(ConfigError(f"--resume {args.resume}: no such checkpoint directory"))
        return EXIT_USAGE
    try:
        check_launch()
        cfg = load_config(config_path, args.overrides, world_size=launched_world_size())
        if args.print_config:
            if is_main_process():
                print(to_yaml(cfg), end="")
            return 0
        training.run(cfg, args.run_dir, resume=args.resume, allow_config_change=args.allow_config_change)
    except (ConfigError, DataError, CheckpointError) as e:
        report_exception(e)
        return EXIT_USAGE
    except Preempted as e:  # every rank stopped at the same step: the main process says where
        # The checkpoint is written and the ranks leave together; a launcher that SIGTERMs the
        # rank still exiting (torchrun does, once another rank ended) must not turn it into -15.
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_IGN)
        if is_main_process():
            report_exception(e, label="stopped")
        return e.exit_code
    except TrainingStopped as e:
        report_exception(e)
        return e.exit_code
    return 0


MODEL_FILE = rundir.MODEL
CONFIG_FILE = rundir.CONFIG
CONFIG_SEARCH_LEVELS = 2  # RUN_DIR/checkpoints/step-XXXXXXXX/model.safetensors -> RUN_DIR/config.yaml


def resolve_model(path: Path) -> Path:
    """``--model`` as a file: the file itself, or ``model.safetensors`` in a (checkpoint) directory."""
    if path.is_dir():
        if not (path / MODEL_FILE).is_file():
            raise ConfigError(f"--model {path}: directory holds no {MODEL_FILE}")
        return path / MODEL_FILE
    if not path.is_file():
        raise ConfigError(f"--model {path}: no such file or directory")
    return path


def find_run_config(model_file: Path) -> Path | None:
    """config.yaml next to the model file, else in its parent directories up to 2 levels up."""
    directory = model_file.absolute().parent
    for _ in range(CONFIG_SEARCH_LEVELS + 1):
        if (directory / CONFIG_FILE).is_file():
            return directory / CONFIG_FILE
        directory = directory.parent
    return None


def load_weights(cfg, model_file: Path):
    """The MLP of ``cfg`` with the weights of ``model_file`` (on the CPU); ConfigError when the
    file is not a state dict of that model."""
    from mnistdist import checkpoint
    from mnistdist.training import build_model

    model = build_model(cfg)  # final ReLU and dtype as in training
    try:
        model.load_state_dict(checkpoint.load_model_state(model_file))
    except Exception as e:  # noqa: BLE001 - safetensors, OS and shape errors all mean "bad file"
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise ConfigError(f"--model {model_file}: not mnistdist model weights ({reason})") from None
    return model


def _model_and_config(model_arg: Path, config_arg: Path | None, overrides: list[str] | tuple[str, ...] = ()):
    """(the model file, the run's config): ``--config`` if given, else the one found near the model."""
    model_file = resolve_model(model_arg)
    config_path = config_arg if config_arg is not None else find_run_config(model_file)
    return model_file, load_config(config_path, overrides)


def format_confusion(confusion: list[list[int]]) -> str:
    """The confusion matrix as an aligned table (rows = true class, columns = predicted)."""
    width = max(4, *(len(str(v)) for row in confusion for v in row))
    lines = ["confusion matrix (rows: true class, columns: predicted class)",
             "true\\pred " + " ".join(f"{c:>{width}}" for c in range(len(confusion)))]
    for c, row in enumerate(confusion):
        lines.append(f"{c:>10} " + " ".join(f"{v:>{width}}" for v in row))
    return "\n".join(lines)


def evaluate_main(argv: list[str] | None = None, prog: str = "mnistdist evaluate") -> int:
    """Exact test loss/accuracy of a saved model, on 1 process or under ``accelerate launch``."""
    import json

    from mnistdist import training
    from mnistdist.data import DataError
    from mnistdist.distributed import check_launch

    parser = _Parser(prog=prog, description="Evaluate saved weights on the 10,000 MNIST test images.")
    parser.add_argument("--model", type=Path, required=True,
                        help="model.safetensors written by training, or a checkpoint directory holding one")
    parser.add_argument("--config", type=Path, default=None,
                        help="config of the run (default: config.yaml next to the model or up to 2 "
                             "directories above it, else the defaults)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args(argv)
    try:
        check_launch()
        model_file, cfg = _model_and_config(args.model, args.config, args.overrides)
        load_weights(cfg, model_file)  # a bad file is one line here, before any process group
        counts = training.evaluate_model_file(cfg, model_file)
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
            print(format_confusion(result["confusion"]))
    return 0


def predict_main(argv: list[str] | None = None, prog: str = "mnistdist predict") -> int:
    """Classify PNG/JPEG digit images with saved weights (one process, CPU)."""
    import json

    from mnistdist import predict
    from mnistdist.data import DataError

    parser = _Parser(
        prog=prog,
        description="Classify images of handwritten digits (PNG/JPEG, any size). Each image is converted "
                    "the way MNIST was made: grayscale, uneven lighting subtracted, the digit picked by Otsu's "
                    "threshold, its bounding box scaled into 20x20 keeping its aspect ratio, centred by centre "
                    "of mass in 28x28, white digit on black. An image whose digit looks implausible (filling "
                    "the image, tiny, lost in noise) or whose most probable class has under 50% gets one "
                    "'warning:' line on stderr, 'warnings' in --json and '!' in the table.",
    )
    parser.add_argument("--model", type=Path, required=True,
                        help="model.safetensors written by training, or a checkpoint directory holding one")
    parser.add_argument("--config", type=Path, default=None,
                        help="config of the run (default: config.yaml next to the model or up to 2 "
                             "directories above it, else the defaults)")
    parser.add_argument("--polarity", choices=predict.POLARITIES, default=None,
                        help="auto (default) decides from the border pixels; black-on-white inverts "
                             "(scans, paper); white-on-black is MNIST's own")
    parser.add_argument("--invert", action="store_true", help="same as --polarity black-on-white")
    parser.add_argument("--top-k", type=int, default=3, metavar="K", help="classes to show per image (1..10, default 3)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--save-converted", type=Path, default=None, metavar="DIR",
                        help="also write each converted 28x28 image (what the model sees) as DIR/<name>.png")
    parser.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR",
                        help="PNG/JPEG files, or directories (their *.png/*.jpg/*.jpeg files, sorted); "
                             f"at most {predict.MAX_PIXELS // 1_000_000} megapixels each (larger ones are "
                             "refused before decoding: scale them down)")
    args = parser.parse_args(argv)
    if args.invert and args.polarity not in (None, "black-on-white"):
        parser.error(f"--invert contradicts --polarity {args.polarity}")
    polarity = "black-on-white" if args.invert else (args.polarity or "auto")
    if not 1 <= args.top_k <= 10:
        parser.error(f"--top-k must be in 1..10; got {args.top_k}")
    try:
        model_file, cfg = _model_and_config(args.model, args.config)
        paths = predict.expand_inputs(args.images)
        conversions = predict.convert_files(paths, polarity)
        digits = predict.stack_images(conversions)
        model = load_weights(cfg, model_file)
        if args.save_converted is not None:
            _save_converted(args.save_converted, paths, digits)
    except (ConfigError, DataError, predict.ImageError) as e:
        report_exception(e)
        return EXIT_USAGE
    probabilities = predict.predict_probabilities(model, digits, cfg.data.normalize_mean, cfg.data.normalize_std)
    predictions = predict.top_k(probabilities, paths, args.top_k, [c.warnings for c in conversions])
    if args.json:
        print(json.dumps({"model": str(model_file), "polarity": polarity,
                          "predictions": [p.as_record() for p in predictions]}))
    else:
        print(predict.format_table(predictions))
    for line in predict.warning_lines(predictions):  # a doubtful digit or answer: one line per image
        print(line, file=sys.stderr)
    return 0


def _save_converted(out_dir: Path, paths: list[Path], digits) -> None:
    from PIL import Image

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for i, (path, digit) in enumerate(zip(paths, digits)):
            Image.fromarray(digit).save(out_dir / f"{i:04d}-{path.stem}.png")
    except OSError as e:
        raise ConfigError(f"--save-converted {out_dir}: cannot write ({e.strerror or e})") from None


def plot_main(argv: list[str] | None = None, prog: str = "mnistdist plot") -> int:
    """PNG plots of a run directory: loss and accuracy curves, confusion matrix."""
    from mnistdist import plots

    parser = _Parser(prog=prog, description="Plot a run: loss.png, accuracy.png and confusion.png "
                                            "(into RUN_DIR/plots/ unless --out).")
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory (holds metrics.jsonl)")
    parser.add_argument("--out", type=Path, default=None, help="directory for the PNG files (default: RUN_DIR/plots)")
    parser.add_argument("--no-evaluate", action="store_true",
                        help="when metrics.jsonl has no confusion matrix, skip confusion.png instead of "
                             "evaluating RUN_DIR/model.safetensors")
    args = parser.parse_args(argv)
    metrics_file = rundir.RunDir(args.run_dir).metrics
    try:
        if not args.run_dir.is_dir():
            raise ConfigError(f"{args.run_dir}: no such directory")
        if not metrics_file.is_file():
            raise ConfigError(f"{metrics_file}: no such file (not a run directory?)")
        train, evals = plots.split_records(rundir.read_metrics(args.run_dir, warn=True))
        if not train and not evals:
            raise ConfigError(f"{metrics_file}: no training or evaluation lines to plot")
        confusion = plots.last_confusion(evals)
        if confusion is None:
            confusion = _confusion_by_evaluating(args.run_dir, args.no_evaluate)
        written = plots.write_run_plots(args.run_dir, confusion, out_dir=args.out)
    except ConfigError as e:
        report_exception(e)
        return EXIT_USAGE
    except OSError as e:
        report_exception(ConfigError(f"cannot write plots: {e.strerror or e} ({e.filename or args.out})"))
        return EXIT_USAGE
    for path in written:
        print(path)
    return 0


def _confusion_by_evaluating(run_dir: Path, skip: bool) -> list[list[int]] | None:
    """The test confusion matrix of RUN_DIR/model.safetensors, or None (with a note) when it
    cannot be had."""
    from mnistdist import training
    from mnistdist.data import DataError

    model_file = run_dir / MODEL_FILE
    reason = None
    if skip:
        reason = "--no-evaluate"
    elif not model_file.is_file():
        reason = f"{model_file} does not exist"
    else:
        try:
            _, cfg = _model_and_config(model_file, None)
            load_weights(cfg, model_file)
            print(f"metrics.jsonl has no confusion matrix; evaluating {model_file}", file=sys.stderr)
            return training.evaluate_model_file(cfg, model_file).confusion.tolist()
        except (ConfigError, DataError) as e:
            reason = f"evaluating {model_file} failed: {' '.join(str(e).split())[:300]}"
    print(f"note: no confusion matrix in metrics.jsonl and {reason}; skipping confusion.png", file=sys.stderr)
    return None


def sweep_main(argv: list[str] | None = None, prog: str = "mnistdist sweep") -> int:
    """List, run one element of, or run all of a sweep file (see mnistdist/sweep.py)."""
    from mnistdist import sweep

    parser = _Parser(prog=prog, description="Run a sweep: a YAML file that expands to many runs (variants x grid "
                                            "x seeds; format in mnistdist/sweep.py and docs/sweeps.md).")
    parser.add_argument("file", type=Path, metavar="SWEEP_FILE", help="e.g. configs/sweeps/lessons.yaml")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="the sweep directory, one run directory per run (default: runs/sweeps/<name>)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--list", action="store_true", help="print the runs, their status and how to submit them")
    what.add_argument("--run", type=int, metavar="INDEX",
                      help="train run INDEX (what a Slurm array task calls; works under a launcher); "
                           "a finished run is skipped, an interrupted one resumes")
    what.add_argument("--local", action="store_true",
                      help="train every run here, one after another, skipping finished ones and resuming "
                           "interrupted ones")
    what.add_argument("--print-run-dir", type=int, metavar="INDEX", help="print the run directory of run INDEX")
    parser.add_argument("--processes", type=int, default=1, metavar="N",
                        help="with --local: processes per run (python -m mnistdist.launch; default 1)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="with --run/--local: overrides for every run, after the sweep's own "
                             "(for how it runs here, e.g. dist.device=cpu; they do not change run names)")
    args = parser.parse_intermixed_args(argv)
    if args.processes < 1:
        parser.error(f"--processes must be >= 1; got {args.processes}")
    try:
        loaded = sweep.load_sweep(resolve_config_path(args.file, "sweep file", under="sweeps"), args.out,
                                  args.overrides)
        if args.list:
            print(sweep.describe(loaded))
            return 0
        if args.print_run_dir is not None:
            print(loaded.element(args.print_run_dir).run_dir)
            return 0
        if args.local:
            return sweep.run_local(loaded, args.processes, args.overrides)
        element = loaded.element(args.run)
    except ConfigError as e:
        report_exception(e)
        return EXIT_USAGE
    if element.finished:  # checked by every rank before any process group: all skip together
        if is_main_process():
            print(f"sweep {loaded.name}: run {element.index} ({element.name}) finished before "
                  f"({element.run_dir / rundir.SUMMARY}); skipped", flush=True)
        return 0
    if is_main_process():
        sweep.write_manifest(loaded)
    return train_main(element.train_args(), prog=f"{prog} --run {element.index}")


def compare_main(argv: list[str] | None = None, prog: str = "mnistdist compare") -> int:
    """Table (and CSV, JSON, PNG) of finished runs, grouped by what varies apart from the seed."""
    import json

    from mnistdist import compare

    parser = _Parser(prog=prog, description="Compare finished runs: final and best test accuracy (mean ± std over "
                                            "seeds, and range), train time and steps, grouped by what varies "
                                            "apart from the seed.")
    parser.add_argument("dirs", type=Path, nargs="+", metavar="DIR",
                        help="sweep directories, run directories, or directories of run directories")
    parser.add_argument("--csv", type=Path, default=None, metavar="PATH", help="also write the table as CSV")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--plot", type=Path, default=None, metavar="PATH",
                        help="the PNG plot (default: compare.png in the first DIR)")
    parser.add_argument("--no-plot", action="store_true", help="write no plot")
    args = parser.parse_args(argv)
    try:
        runs, notes = compare.collect(args.dirs)
        groups = compare.group(runs)
        written = []
        if args.csv is not None:
            rundir.write_text_atomic(args.csv, compare.to_csv(groups))
            written.append(args.csv)
        if not args.no_plot:
            written.append(compare.plot(groups, args.plot or args.dirs[0] / "compare.png"))
    except ConfigError as e:
        report_exception(e)
        return EXIT_USAGE
    except OSError as e:
        report_exception(ConfigError(f"cannot write {e.filename or 'output'}: {e.strerror or e}"))
        return EXIT_USAGE
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if args.json:
        print(json.dumps({"groups": [g.as_record() for g in groups], "left_out": notes}))
    else:
        print(compare.format_table(groups))
        for path in written:
            print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``mnistdist <command> ...``"""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--version"]:
        print(version_string())
        return 0
    commands = {  # name: (entry point, what it does)
        "train": (lambda rest: train_main(rest, prog="mnistdist train"), "train the MLP (same as train_dist.py)"),
        "evaluate": (evaluate_main, "exact test loss, accuracy and confusion matrix of saved weights"),
        "predict": (predict_main, "classify your own PNG/JPEG digit images with saved weights"),
        "plot": (plot_main, "loss, accuracy and confusion-matrix PNGs of a run directory"),
        "sweep": (sweep_main, "list or run the runs of a sweep file (here, or as a Slurm job array)"),
        "compare": (compare_main, "table and plot of finished runs: accuracy over seeds per variant"),
    }
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        asked = bool(argv) and argv[0] in ("-h", "--help")
        stream = sys.stdout if asked else sys.stderr
        if argv and not asked:
            print(f"error: unknown command {argv[0]!r}", file=stream)
        print(f"usage: mnistdist {{{','.join(commands)}}} ... (each takes --help) | --version", file=stream)
        for name, (_, what) in commands.items():
            print(f"  {name:<9} {what}", file=stream)
        return 0 if asked else EXIT_USAGE
    return commands[argv[0]][0](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
