"""Which process this is, from the launcher's environment (``RANK``, ``WORLD_SIZE``, ...), and
the one-line error report: all without torch, so that a bad config, flag or launch is reported
before torch is imported (~5 s of start-up a process that only says no does not need).
``mnistdist.distributed`` holds everything that talks to torch.distributed.
"""

from __future__ import annotations

import os
import sys
from time import sleep

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


SPEAKER_WAIT_S = 10.0
"""At most this long a rank that leaves its error to another rank waits for it (``report_exception``)."""


def report_exception(exc: BaseException, label: str = "error") -> None:
    """``label: message`` on stderr, prefixed with the rank when several run. An error every rank
    has alike (config, checkpoint) is said once, by rank 0, unprefixed; a stop the ranks agreed
    on, by rank 0; a data error once per node, by its local rank 0 (the data is on that node's
    disk).

    A rank that leaves its error to a rank of its own launcher does not exit before that rank:
    launchers stop every rank once one has exited, and would stop the one that says it before
    it has (it starts last on a busy machine). So it waits, and is stopped by its launcher once
    the other has exited; still running after ``SPEAKER_WAIT_S`` (the other did not fail), it
    says the error itself."""
    line = f"{label}: {exc}"
    rank, local_rank = os.environ.get("RANK", ""), os.environ.get("LOCAL_RANK", "")
    if not rank.isdigit() or launched_world_size() <= 1:
        _say(line)
        return
    me = int(rank)
    first = me - int(local_rank) if local_rank.isdigit() else None  # ranks of one launcher are numbered from it
    alike = isinstance(exc, (ConfigError, *imported_classes(("mnistdist.checkpoint", "CheckpointError"))))
    if alike or getattr(exc, "agreed", False):
        speaker = 0
    elif isinstance(exc, imported_classes(("mnistdist.data", "DataError"))) and first is not None:
        speaker = first
    else:
        speaker = me
    if speaker != me:
        if first is None or speaker < first:
            return  # the speaker runs under another launcher, which our exit does not stop
        try:
            sleep(SPEAKER_WAIT_S)
        except KeyboardInterrupt:  # Ctrl-C reached every rank: this one leaves quietly
            return
    _say(line if alike and me == 0 else f"[rank {me}] {line}")


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
