"""What a run records: metrics.jsonl, TensorBoard and Weights & Biases. Main process only.

``Tracker.log`` writes each record to metrics.jsonl and, with the same global step, to
TensorBoard (``tracking.tensorboard``) and W&B (``tracking.mode``), so all three hold the same
numbers. Either, both or neither of TensorBoard and W&B: the two keys are independent.
metrics.jsonl is the run's record: when it cannot be written, training stops
(``MetricsWriteError``, one line naming the file).

TensorBoard (``TensorBoardLog``): event files in ``RUN_DIR/tensorboard/`` through
``torch.utils.tensorboard.SummaryWriter``; tags: ``tensorboard_scalars``. Each step once, as
TensorBoard reads them, across restarts: a resumed run opens its writer with ``purge_step`` =
resumed step + 1 (TensorBoard then discards what the killed attempt wrote from that step on), and
a fresh start sets an earlier directory aside as ``tensorboard.old-N``, as metrics.jsonl is set
aside. Written after metrics.jsonl and flushed with every record; a failure (at start-up too) is
reported in one line (``tensorboard: ...``) and TensorBoard is off for the rest of the run.

W&B (``WandbLog``) can never hold the job hostage:

* mode ``auto`` is online when an API key is configured, else offline; ``WANDB_MODE`` wins;
* every W&B call is made on a thread of its own, so training and stop signals never wait for
  W&B, and every call is bounded: start-up by ``tracking.init_timeout_s`` (if W&B cannot be
  reached, the run is logged offline instead, for ``wandb sync`` later, and the log says so
  once), finishing by ``tracking.finish_timeout_s`` (what is not uploaded stays on disk), the
  others by ``CALL_TIMEOUT_S``;
* a W&B call that raises or does not return in time is reported once on stderr and W&B is
  off for the rest of the run; training goes on, and metrics.jsonl (written first, always)
  holds every record;
* the run id lives in ``RUN_DIR/wandb_run_id`` (and in each checkpoint), so a resumed or
  requeued job continues the same W&B run;
* W&B prints nothing itself; the run's last line names its URL, or its offline directory and
  the ``wandb sync`` command that uploads it.

The API key is never read from the config or the command line: wandb reads it from
``WANDB_API_KEY`` or ``~/.netrc`` itself, and we never log the environment.

Why not accelerate's tracker API (``Accelerator(log_with=...)``, ``init_trackers``, ``log``,
``end_training``)? Of the guarantees above it keeps one run per job (its trackers live on the
main process), the run id across requeues (``init_kwargs={"wandb": {"id": ..., "resume":
"allow"}}``) and a bounded ``wandb.init`` (the same ``wandb.Settings``), but not the rest:
``init_trackers`` lets a failed ``wandb.init`` raise, with no offline fallback (a retry rebuilds
every tracker); ``accelerator.log`` calls the trackers in turn, unguarded, so one W&B error would
skip TensorBoard for that record, and W&B cannot be dropped alone; ``end_training`` waits for
``run.finish`` without a bound. (Its TensorBoard tracker also writes the config with
``add_hparams`` into an extra sub-run.) Guarding each call would leave our code plus
accelerate's. So our W&B code stays, and TensorBoard sits beside it on the primitive that
accelerate's TensorBoard tracker wraps too: torch's ``SummaryWriter``.
"""

from __future__ import annotations

import contextlib
import json
import math
import netrc
import os
import queue
import secrets
import shlex
import string
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from tqdm.auto import tqdm

from mnistdist.config import TrackingConfig
from mnistdist.rundir import RunDir, read_metrics, set_aside
from mnistdist.signals import TrainingStopped


def _jsonable(value: Any) -> Any:
    # JSON has no NaN/Infinity; write null so every line stays parseable by strict readers.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _ends_mid_line(path: Path) -> bool:
    """Whether ``path`` is non-empty and its last byte is not a newline."""
    try:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"
    except OSError:  # missing or empty
        return False


class MetricsWriteError(TrainingStopped):
    """metrics.jsonl cannot be written: training stops at once, without a new checkpoint (exit 1)."""


