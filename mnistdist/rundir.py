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
import errno
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
RUN_RECORD = "run.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
MODEL = "model.safetensors"
BEST = "best.safetensors"
CHECKPOINTS = "checkpoints"
PLOTS = "plots"
WANDB_RUN_ID = "wandb_run_id"
HEARTBEAT = ".heartbeat"
LOCK = ".lock"


@dataclass(frozen=True)
class RunDir:
    """Paths inside one run directory (nothing is created by building one)."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def run_record(self) -> Path:
        return self.root / RUN_RECORD

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    @property
    def summary(self) -> Path:
        return self.root / SUMMARY

    @property
    def model(self) -> Path:
        return self.root / MODEL

    @property
    def best(self) -> Path:
        return self.root / BEST

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def plots(self) -> Path:
        return self.root / PLOTS

    @property
    def wandb_run_id(self) -> Path:
        return self.root / WANDB_RUN_ID

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def heartbeat(self) -> Path:
        return self.root / HEARTBEAT

    @property
    def lock(self) -> Path:
        return self.root / LOCK

    def check_held(self) -> None:
        """Raise ``RunDirLost`` when the directory is no longer the one this process holds (see
        ``HeldRunDir``); a directory this process did not claim holds nothing to check."""


class RunDirLost(TrainingStopped):
    """The run directory was deleted or replaced, or its lock is no longer this job's, while the
    job ran: it stops without writing into it (exit 1)."""

    agreed = True


@dataclass(frozen=True)
class HeldRunDir(RunDir):
    """The run directory that ``claim`` holds for this job. On the main process it remembers the
    identity (device, inode) of the directory and of the lock file it holds, so that
    ``check_held`` notices a directory deleted (and perhaps made anew, by hand or by another job)
    during the run: without that, the job would go on writing into a directory nobody sees, or
    into one its lock no longer protects, and end with exit 0."""

    held: tuple[tuple[int, int], IO[str]] | None = field(default=None, compare=False, repr=False)
    """(the directory's (st_dev, st_ino), the open lock file); None off the main process."""

    def check_held(self) -> None:
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
                             "job may be using it now); stopped without writing into it") from None
        ours = os.fstat(lock_file.fileno())
        try:
            lock = os.lstat(self.lock)
        except OSError:
            lock = None
        if lock is None or (lock.st_dev, lock.st_ino) != (ours.st_dev, ours.st_ino):
            raise RunDirLost(f"{self.lock}: removed or replaced during the run, so this job no longer holds "
                             f"{self.root} (another job may be using it now); stopped without writing into it")


def _open_lock(path: Path) -> IO[str]:
    """``path`` (RUN_DIR/.lock) opened for reading and writing, created if missing, and never
    through a link: the holder line written into it must not truncate and overwrite a file
    outside the run directory that a symbolic or hard link named ``.lock`` leads to. A
    ConfigError naming it when it is a link or not a regular file."""
    fd = None
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666)
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{path}: not a regular file; remove it, or choose another --run-dir")
        if info.st_nlink != 1:
            raise ConfigError(f"{path}: the file also has another name (a hard link: the holder line written "
                              f"into it would change that file too); remove {path}, or choose another --run-dir")
        lock_file = os.fdopen(fd, "r+")
        fd = None
        return lock_file
    except OSError as e:
        if os.path.islink(path):  # O_NOFOLLOW refused it (ELOOP on Linux, EMLINK on some BSDs)
            raise ConfigError(f"{path}: a symbolic link; a run directory's lock is never followed out of it: "
                              f"remove {path}, or choose another --run-dir") from None
        if e.errno == errno.EISDIR:
            raise ConfigError(f"{path}: not a regular file; remove it, or choose another --run-dir") from None
        raise
    finally:
        if fd is not None:
            os.close(fd)


