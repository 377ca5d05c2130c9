"""Which process this is, from the launcher's environment (``RANK``, ``WORLD_SIZE``, ...), and
the one-line error report: all without torch, so that a bad config, flag or launch is reported
before torch is imported (~5 s of start-up a process that only says no does not need).
``mnistdist.distributed`` holds everything that talks to torch.distributed.
"""

from __future__ import annotations

import os
import sys

from mnistdist.config import ConfigError


def launched_world_size() -> int:
    """The number of processes the launcher started (``WORLD_SIZE``; 1 without a launcher),
    known before any process group exists."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def check_launch() -> None:
    """A ConfigError when a launcher started one process although more were asked for:
    ``accelerate launch --num_processes N`` without ``--multi_gpu`` does on a machine without
    GPUs (accelerate issue 2741). Its trace: accelerate's variables and MASTER_PORT (set for
    N > 1), but no WORLD_SIZE, which every multi-process launcher sets."""
    env = os.environ
    if "ACCELERATE_MIXED_PRECISION" in env and "MASTER_PORT" in env and "WORLD_SIZE" not in env:
        raise ConfigError(
            "accelerate launch started 1 process although more were asked for (without --multi_gpu it "
            "runs one on a machine without GPUs); use: accelerate launch --config_file "
            "configs/accelerate/cpu.yaml --num_processes N train_dist.py (CPU), or --multi_gpu (GPUs)")


def is_main_process() -> bool:
    """Rank 0 (or no launcher): for output before the process group exists or after it is gone."""
    return os.environ.get("RANK", "0") == "0"


def warn_main(message: str) -> None:
    """A warning on stderr from the main process only."""
    if is_main_process():
        print(f"warning: {message}", file=sys.stderr, flush=True)


def imported_classes(*names: tuple[str, str]) -> tuple[type, ...]:
    """The classes ``(module, name)`` of ``names`` whose modules are imported: no instance of
    another can exist yet, and looking them up so imports nothing (``mnistdist.checkpoint`` and
    ``mnistdist.data`` import torch)."""
    return tuple(getattr(sys.modules[module], name) for module, name in names if module in sys.modules)


def report_exception(exc: BaseException, label: str = "error") -> None:
    """``label: message`` on stderr, prefixed with the rank when several run. An error every rank
    has alike (config, checkpoint) is said once, by rank 0, unprefixed; a data error once per
    node, by its local rank 0 (the data is on that node's disk)."""
    rank = os.environ.get("RANK")
    several = rank is not None and launched_world_size() > 1
    if several and isinstance(exc, (ConfigError, *imported_classes(("mnistdist.checkpoint", "CheckpointError")))):
        if rank != "0":
            return
        several = False
    if several and isinstance(exc, imported_classes(("mnistdist.data", "DataError"))) and \
            os.environ.get("LOCAL_RANK", "0") != "0":
        return
    print(f"[rank {rank}] {label}: {exc}" if several else f"{label}: {exc}", file=sys.stderr, flush=True)