class MetricsLog:
    """Appends one JSON object per line to ``run_dir/metrics.jsonl``; a no-op off the main rank.

    A failed write (a full disk, ...) raises ``MetricsWriteError``, naming the file: a run that
    cannot record its history stops. Not with a checkpoint of the step reached: resuming from the
    newest earlier checkpoint logs the lost records again, so the history stays complete.
    """

    def __init__(self, path: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.path = path
        self._file = None
        if not enabled:
            return
        try:
            self._file = open(self.path, "a", buffering=1)  # line-buffered: each record written at once
            if _ends_mid_line(self.path):
                # A half-written line left by a killed run (rundir.start normally removes it):
                # never glue the next record to it.
                self._file.write("\n")
        except OSError as e:
            self._abandon()
            raise MetricsWriteError(self._cannot_write(e, None)) from None

    def _cannot_write(self, e: OSError, step: int | None) -> str:
        return (f"cannot write {self.path} ({e.strerror or e})" + (f" at step {step}" if step is not None else "")
                + "; training stopped without a new checkpoint, so that resuming from the newest one logs "
                "every step again: make room, then run again with the same --run-dir")

    def log(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        line = json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n"
        try:
            self._file.write(line)
        except OSError as e:
            self._abandon()
            raise MetricsWriteError(self._cannot_write(e, record.get("step"))) from None

    def _abandon(self) -> None:
        """Close after a failed write; the rest of that line cannot be written either."""
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except OSError:
                pass

    def close(self) -> None:
        # Every record was flushed when it was written: closing has nothing left to write.
        self._abandon()


def _say(who: str, message: str) -> None:
    """``who: message`` on stderr, through tqdm: on a line of its own even while the progress bar is drawn."""
    tqdm.write(f"{who}: {message}", file=sys.stderr)
    sys.stderr.flush()


def _describe(e: BaseException) -> str:
    """``Type: message`` on one line (W&B errors can span several), at most ~200 characters."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


# --------------------------------------------------------------------------------------
# TensorBoard


def tensorboard_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The TensorBoard scalars of one metrics.jsonl record, all at its ``step``: every number in
    it (but the step) as ``train/<key>`` for a training line, ``eval/<key>`` for an evaluation
    (of the test or the validation set),
    and the per-class accuracies as ``test_acc_class/<class>``. (Both kinds of line have an
    ``epoch`` and a ``samples_per_s``, sometimes at the same step: hence the two prefixes.)"""
    prefix = "train/" if "train_loss" in record else "eval/" if "test_acc" in record or "val_acc" in record else ""
    scalars = {f"{prefix}{key}": float(value) for key, value in record.items()
               if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}
    for c, acc in enumerate(record.get("per_class_acc") or []):
        if isinstance(acc, (int, float)):
            scalars[f"test_acc_class/{c}"] = float(acc)
    return scalars


def set_tensorboard_aside(run: RunDir) -> Path | None:
    """``rundir.set_aside`` for the event files: a fresh start keeps an earlier start's aside."""
    return set_aside(run.tensorboard, "TensorBoard event files")


def _wait_to_sort_last(directory: Path, longest_s: float = 2.5) -> None:
    """TensorBoard reads a directory's event files in name order, and a name starts with the
    second it was created (``events.out.tfevents.<seconds>.<host>.<pid>.<n>``). A resumed run's
    purge marker discards only what was read before it, so its file must sort after the earlier
    attempts' files: when one of them was created in this very second (a quick restart), wait
    for the next second (at most ``longest_s``)."""
    try:
        names = [p.name.split(".") for p in directory.iterdir() if p.name.startswith("events.out.tfevents.")]
    except (FileNotFoundError, NotADirectoryError):
        return
    stamps = [int(parts[3]) for parts in names if len(parts) > 3 and parts[3].isdigit()]
    if not stamps:
        return
    deadline = time.time() + longest_s
    while int(time.time()) <= max(stamps) and time.time() < deadline:
        time.sleep(0.05)


def _keep_tensorboard_thread_errors_off_stderr() -> None:
    """TensorBoard's event writer thread keeps an exception (a full disk, an unwritable
    directory) for the writer's next call, where ``TensorBoardLog`` reports it in one line, and
    also lets it reach ``threading.excepthook``, which prints it as a traceback: drop that copy.
    Exceptions of every other thread go to the hook as before."""
    previous = threading.excepthook
    if getattr(previous, "keeps_tensorboard_errors", False):
        return

    def hook(args: Any) -> None:
        if isinstance(args.exc_value, Exception) and type(args.thread).__module__.startswith("tensorboard."):
            return
        previous(args)

    hook.keeps_tensorboard_errors = True  # type: ignore[attr-defined]
    threading.excepthook = hook


class TensorBoardLog:
    """``RUN_DIR/tensorboard/``: each record's numbers as scalars (``tensorboard_scalars``) at its
    step, the config as text, the final plots as images. Never raises: a failure is reported
    once through ``say`` and TensorBoard is off for the rest of the run.

    ``resumed_step``: the step this run resumed from (None: a fresh start). Resumed, the writer
    gets ``purge_step=resumed_step + 1``: TensorBoard then discards the events of the earlier,
    killed attempt from that step on (they are logged again), so each step holds one value.
    """

    def __init__(self, run: RunDir, resumed_step: int | None, config: dict[str, Any],
                 say: Callable[[str], None]) -> None:
        self.path = run.tensorboard
        self.metrics_path = run.metrics
        self.resumed_step = resumed_step
        self._say = say
        self._writer: Any = None
        try:
            if resumed_step is None:
                set_tensorboard_aside(run)
            else:
                _wait_to_sort_last(self.path)
            from torch.utils.tensorboard import SummaryWriter

            _keep_tensorboard_thread_errors_off_stderr()
            self._writer = SummaryWriter(str(self.path), purge_step=None if resumed_step is None else resumed_step + 1)
            if resumed_step is None:
                import yaml

                text = yaml.safe_dump(config, sort_keys=False)
                self._writer.add_text("config", "".join(f"    {line}\n" for line in text.splitlines()), 0)
            self._writer.flush()
        except Exception as e:  # noqa: BLE001 - TensorBoard must never stop training
            self._say(f"disabled for this run: could not start ({_describe(e)})")
            self._close_quietly()

    def _drop(self, what: str, e: Exception) -> None:
        self._say(f"{what} failed ({_describe(e)}); TensorBoard is off for the rest of this run, "
                  f"{self.metrics_path} has every record")
        self._close_quietly()

    def _close_quietly(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.close()
            except Exception:  # noqa: BLE001 - already reported
                pass

    def log(self, record: dict[str, Any]) -> None:
        if self._writer is None:
            return
        try:
            step = record["step"]
            for tag, value in tensorboard_scalars(record).items():
                self._writer.add_scalar(tag, value, step)
            changes = record.get("config_changes") or {}
            if changes:  # a resume with --allow-config-change
                self._writer.add_text("config_changes", "\n\n".join(
                    f"`{key}`: `{old!r}` -> `{new!r}`" for key, (old, new) in changes.items()), step)
            self._writer.flush()  # on disk with the metrics.jsonl line: a kill loses neither
        except Exception as e:  # noqa: BLE001 - TensorBoard must never stop training
            self._drop(f"logging step {record.get('step')}", e)

    def log_images(self, images: dict[str, Path], step: int) -> None:
        if self._writer is None or not images:
            return
        if self.resumed_step is not None and step <= self.resumed_step:
            return  # a finished run run again: the attempt that trained to this step logged them
        try:
            import numpy as np
            from PIL import Image

            for tag, path in images.items():
                with Image.open(path) as image:
                    self._writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")
            self._writer.flush()
        except Exception as e:  # noqa: BLE001
            self._drop("logging the plots", e)

    def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is None:
            return
        try:
            writer.close()
        except Exception as e:  # noqa: BLE001
            self._say(f"closing the event files failed ({_describe(e)}); {self.metrics_path} has every record")


def _last_logged_step(run: RunDir) -> int | None:
    """The last step in metrics.jsonl (which ``rundir.start`` has cut at the resumed checkpoint),
    or None when it holds no record (a fresh start)."""
    steps = [r["step"] for r in read_metrics(run.root)
             if isinstance(r.get("step"), int) and not isinstance(r["step"], bool)]
    return max(steps) if steps else None


# --------------------------------------------------------------------------------------
# W&B


def api_key_configured() -> bool:
    """Whether wandb would find an API key (env or netrc), without reading its value out."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(cfg: TrackingConfig) -> str:
    """``online``/``offline``/``disabled``: WANDB_MODE > tracking.mode > auto (key -> online)."""
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in ("online", "offline", "disabled"):
        return env
    if env == "dryrun":
        return "offline"
    if cfg.mode != "auto":
        return cfg.mode
    return "online" if api_key_configured() else "offline"


CALL_TIMEOUT_S = 30.0
"""Longest a W&B log, summary or image call may take before W&B is given up (healthy, one takes
a fraction of a millisecond: it hands the data to W&B's own process)."""

INIT_MARGIN_S = 5.0
"""Added to ``tracking.init_timeout_s`` before a start of W&B is given up: W&B raises its own
timeout 0.4-0.7 s after it on an idle 2-core machine (docs/tracking.md), and an online start that
raises still falls back to offline."""

TEARDOWN_WAIT_S = 1.0
"""After W&B was given up, how long closing waits for ``wandb.teardown()``. Needed: W&B's exit
hook waits for W&B's process without a bound (a process whose W&B process was stopped had not
exited 45 s after the end, with W&B's ``finish_timeout`` at 3 s). ``wandb.teardown`` first
unregisters that hook, in milliseconds; the rest of it may never return."""

QUEUE_RECORDS = 10_000
"""Records that may wait for W&B; more, and W&B is given up as too slow (at about 0.25 ms a
record it keeps up with any training that logs fewer than ~4,000 records a second)."""


class WandbLog:
    """The job's W&B run, each of its calls made on one daemon thread (``mnistdist-wandb``) fed by
    a bounded queue: ``wandb.init``, ``run.log`` with its ``Table``, ``Image``, the summary and
    ``run.finish``. The training thread only hands records over and never waits on W&B.

    Every call is bounded: a start by ``init_timeout_s + INIT_MARGIN_S`` (W&B's own
    ``init_timeout`` ends an online start earlier: then the run is logged offline), any other call
    by ``CALL_TIMEOUT_S``, closing (what is queued, then ``run.finish``, also bounded by W&B's
    own ``finish_timeout``) by ``finish_timeout_s``. The training thread checks the bound of the
    call in progress whenever it hands a record over, and while closing. A call past its bound,
    or ``QUEUE_RECORDS`` records waiting, gives W&B up: one line on stderr, nothing more is handed
    over, the stuck thread is abandoned (it makes no W&B call after the stuck one returns), and
    ``wandb.teardown()`` runs on a daemon thread of its own so that W&B's exit hook cannot hold
    the process. A call that raises drops W&B (one line); the run is then only finished, quietly.

    Threads, not a process: a W&B call cannot be interrupted, only abandoned, and a daemon thread
    is abandoned at exit for free; the data stay in W&B's own process and files either way.
    """

    def __init__(self, cfg: TrackingConfig, run: RunDir, config: dict[str, Any], mode: str,
                 run_id: str | None) -> None:
        self.cfg = cfg
        self.run = run
        self.mode = mode
        self.url: str | None = None
        """The run's page (online runs), once W&B has started."""
        self.directory: Path | None = None
        """The run's own directory under ``RUN_DIR/wandb`` (what ``wandb sync`` uploads), once started."""
        self.run_id = self._choose_run_id(run_id)
        self._wandb: Any = None
        self._queue: queue.Queue[tuple[Any, ...]] = queue.Queue(QUEUE_RECORDS)
        self._current: tuple[str, float] | None = None  # the call in progress: (what it failed to do, deadline)
        self._lock = threading.Lock()
        self._warned = False
        self._failed = False  # a call raised: nothing more but a quiet finish
        self._given_up = False  # a call got stuck: the worker is abandoned
        self._finished = False
        self._done = threading.Event()  # the worker has ended on its own
        self._closed = False
        self._teardown: threading.Thread | None = None
        threading.Thread(target=self._work, args=(config,), daemon=True, name="mnistdist-wandb").start()

    def _choose_run_id(self, run_id: str | None) -> str:
        """The run directory's id (a resumed run), else ``run_id`` (from the checkpoint), else the
        one ``wandb agent`` set, else a new one; stored in ``RUN_DIR/wandb_run_id`` first."""
        id_file = self.run.wandb_run_id
        if run_id is None and id_file.is_file():
            run_id = id_file.read_text().strip() or None
        if run_id is None:
            # `wandb agent` starts each run of a W&B sweep with the id it expects in WANDB_RUN_ID.
            run_id = os.environ.get("WANDB_RUN_ID", "").strip() or None
        if run_id is None:
            # W&B run ids are short lowercase alphanumerics; chosen here so we can store it first.
            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        id_file.write_text(run_id + "\n")
        return run_id

    # -- messages (any thread) --------------------------------------------------------------
    def _say(self, message: str) -> None:
        _say("wandb", message)

    def _warn_once(self, message: str) -> None:
        """The one line a run gets about W&B failing or being given up."""
        with self._lock:
            if self._warned:
                return
            self._warned = True
        self._say(message)

    def _off(self, why: str) -> str:
        return f"{why}; W&B is off for the rest of this run, {self.run.metrics} has every record"

    # -- the training thread ----------------------------------------------------------------
    def log(self, record: dict[str, Any]) -> None:
        """Hand one metrics.jsonl record over (its numbers, per-class accuracy, the confusion table)."""
        data = {k: v for k, v in record.items() if k != "step" and not isinstance(v, (list, dict))}
        for key, (_, new) in (record.get("config_changes") or {}).items():  # a resume with --allow-config-change
            data[f"config_change/{key}"] = new
        for c, acc in enumerate(record.get("per_class_acc") or []):
            data[f"test_acc_class/{c}"] = acc
        self._hand_over(("log", data, record["step"], record.get("confusion")))

    def log_images(self, images: dict[str, Path], step: int) -> None:
        if images:
            self._hand_over(("images", dict(images), step))

    def summary(self, values: dict[str, Any]) -> None:
        self._hand_over(("summary", dict(values)))

    def _hand_over(self, item: tuple[Any, ...]) -> None:
        if self._failed or self._given_up or self._stuck():
            return
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self._give_up(f"W&B fell {QUEUE_RECORDS:,} records behind")

    def _stuck(self) -> bool:
        """Whether the call in progress is past its bound (then W&B is given up)."""
        current = self._current
        if current is None or time.monotonic() <= current[1]:
            return self._given_up
        self._give_up(current[0])
        return True

    def _give_up(self, why: str) -> None:
        with self._lock:
            if self._given_up:
                return
            self._given_up = True
        self._warn_once(self._off(why))
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(("stop",))  # wakes the W&B thread if it waits for work: it ends
        if self._wandb is not None:
            self._teardown = threading.Thread(target=self._teardown_quietly, daemon=True,
                                              name="mnistdist-wandb-teardown")
            self._teardown.start()

    def _teardown_quietly(self) -> None:
        try:
            self._wandb.teardown()
        except BaseException:  # noqa: BLE001 - W&B is given up already (its teardown may sys.exit)
            pass

    def close(self, exit_code: int) -> None:
        """Finish the run (what is queued first) within ``finish_timeout_s``; print where it is.
        Never raises. A run given up is not waited for (but ``TEARDOWN_WAIT_S`` for its teardown)."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + self.cfg.finish_timeout_s
        if not self._given_up:
            try:
                self._queue.put_nowait(("finish", exit_code, deadline))
            except queue.Full:
                self._give_up(f"W&B fell {QUEUE_RECORDS:,} records behind")
        while not self._given_up and not self._done.is_set():
            current = self._current
            until = deadline if current is None else min(deadline, current[1])
            if self._done.wait(max(0.0, until - time.monotonic())):
                break
            if time.monotonic() >= deadline:
                self._give_up(f"did not finish within {self.cfg.finish_timeout_s:g} s")
            else:
                self._stuck()
        if self._teardown is not None:
            self._teardown.join(TEARDOWN_WAIT_S)
        line = self.final_line()
        if line is not None:
            print(line, flush=True)

    @property
    def sync_command(self) -> str | None:
        """``wandb sync DIR`` for a run W&B has not fully uploaded (offline, or not finished)."""
        if self.directory is None or (self.url is not None and self._finished):
            return None
        return f"wandb sync {shlex.quote(str(self.directory))}"

    def final_line(self) -> str | None:
        """Where the run is: its URL, or its offline directory and the command that uploads it."""
        if self.url is not None:
            return f"W&B run: {self.url}" + (f" (not all uploaded: {self.sync_command})" if self.sync_command else "")
        if self.directory is not None:
            return f"W&B offline run in {self.directory}; upload it with: {self.sync_command}"
        return None

    # -- the W&B thread ---------------------------------------------------------------------
    @contextlib.contextmanager
    def _bounded(self, what_failed: str, bound_s: float, deadline: float | None = None) -> Iterator[None]:
        """One W&B call, its bound visible to the training thread (``what_failed`` names it in
        the give-up line: "did not start", "logging step 5 did not return", ...)."""
        deadline = time.monotonic() + bound_s if deadline is None else deadline
        self._current = (f"{what_failed} within {bound_s:g} s", deadline)
        try:
            yield
        finally:
            self._current = None

    def _work(self, config: dict[str, Any]) -> None:
        run = self._start(config)
        if run is None:
            self._failed = True  # not started (said so, or given up): nothing to hand over
        while run is not None and not self._given_up:
            item = self._queue.get()
            if self._given_up:
                return  # abandoned: no W&B call after a stuck one
            if item[0] == "finish":
                self._finish(run, exit_code=item[1], deadline=item[2])
                break
            if self._failed:
                continue
            try:
                self._call(run, item)
            except Exception as e:  # noqa: BLE001 - W&B must never stop training
                self._failed = True
                if not self._given_up:
                    self._warn_once(self._off(f"{self._describe_item(item)} failed ({_describe(e)})"))
        if not self._given_up:
            self._done.set()

    @staticmethod
    def _describe_item(item: tuple[Any, ...]) -> str:
        if item[0] == "log":
            return f"logging step {item[2]}"
        return "logging the plots" if item[0] == "images" else "writing the summary"

    def _call(self, run: Any, item: tuple[Any, ...]) -> None:
        with self._bounded(f"{self._describe_item(item)} did not return", CALL_TIMEOUT_S):
            # A call given up while stuck makes no further W&B call when it returns.
            if item[0] == "log":
                _, data, step, confusion = item
                if confusion is not None:
                    data["confusion_matrix"] = self._wandb.Table(
                        columns=["true", *[f"pred_{c}" for c in range(len(confusion))]],
                        data=[[t, *row] for t, row in enumerate(confusion)])
                if not self._given_up:
                    run.log(data, step=step)
            elif item[0] == "images":
                _, images, step = item
                data = {}
                for k, p in images.items():
                    if self._given_up:
                        return
                    data[k] = self._wandb.Image(str(p))
                if not self._given_up:
                    run.log(data, step=step)
            else:
                for k, v in item[1].items():
                    if self._given_up:
                        return
                    run.summary[k] = v

    def _init(self, mode: str, config: dict[str, Any]) -> Any:
        """``wandb.setup`` and ``wandb.init`` of this job's run in ``mode``."""
        cfg, wandb = self.cfg, self._wandb
        # console="off": W&B does not capture our stdout/stderr; silent: none of its own lines
        # (final_line says where the run is), also from W&B's process-wide code, which takes its
        # settings from wandb.setup. W&B bounds its own start and its upload at the end.
        settings = wandb.Settings(mode=mode, init_timeout=cfg.init_timeout_s, finish_timeout=cfg.finish_timeout_s,
                                  console="off", silent=True)
        wandb.setup(settings=settings)
        return wandb.init(
            mode=mode, project=cfg.project, entity=cfg.entity or None, name=cfg.run_name or self.run.root.name,
            group=cfg.group or None, tags=list(cfg.tags) or None, config=config,
            dir=str(self.run.root), id=self.run_id, resume="allow", settings=settings,
        )

    def _start(self, config: dict[str, Any]) -> Any:
        """``wandb.init``; online, if W&B cannot be reached, offline instead. None: not started."""
        bound = self.cfg.init_timeout_s + INIT_MARGIN_S
        try:
            with self._bounded("did not start", bound):
                import wandb

                self._wandb = wandb
                run = self._init(self.mode, config)
        except Exception as e:  # noqa: BLE001 - W&B must never stop training
            if self._given_up:
                return None
            if self.mode != "online":
                self._warn_once(f"disabled for this run: could not start ({_describe(e)})")
                return None
            self._say(f"cannot reach W&B ({type(e).__name__}); logging offline to {self.run.root / 'wandb'} "
                      "instead (the run's last line names the directory to upload with `wandb sync`)")
            try:
                with self._bounded("did not start offline", bound):
                    self._wandb.teardown()  # forget the failed online run, so the same id can be used offline
                    self.mode = "offline"
                    run = self._init("offline", config)
            except Exception as e2:  # noqa: BLE001
                if not self._given_up:
                    self._warn_once(f"disabled for this run: offline start failed too ({_describe(e2)})")
                return None
        if self._given_up:
            return None
        sync_dir = getattr(getattr(run, "settings", None), "sync_dir", None)
        self.directory = Path(sync_dir) if sync_dir else None
        if self.mode == "online" and not getattr(run, "offline", False):
            self.url = getattr(run, "url", None)  # (W&B warns when an offline run is asked for it)
        return run

    def _finish(self, run: Any, exit_code: int, deadline: float) -> None:
        """``run.finish``, also after a failed call (so what W&B got is flushed to its files and
        its exit hook has nothing left to wait for), then quietly."""
        try:
            with self._bounded("did not finish", self.cfg.finish_timeout_s, deadline):
                run.finish(exit_code=exit_code)
            self._finished = True
        except Exception as e:  # noqa: BLE001
            if not (self._failed or self._given_up):
                self._warn_once(f"finish failed ({_describe(e)}); what W&B got stays in {self.run.root / 'wandb'}")


class Tracker:
    """metrics.jsonl + TensorBoard + W&B for one run; every method is a no-op off the main process.

    ``resumed_step``: the step of the checkpoint this run resumed from. None: the last step in
    metrics.jsonl, which ``rundir.start`` has already cut at that checkpoint (no record: a fresh
    start); TensorBoard mirrors metrics.jsonl, so either way it ends up with the same history.

    ``log`` raises ``MetricsWriteError`` when metrics.jsonl cannot be written; TensorBoard and W&B
    never raise and never hold training (``TensorBoardLog``, ``WandbLog``).
    """

    def __init__(self, cfg: TrackingConfig, run: RunDir, config: dict[str, Any], enabled: bool,
                 run_id: str | None = None, resumed_step: int | None = None) -> None:
        self.cfg = cfg
        self.run_dir = run.root
        self.run = run
        self.metrics = MetricsLog(run.metrics, enabled)
        self.tensorboard: TensorBoardLog | None = None
        if enabled and cfg.tensorboard:
            if resumed_step is None:
                resumed_step = _last_logged_step(run)
            self.tensorboard = TensorBoardLog(run, resumed_step, config, say=lambda message: _say("tensorboard", message))
        self.mode = resolve_mode(cfg) if enabled else "disabled"
        self.wandb: WandbLog | None = None
        self.run_id = run_id
        if self.mode != "disabled":
            self.wandb = WandbLog(cfg, run, config, self.mode, run_id)
            self.run_id = self.wandb.run_id

    @property
    def wandb_url(self) -> str | None:
        """The W&B run's page (an online run, once W&B has started); else None."""
        return self.wandb.url if self.wandb is not None else None

    @property
    def wandb_dir(self) -> Path | None:
        """The W&B run's own directory under ``RUN_DIR/wandb`` (once W&B has started); else None."""
        return self.wandb.directory if self.wandb is not None else None

    @property
    def wandb_sync_command(self) -> str | None:
        """``wandb sync DIR`` while W&B has not uploaded everything (offline, or not finished)."""
        return self.wandb.sync_command if self.wandb is not None else None

    def log(self, record: dict[str, Any]) -> None:
        """One record (with its global ``step``) to metrics.jsonl, TensorBoard and W&B."""
        self.metrics.log(record)
        if self.tensorboard is not None:
            self.tensorboard.log(record)
        if self.wandb is not None:
            self.wandb.log(record)

    def log_images(self, images: dict[str, Path], step: int) -> None:
        if self.tensorboard is not None:
            self.tensorboard.log_images(images, step)
        if self.wandb is not None:
            self.wandb.log_images(images, step)

    def summary(self, values: dict[str, Any]) -> None:
        if self.wandb is not None:
            self.wandb.summary(values)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        # The run's exit code goes to W&B: 0, or the stop's own code (75 preempted, 3 NaN, ...).
        self.close(exit_code=0 if exc is None else getattr(exc, "exit_code", 1))

    def close(self, exit_code: int = 0) -> None:
        """Close metrics.jsonl and TensorBoard, finish W&B within ``finish_timeout_s`` and print
        the W&B run's last line (``WandbLog.final_line``). Never raises."""
        self.metrics.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.close(exit_code)