@contextlib.contextmanager
def claim(requested: str | Path | None, dist: Dist) -> Iterator[HeldRunDir]:
    """The run directory, held by this job while the ``with`` lasts.

    ``requested``, or ``runs/<time>-<random>`` chosen on rank 0 (clocks and random state differ
    between processes, so each rank must not pick its own). Created and probed for writing now,
    and locked (an exclusive ``flock`` of ``RUN_DIR/.lock`` held by the main process): a second
    job given the same directory is refused at start with one line naming the holder, instead
    of both jobs writing checkpoints into it. The kernel drops the lock when the process ends,
    however it ends (SIGKILL too). A ``.lock`` that is a link is refused (``_open_lock``). Every
    rank gets the same outcome.
    """
    lock_file: IO[str] | None = None
    directory: tuple[int, int] | None = None

    def make() -> str:
        nonlocal lock_file, directory
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
            lock_file.seek(0)
            holder = lock_file.read().strip() or "another process"
            lock_file.close()
            raise ConfigError(f"--run-dir {path}: in use by another job ({holder}); wait for it to end, "
                              "or choose another --run-dir") from None
        lock_file.seek(0)
        lock_file.truncate()
        lock_file.write(f"pid {os.getpid()} on {socket.gethostname()} since {datetime.now():%Y-%m-%d %H:%M:%S}\n")
        lock_file.flush()
        info = os.stat(path)  # the directory itself (a --run-dir that is a link: where it leads)
        directory = (info.st_dev, info.st_ino)
        return str(path)

    root = Path(dist.on_main(make))
    run = HeldRunDir(root, held=(directory, lock_file) if lock_file is not None and directory is not None else None)
    try:
        yield run
    finally:
        if lock_file is not None:
            lock_file.close()  # releases the lock


def start(run: RunDir, config_yaml: str, resumed_step: int | None) -> None:
    """Write the run's resolved config and make metrics.jsonl one history: after a resume, the
    records up to the checkpoint (``truncate_metrics``); on a fresh start (``resumed_step`` is
    None), a new file, with an earlier one kept aside (``set_metrics_aside``)."""
    write_text_atomic(run.config, config_yaml)
    if resumed_step is None:
        set_metrics_aside(run)
    else:
        truncate_metrics(run, resumed_step)


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` durable: after a rename (or a new file or
    directory) in it, the rename survives a power loss only once its directory is fsynced."""
    if os.name == "nt":  # a directory cannot be opened there; NTFS journals its metadata itself
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: readers see the old
    file or the new one, never half of one. Durable on return: the file and then its directory
    (the rename) are fsynced."""
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


def _is_fraction(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 <= value <= 1


def read_summary(run: RunDir) -> dict[str, Any] | None:
    """summary.json, when it is one: a JSON object with an integer ``steps`` >= 0 and a
    ``final_test_acc`` in [0, 1]. None for anything else (missing, unreadable, not ours): the
    run is then not taken as finished, and finishing it writes the file anew."""
    try:
        summary = json.loads(run.summary.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(summary, dict):
        return None
    steps = summary.get("steps")
    if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 0
            and _is_fraction(summary.get("final_test_acc"))):
        return None
    return summary
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
    for line in lines:
        if not line.strip():
            continue
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
    """The records of ``RUN_DIR/metrics.jsonl``, in order.

    Tolerant: a line that is not a JSON object (a run killed while writing its last line) is
    skipped, with a note on stderr when ``warn``. A missing file reads as no records.
    """
    path = RunDir(Path(run_dir)).metrics
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []
    records, skipped = _parse_metrics_lines(lines)
    if skipped and warn:
        print(f"warning: {path}: skipped {skipped} unreadable line(s)", file=sys.stderr, flush=True)
    return records


def truncate_metrics(run: RunDir, last_step: int) -> None:
    """Keep only records up to ``last_step`` (a run that died after its last checkpoint logged
    more), so a resumed run's metrics.jsonl reads like one uninterrupted run.

    A half-written last line (no newline: the run was killed while writing it; every record is
    written with its newline in one go) is dropped even when it happens to parse, and so is
    any other line that is not a JSON object with an integer ``step``; the log says how many.
    The file is rewritten atomically and ends with a newline, so the resumed run's first
    record starts a line of its own.
    """
    path = run.metrics
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return
    lines = text.splitlines()
    half_written = bool(lines) and not text.endswith("\n")
    if half_written:
        lines.pop()
    records, unreadable = _parse_metrics_lines(lines)
    with_step = [r for r in records if isinstance(r.get("step"), int) and not isinstance(r["step"], bool)]
    unreadable += len(records) - len(with_step)
    kept = [r for r in with_step if r["step"] <= last_step]
    if half_written or unreadable:
        what = ["a half-written last line"] if half_written else []
        what += [f"{unreadable} unreadable line(s)"] if unreadable else []
        print(f"warning: {path}: dropped {' and '.join(what)} before resuming at step {last_step}",
              file=sys.stderr, flush=True)
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


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


def set_metrics_aside(run: RunDir) -> Path | None:
    """``set_aside`` for metrics.jsonl."""
    return set_aside(run.metrics, "metrics")
