"""The run directory: the one place that knows its layout.

    RUN_DIR/
        config.yaml          the resolved config of the run (as asked for: ``auto`` stays ``auto``)
        run.json             what actually ran, one entry per start: world size, hosts, device,
                             precision, threads, data (validation, repeated images), versions
        metrics.jsonl        one JSON object per line: training lines and evaluation lines
        metrics.jsonl.old-N  the history of an earlier start with no checkpoint that loads (kept aside)
        summary.json         final numbers, written when training finished
        model.safetensors    the final weights
        best.safetensors     the weights with the best validation accuracy so far (only with
                             data.validation_size > 0); its header names their step and epoch
        checkpoints/         step-XXXXXXXX/ directories (layout: mnistdist.checkpoint)
        checkpoints.old-N/   checkpoints none of which loads, kept aside by ``--resume never``
        plots/               loss.png, accuracy.png, confusion.png
        wandb/, wandb_run_id the W&B run (files of wandb) and its id, kept across resumes
        tensorboard/         TensorBoard event files (tensorboard.old-N/: an earlier start's, kept aside)
        .heartbeat/          per-rank liveness files of a multi-process run
        .lock                held (flock) by the job using the directory; names its holder (never a link)

Every reader and writer of these files goes through the paths below, and every reader of
metrics.jsonl through ``read_metrics``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import secrets
import socket
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from mnistdist.config import ConfigError
from mnistdist.signals import TrainingStopped

if TYPE_CHECKING:
    from mnistdist.distributed import Dist

CONFIG = "config.yaml"
SUMMARY = "summary.json"
MODEL = "model.safetensors"
CHECKPOINTS = "checkpoints"
LOCK = ".lock"


class RunDirLost(TrainingStopped):
    """The run directory was deleted or replaced, or its lock is no longer this job's, while the
    job ran: it stops without writing into it (exit 1)."""

    agreed = True


@dataclass(frozen=True)
class RunDir:
    """Paths inside one run directory (nothing is created by building one)."""

    root: Path
    held: tuple[tuple[int, int], IO[str]] | None = field(default=None, compare=False, repr=False)
    """(the directory's (st_dev, st_ino), the open lock file) on the main process of ``claim``."""

    config = property(lambda self: self.root / CONFIG)
    run_record = property(lambda self: self.root / "run.json")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    summary = property(lambda self: self.root / SUMMARY)
    model = property(lambda self: self.root / MODEL)
    best = property(lambda self: self.root / "best.safetensors")
    plots = property(lambda self: self.root / "plots")
    wandb_run_id = property(lambda self: self.root / "wandb_run_id")
    tensorboard = property(lambda self: self.root / "tensorboard")
    heartbeat = property(lambda self: self.root / ".heartbeat")
    lock = property(lambda self: self.root / LOCK)

    def check_held(self) -> None:
        """Raise ``RunDirLost`` when the directory or its lock file is no longer the one ``claim``
        took (deleted, perhaps made anew by another job): else the job would write where nobody
        looks, or its lock protects nothing, and end with exit 0. Unclaimed: nothing to check."""
        if self.held is None:
            return
        directory, lock_file = self.held
        try:
            now = os.stat(self.root)
        except OSError:
            raise RunDirLost(f"{self.root}: the run directory was deleted during the run; stopped without "
                             "writing anything more (what is left of the run is gone with it)") from None
        if (now.st_dev, now.st_ino) != directory:
            raise RunDirLost(f"{self.root}: the run directory was deleted and made anew during the run (another "
                             "job may be using it now); stopped without writing into it")
        ours = os.fstat(lock_file.fileno())
        with contextlib.suppress(OSError):
            lock = os.lstat(self.lock)
            if (lock.st_dev, lock.st_ino) == (ours.st_dev, ours.st_ino):
                return
        raise RunDirLost(f"{self.lock}: removed or replaced during the run, so this job no longer holds "
                         f"{self.root} (another job may be using it now); stopped without writing into it")


def _open_lock(path: Path) -> IO[str]:
    """``path`` (RUN_DIR/.lock) opened for reading and writing, created if missing, and never
    through a link: the holder line written into it must not overwrite a file outside the run
    directory that a symbolic or hard link named ``.lock`` leads to. A ConfigError naming it
    when it is a link or not a regular file."""
    remove = f"remove {path}, or choose another --run-dir"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666)
    except OSError as e:
        if os.path.islink(path):  # O_NOFOLLOW refused it (ELOOP on Linux, EMLINK on some BSDs)
            raise ConfigError(f"{path}: a symbolic link; a run directory's lock is never followed out of it: "
                              f"{remove}") from None
        if isinstance(e, IsADirectoryError):
            raise ConfigError(f"{path}: not a regular file; {remove}") from None
        raise
    info = os.fstat(fd)
    problem = ("not a regular file" if not stat.S_ISREG(info.st_mode) else "the file also has another name (a hard "
               "link: the holder line written into it would change that file too)" if info.st_nlink != 1 else None)
    if problem:
        os.close(fd)
        raise ConfigError(f"{path}: {problem}; {remove}")
    return os.fdopen(fd, "r+")


