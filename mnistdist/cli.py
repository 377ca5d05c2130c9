"""Command lines: ``train_dist.py`` and ``mnistdist train|evaluate|predict|plot|sweep|compare``.

``train`` is defined here (``train_dist.py`` calls ``train_main``); every other command is a
module of ``mnistdist.tools`` with ``add_arguments(parser)`` and ``main(args) -> int``, imported
only when that command runs. Every command runs through ``run_command``, the one place where
user errors (bad config, flags, data, checkpoint or image) become one line and exit 2, and
stopped trainings become their exit codes; bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib
import os
import re
import select
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from mnistdist.config import (DEFAULT_CONFIG, Config, ConfigError, load_config, shipped_configs, to_yaml,
                              version_string)
from mnistdist.ranks import check_launch, imported_classes, is_main_process, launched_world_size, report_exception
from mnistdist.signals import EXIT_USAGE, Preempted, TrainingStopped

# torch, accelerate and what imports them (checkpoint, data, distributed, training) are imported
# by the commands that need them, once the config is valid, so that `sweep --list`, `compare`,
# `--help` and a bad config or flag start and end fast (docs/config.md).

EXIT_CLOSED_PIPE = 128 + 13  # 141: what a shell reports for a tool killed by SIGPIPE (``... | head``)

COMMANDS: dict[str, tuple[str | None, str]] = {
    # name: (the module holding its add_arguments/main (None: this one), one line of help)
    "train": (None, "train the MLP (same as train_dist.py)"),
    "evaluate": ("mnistdist.tools.evaluate", "exact test loss, accuracy and confusion matrix of saved weights"),
    "predict": ("mnistdist.tools.predict", "classify your own PNG/JPEG digit images with saved weights"),
    "plot": ("mnistdist.tools.plot", "loss, accuracy and confusion-matrix PNGs of a run directory"),
    "sweep": ("mnistdist.tools.sweep", "list or run the runs of a sweep file (here, or as a Slurm job array)"),
    "compare": ("mnistdist.tools.compare", "table and plot of finished runs: accuracy over seeds per variant"),
}

# Exceptions that mean bad input, by module: ``ranks.imported_classes`` looks them up lazily.
USER_ERRORS = (("mnistdist.config", "ConfigError"), ("mnistdist.data", "DataError"),
               ("mnistdist.checkpoint", "CheckpointError"), ("mnistdist.tools.images", "ImageError"))


def quiet_when_stdout_closes(command: Callable[[], int]) -> int:
    """``command()``, except that output into a pipe whose reader has gone (``mnistdist ... |
    head``) ends it quietly with ``EXIT_CLOSED_PIPE``, as a Unix tool killed by SIGPIPE ends,
    instead of a BrokenPipeError traceback. (SIGPIPE itself stays ignored, as Python sets it: a
    closed socket of gloo or W&B must stay an error, not kill the process.)"""
    try:
        try:
            code = command()
        except SystemExit:  # argparse's --help and usage errors: what they printed is still buffered
            sys.stdout.flush()
            raise
        sys.stdout.flush()  # block-buffered into a pipe: written now, where a closed pipe is caught
        return code
    except BrokenPipeError:
        if not _stdout_closed():
            raise
        # Python flushes stdout again at exit: let that go nowhere instead of failing once more.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_CLOSED_PIPE


def _stdout_closed() -> bool:
    """Whether stdout is a pipe or socket whose other end has gone (the BrokenPipeError was ours)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll() here, or stdout has no descriptor
        return True


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors in one line (no usage block) with exit code 2."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def run_command(parser: argparse.ArgumentParser, main: Callable[[argparse.Namespace], int], argv: list[str]) -> int:
    """Parse ``argv`` (overrides may come before or after the flags, and as
    ``--section.key=value``) and return ``main(args)``; bad input is reported in one line
    (exit 2), a stopped training becomes its exit code. The one error handler of every command."""
    try:
        return main(parser.parse_intermixed_args(undash_overrides(argv)))
    except Exception as e:
        if not isinstance(e, (TrainingStopped, *imported_classes(*USER_ERRORS))):  # those imported by now
            raise  # a bug: its traceback
        if isinstance(e, Preempted):  # every rank stopped at the same step: the main process says where
            # The checkpoint is written and the ranks leave together; a launcher that SIGTERMs the
            # rank still exiting (torchrun does, once another rank ended) must not turn it into -15.
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                signal.signal(sig, signal.SIG_IGN)
            if is_main_process():  # the message alone: a "label:" would repeat its first word
                several = "RANK" in os.environ and launched_world_size() > 1
                print(f"[rank 0] {e}" if several else e, file=sys.stderr, flush=True)
        else:  # said once, by one rank, when all have it (report_exception)
            report_exception(e)
        return e.exit_code if isinstance(e, TrainingStopped) else EXIT_USAGE


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


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``train`` command's arguments (``train_dist.py`` takes the same)."""
    parser.description = ("Train the MNIST MLP on 1..N processes: `python train_dist.py` for one; "
                          "`python -m mnistdist.launch` / `accelerate launch` / `torchrun` for N.")
    parser.epilog = ("Overrides are section.key=value after the flags (values are YAML), e.g.\n"
                     "  train.lr=0.05 train.epochs=3 dist.device=cpu\n"
                     "--section.key=value is the same (the form `wandb agent` uses).\n"
                     "Config sections and their keys:\n"
                     + "\n".join(f"  {name:<11} {', '.join(section.__dataclass_fields__)}"
                                 for name, section in Config().__dict__.items())
                     + "\nEvery key is documented in mnistdist/config.py; --print-config shows the resolved values.")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--config", type=Path, default=None,
                        help=f"YAML config file, or a shipped one by name: {', '.join(shipped_configs())} "
                             "(default: default)")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="directory for config.yaml, metrics.jsonl, model.safetensors (default: runs/<time>-<id>)")
    parser.add_argument("--resume", default="auto", metavar="auto|never|PATH",
                        help="auto: continue from the newest valid checkpoint in --run-dir (default; when it holds "
                             "checkpoints and none loads: an error naming them); never: start fresh (refused when "
                             "--run-dir holds a checkpoint that loads; ones that do not are kept aside as "
                             "checkpoints.old-N); PATH: a checkpoint directory")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume a checkpoint although keys that change training (lr, loss, epochs, seed, ...) "
                             "now have other values; the new values apply from the resumed step on")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (file + environment + overrides) as YAML and exit")
    parser.add_argument("--version", action="store_true", help="print the version (and git commit) and exit")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides, e.g. train.lr=0.05 (win over the environment and the file)")