@contextlib.contextmanager
def claim(requested: str | Path | None, dist: Dist) -> Iterator[RunDir]:
    """The run directory, held by this job while the ``with`` lasts: ``requested``, or
    ``runs/<time>-<random>`` chosen on rank 0 (each rank would pick another). Created, probed
    for writing, and locked: an exclusive ``flock`` of ``RUN_DIR/.lock`` held by the main
    process, which the kernel drops however the process ends (SIGKILL too), so a second job
    given the same directory is refused at start, in one line naming the holder. Every rank
    gets the same outcome."""
    held: list[tuple[tuple[int, int], IO[str]]] = []

    def make() -> str:
        path = Path(requested) if requested is not None else Path(
            "runs", f"{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}")
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / f".write-test-{secrets.token_hex(4)}"
            probe.write_bytes(b"\0" * 65536)
            probe.unlink()
            lock_file = _open_lock(path / LOCK)
        except OSError as e:
            raise ConfigError(f"--run-dir {path}: cannot write there ({e.strerror or e})") from None
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = lock_file.read().strip() or "another process"
            lock_file.close()
            raise ConfigError(f"--run-dir {path}: in use by another job ({holder}); wait for it to end, "
                              "or choose another --run-dir") from None
        lock_file.truncate()
        lock_file.write(f"pid {os.getpid()} on {socket.gethostname()} since {datetime.now():%Y-%m-%d %H:%M:%S}\n")
        lock_file.flush()
        info = os.stat(path)  # the directory itself (a --run-dir that is a link: where it leads)
        held.append(((info.st_dev, info.st_ino), lock_file))
        return str(path)

    run = RunDir(Path(dist.on_main(make)), held=held[0] if held else None)
    try:
        yield run
    finally:
        if held:
            held[0][1].close()  # releases the lock