def train(args: argparse.Namespace) -> int:
    """Load the config and train (or print the config, or the version)."""
    if args.version:
        print(version_string())
        return 0
    config_path = args.config
    if config_path is None and DEFAULT_CONFIG.is_file():
        config_path = DEFAULT_CONFIG
    if args.resume not in ("auto", "never") and not Path(args.resume).exists():
        raise ConfigError(f"--resume {args.resume}: no such checkpoint directory")
    check_launch()
    cfg = load_config(config_path, args.overrides, world_size=launched_world_size())
    if args.print_config:
        if is_main_process():
            print(to_yaml(cfg), end="")
        return 0
    from mnistdist import training  # torch: only for a config that is valid

    training.run(cfg, args.run_dir, resume=args.resume, allow_config_change=args.allow_config_change)
    return 0


def train_main(argv: list[str] | None = None, prog: str = "train_dist.py") -> int:
    """``train_dist.py``: parse, load the config, train, clean up. Returns the process exit code."""
    parser = _Parser(prog=prog)
    add_train_arguments(parser)
    return quiet_when_stdout_closes(lambda: run_command(parser, train, list(sys.argv[1:] if argv is None else argv)))


def main(argv: list[str] | None = None) -> int:
    """``mnistdist <command> ...``; returns the process exit code."""
    return quiet_when_stdout_closes(lambda: _main(list(sys.argv[1:] if argv is None else argv)))


def _main(argv: list[str]) -> int:
    if argv == ["--version"]:
        print(version_string())
        return 0
    parser = _Parser(prog="mnistdist", description="The MNIST MLP: train it, then evaluate, predict, plot, "
                                                   "sweep and compare (each command takes --help).")
    parser.add_argument("--version", action="store_true", help="print the version (and git commit) and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # Every command is listed in --help; only the one that runs gets its arguments (its module imported).
    parsers = {name: sub.add_parser(name, help=text, description=text) for name, (_, text) in COMMANDS.items()}
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # --help, or no/an unknown command: argparse's message and exit
        return EXIT_USAGE
    module = COMMANDS[argv[0]][0]
    command = importlib.import_module(module) if module else None  # imported now, when it runs
    (command.add_arguments if command else add_train_arguments)(parsers[argv[0]])
    return run_command(parsers[argv[0]], command.main if command else train, argv[1:])


def exit_process(code: int) -> NoReturn:
    """End this process with exit code ``code`` (``train_dist.py`` and ``mnistdist`` end here).

    One of several launched ranks leaves as multiprocessing's children do, without interpreter
    finalization: its work is complete by now (the process group destroyed, files and trackers
    closed), and finalization is where torch 2.14 can still abort a finished rank (SIGABRT: a
    C++ thread that holds Python objects takes the GIL from the dying interpreter;
    docs/reliability.md). The atexit handlers run and stdout/stderr are flushed first, as at
    any exit. One process alone exits as usual."""
    if launched_world_size() > 1:
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):  # a reader that has gone, a closed stream
                stream.flush()
        os._exit(code)
    sys.exit(code)


def console_main() -> NoReturn:
    """The ``mnistdist`` command (``python -m mnistdist.cli`` too): ``main()``, then ``exit_process``."""
    exit_process(main())


if __name__ == "__main__":
    console_main()