def start(run: RunDir, config_yaml: str, resumed_step: int | None) -> None:
    """Write the run's resolved config and make metrics.jsonl one history: after a resume, the
    records up to the checkpoint (``truncate_metrics``); on a fresh start (``resumed_step`` is
    None), a new file, with an earlier one kept aside (``set_aside``)."""
    write_text_atomic(run.config, config_yaml)
    if resumed_step is None:
        set_aside(run.metrics, "metrics")
    else:
        truncate_metrics(run, resumed_step)


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` durable: a rename (or a new file) in it survives a
    power loss only once the directory is fsynced."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (readers see the old file
    or the new one), durably: the file, then its directory are fsynced."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_summary(run: RunDir, summary: dict[str, Any]) -> None:
    write_text_atomic(run.summary, json.dumps(summary, indent=2) + "\n")


def read_summary(run: RunDir) -> dict[str, Any] | None:
    """summary.json, when it is one: a JSON object with an integer ``steps`` >= 0 and a
    ``final_test_acc`` in [0, 1]. None for anything else (missing, unreadable, not ours): the
    run is then not taken as finished, and finishing it writes the file anew."""
    try:
        summary = json.loads(run.summary.read_bytes())
        steps, acc = summary["steps"], summary["final_test_acc"]
    except (OSError, ValueError, RecursionError, TypeError, KeyError):
        return None
    ok = type(steps) is int and steps >= 0 and type(acc) in (int, float) and math.isfinite(acc) and 0 <= acc <= 1
    return summary if ok else None


def read_run_record(run_dir: str | Path) -> list[dict[str, Any]]:
    """The starts recorded in ``RUN_DIR/run.json``, oldest first; none when it is missing or
    unreadable."""
    try:
        record = json.loads(RunDir(Path(run_dir)).run_record.read_text())
    except (OSError, ValueError):
        return []
    starts = record.get("starts") if isinstance(record, dict) else None
    return [s for s in starts if isinstance(s, dict)] if isinstance(starts, list) else []


def record_start(run: RunDir, start: dict[str, Any]) -> None:
    """Add ``start`` (what this start of the run runs on; its ``start_step`` is the step it
    begins at, 0 when fresh) to run.json. Like metrics.jsonl, run.json describes one history:
    a fresh start begins a new one, and a resumed start drops the starts that began at or after
    its step, whose work it is about to redo."""
    step = start["start_step"]
    kept = [s for s in read_run_record(run.root) if isinstance(s.get("start_step"), int) and s["start_step"] < step]
    write_text_atomic(run.run_record, json.dumps({"starts": [*kept, start]}, indent=2) + "\n")


def _parse_metrics_lines(lines: list[str]) -> tuple[list[dict[str, Any]], int]:
    """(the lines that are JSON objects, the number of other non-blank lines)."""
    records, skipped = [], 0
    for line in filter(str.strip, lines):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            skipped += 1
    return records, skipped


def read_metrics(run_dir: str | Path, warn: bool = False) -> list[dict[str, Any]]:
    """The records of ``RUN_DIR/metrics.jsonl``, in order (none when it is missing). A line that
    is not a JSON object (a run killed while writing it) is skipped, said on stderr if ``warn``."""
    path = RunDir(Path(run_dir)).metrics
    try:
        records, skipped = _parse_metrics_lines(path.read_text(errors="replace").splitlines())
    except FileNotFoundError:
        return []
    if skipped and warn:
        print(f"warning: {path}: skipped {skipped} unreadable line(s)", file=sys.stderr, flush=True)
    return records


def truncate_metrics(run: RunDir, last_step: int) -> None:
    """Keep only records up to ``last_step`` (a run that died after its last checkpoint logged
    more), so a resumed run's metrics.jsonl reads like one uninterrupted run. A half-written last
    line (no newline: every record is written with its newline at once) is dropped even when it
    parses, and so is any line that is not a JSON object with an integer ``step``, with a
    warning. Rewritten atomically, ending with a newline."""
    path = run.metrics
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return
    lines = text.splitlines()
    half_written = bool(lines) and not text.endswith("\n")
    records, unreadable = _parse_metrics_lines(lines[:-1] if half_written else lines)
    with_step = [r for r in records if type(r.get("step")) is int]
    unreadable += len(records) - len(with_step)
    if half_written or unreadable:
        what = ["a half-written last line"] if half_written else []
        what += [f"{unreadable} unreadable line(s)"] if unreadable else []
        print(f"warning: {path}: dropped {' and '.join(what)} before resuming at step {last_step}",
              file=sys.stderr, flush=True)
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in with_step if r["step"] <= last_step))


def set_aside(path: Path, what: str) -> Path | None:
    """A fresh start in a run directory that holds ``path`` from an earlier start (a run killed
    before its first checkpoint, run again; or ``--resume never`` over checkpoints none of which
    loads): rename it to ``NAME.old-N`` (the first N free) and say so, so the new run writes a
    history of its own instead of adding to the old one (which would repeat steps). Returns the
    new name; None when there was nothing (empty) to keep."""
    try:
        if (not any(path.iterdir())) if path.is_dir() else path.stat().st_size == 0:
            return None
    except (FileNotFoundError, NotADirectoryError):
        return None
    n = 1
    while (aside := path.with_name(f"{path.name}.old-{n}")).exists():
        n += 1
    os.rename(path, aside)
    fsync_dir(path.parent)
    print(f"warning: {path} holds the {what} of an earlier start with no checkpoint that loads; "
          f"kept it as {aside.name}, starting anew", file=sys.stderr, flush=True)
    return aside
