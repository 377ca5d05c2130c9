"""What a run records: metrics.jsonl, TensorBoard and Weights & Biases. Main process only.

``Tracker.log`` writes each record to metrics.jsonl first, then with the same global step to
TensorBoard (``tracking.tensorboard``) and W&B (``tracking.mode``); the two are independent.
metrics.jsonl is the run's record: when it cannot be written, training stops
(``MetricsWriteError``, one line naming the file). TensorBoard and W&B never stop or hold
training: a failure is one line on stderr and that tracker is off for the rest of the run. Every
W&B call runs on a thread of its own and is bounded (``WandbLog``); the run id survives resumes
(``RUN_DIR/wandb_run_id`` and each checkpoint); the run's last line names its URL or the
``wandb sync`` command that uploads it. The API key is never read from the config or the
command line. docs/tracking.md has the details, and why this is not accelerate's tracker API.
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

CALL_TIMEOUT_S = 30.0  # a W&B log, image or summary call; then W&B is given up
INIT_MARGIN_S = 5.0  # added to tracking.init_timeout_s, as W&B raises its own timeout a little late
TEARDOWN_WAIT_S = 1.0  # how long closing waits for wandb.teardown() once W&B was given up
QUEUE_RECORDS = 10_000  # records that may wait for W&B; more, and W&B is given up as too slow


def _say(who: str, message: str) -> None:
    """``who: message`` on stderr, on a line of its own even while tqdm's bar is drawn."""
    tqdm.write(f"{who}: {message}", file=sys.stderr)
    sys.stderr.flush()


def _describe(e: BaseException) -> str:
    """``Type: message`` on one line (W&B errors can span several), the message cut at 200 characters."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


class MetricsWriteError(TrainingStopped):
    """metrics.jsonl cannot be written: training stops at once, without a new checkpoint (exit 1)."""


class MetricsLog:
    """Appends one JSON object per line to ``path``; a no-op unless ``enabled``. A failed write
    raises ``MetricsWriteError``, and no checkpoint of that step is written: resuming from the
    newest one logs the lost records again, so the history stays complete."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self._file = None
        if not enabled:
            return
        try:
            self._file = open(path, "a", buffering=1)  # line-buffered: each record written at once
            if self._file.tell():
                with open(path, "rb") as f:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":  # a killed run's half line: never glue a record to it
                        self._file.write("\n")
        except OSError as e:
            raise self._failed(e, None) from None

    def _failed(self, e: OSError, step: int | None) -> MetricsWriteError:
        self.close()
        at = "" if step is None else f" at step {step}"
        return MetricsWriteError(f"cannot write {self.path} ({e.strerror or e}){at}; training stopped without a new "
                                 "checkpoint, so that resuming from the newest one logs every step again: make room, "
                                 "then run again with the same --run-dir")

    def log(self, record: dict[str, Any]) -> None:
        """Append ``record`` (NaN and infinities as null: JSON has none)."""
        if self._file is None:
            return
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        try:
            self._file.write(json.dumps(record) + "\n")
        except OSError as e:
            raise self._failed(e, record.get("step")) from None

    def close(self) -> None:
        """Close the file; every record was flushed when it was written."""
        file, self._file = self._file, None
        if file is not None:
            with contextlib.suppress(OSError):  # after a failed write: the rest cannot be written either
                file.close()


def _wait_to_sort_last(directory: Path, longest_s: float = 2.5) -> None:
    """TensorBoard reads event files in name order, and a name starts with the second it was
    created; a resumed run's purge marker only discards what was read before it. So when an
    earlier attempt's file was created in this very second, wait (up to ``longest_s``) for the next."""
    try:
        names = [p.name.split(".") for p in directory.iterdir() if p.name.startswith("events.out.tfevents.")]
    except (FileNotFoundError, NotADirectoryError):
        return
    latest = max((int(parts[3]) for parts in names if len(parts) > 3 and parts[3].isdigit()), default=None)
    deadline = time.time() + longest_s
    while latest is not None and int(time.time()) <= latest and time.time() < deadline:
        time.sleep(0.05)


def _keep_tensorboard_thread_errors_off_stderr() -> None:
    """TensorBoard's writer thread keeps an exception (a full disk, ...) for the writer's next
    call, where it is reported in one line, but also hands it to ``threading.excepthook``, which
    prints a traceback: drop that copy. Other threads' exceptions reach the hook as before."""
    previous = threading.excepthook
    if getattr(previous, "keeps_tensorboard_errors", False):
        return

    def hook(args: Any) -> None:
        if not (isinstance(args.exc_value, Exception) and type(args.thread).__module__.startswith("tensorboard.")):
            previous(args)

    hook.keeps_tensorboard_errors = True  # type: ignore[attr-defined]
    threading.excepthook = hook


class TensorBoardLog:
    """``RUN_DIR/tensorboard/``, through one ``SummaryWriter``: each record's numbers at its step
    (``train/<key>``, ``eval/<key>``, ``test_acc_class/<c>``), the config as text, the final plots
    as images. Never raises: a failure is one line and TensorBoard is off for the rest of the run.

    ``resumed_step`` (None: a fresh start, which sets an earlier ``tensorboard/`` aside): the writer
    gets ``purge_step=resumed_step + 1``, so TensorBoard discards what a killed attempt wrote from
    that step on (it is logged again) and each step holds one value.
    """

    def __init__(self, run: RunDir, resumed_step: int | None, config: dict[str, Any]) -> None:
        self.metrics_path = run.metrics
        self.resumed_step = resumed_step
        self._writer: Any = None
        try:
            if resumed_step is None:
                set_aside(run.tensorboard, "TensorBoard event files")
            else:
                _wait_to_sort_last(run.tensorboard)
            from torch.utils.tensorboard import SummaryWriter

            _keep_tensorboard_thread_errors_off_stderr()
            self._writer = SummaryWriter(str(run.tensorboard),
                                         purge_step=None if resumed_step is None else resumed_step + 1)
            if resumed_step is None:
                import yaml

                text = yaml.safe_dump(config, sort_keys=False)
                self._writer.add_text("config", "".join(f"    {line}\n" for line in text.splitlines()), 0)
            self._writer.flush()
        except Exception as e:  # noqa: BLE001 - TensorBoard must never stop training
            self._drop("could not start", e)

    def _drop(self, what: str, e: Exception) -> None:
        _say("tensorboard", f"{what} ({_describe(e)}); TensorBoard is off for the rest of this run, "
                            f"{self.metrics_path} has every record")
        writer, self._writer = self._writer, None
        if writer is not None:
            with contextlib.suppress(Exception):  # reported already
                writer.close()

    def log(self, record: dict[str, Any]) -> None:
        """Every number of ``record`` (but its step) as a scalar at its step, and config changes as text."""
        if self._writer is None:
            return
        step = record["step"]
        # Both kinds of line have an epoch and a samples_per_s, sometimes at the same step: two prefixes.
        prefix = "train/" if "train_loss" in record else "eval/" if "test_acc" in record or "val_acc" in record else ""
        try:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(prefix + key, float(value), step)
            for c, acc in enumerate(record.get("per_class_acc") or []):
                self._writer.add_scalar(f"test_acc_class/{c}", float(acc), step)
            if record.get("config_changes"):  # a resume with --allow-config-change
                self._writer.add_text("config_changes", "\n\n".join(
                    f"`{key}`: `{old!r}` -> `{new!r}`" for key, (old, new) in record["config_changes"].items()), step)
            self._writer.flush()  # on disk with the metrics.jsonl line: a kill loses neither
        except Exception as e:  # noqa: BLE001 - TensorBoard must never stop training
            self._drop(f"logging step {step} failed", e)

    def log_images(self, images: dict[str, Path], step: int) -> None:
        """The final plots (PNG files) as images at ``step``."""
        if self._writer is None or (self.resumed_step is not None and step <= self.resumed_step):
            return  # (a finished run run again: the attempt that trained to this step logged them)
        try:
            import numpy as np
            from PIL import Image

            for tag, path in images.items():
                with Image.open(path) as image:
                    self._writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")
            self._writer.flush()
        except Exception as e:  # noqa: BLE001
            self._drop("logging the plots failed", e)

    def close(self) -> None:
        """Close the event files (every record was flushed when it was logged). Never raises."""
        writer, self._writer = self._writer, None
        try:
            if writer is not None:
                writer.close()
        except Exception as e:  # noqa: BLE001
            _say("tensorboard", f"closing the event files failed ({_describe(e)}); "
                                f"{self.metrics_path} has every record")


def resolve_mode(cfg: TrackingConfig) -> str:
    """``online``/``offline``/``disabled``: WANDB_MODE > tracking.mode > auto, which is online when
    wandb would find an API key (WANDB_API_KEY or netrc; its value is never read out)."""
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in ("online", "offline", "disabled", "dryrun"):
        return "offline" if env == "dryrun" else env
    if cfg.mode != "auto":
        return cfg.mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return "online" if netrc.netrc(os.environ.get("NETRC")).authenticators(host) else "offline"
    except (OSError, netrc.NetrcParseError):
        return "offline"


class WandbLog:
    """The job's W&B run. Every W&B call (``wandb.init``, ``run.log`` with its ``Table`` and
    ``Image``s, ``run.summary.update``, ``run.finish``) is made on one daemon thread fed by a
    bounded queue; the training thread only hands work over, and never waits on W&B.

    Every call is bounded: a start by ``init_timeout_s + INIT_MARGIN_S`` (an online start that
    fails is logged offline instead), closing (what is queued, then ``run.finish``) by
    ``finish_timeout_s``, any other call by ``CALL_TIMEOUT_S``. The training thread checks the
    bound of the call in progress as it hands work over and while closing. A call past its bound,
    or ``QUEUE_RECORDS`` records waiting, gives W&B up: one line, the stuck thread is abandoned
    (no W&B call after the stuck one returns), and ``wandb.teardown()`` runs on a thread of its
    own so that W&B's exit hook cannot hold the process. A call that raises turns W&B off (one
    line); the run is then only finished, quietly.
    """

    def __init__(self, cfg: TrackingConfig, run: RunDir, config: dict[str, Any], mode: str,
                 run_id: str | None) -> None:
        self.cfg, self.run, self.mode = cfg, run, mode
        self.url: str | None = None  # the run's page (an online run), once started
        self.directory: Path | None = None  # its directory under RUN_DIR/wandb, for `wandb sync`, once started
        # The checkpoint's id, else the run directory's, else the one `wandb agent` set for the run
        # it starts, else a new one (W&B's kind: 8 lowercase alphanumerics); stored before W&B starts.
        id_file = run.wandb_run_id
        self.run_id = (run_id or (id_file.read_text().strip() if id_file.is_file() else "")
                       or os.environ.get("WANDB_RUN_ID", "").strip()
                       or "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8)))
        id_file.write_text(self.run_id + "\n")
        self._wandb: Any = None
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue(QUEUE_RECORDS)
        self._current: tuple[str, float] | None = None  # the call in progress: (why it is given up, deadline)
        self._lock = threading.Lock()
        self._warned = self._failed = self._given_up = self._finished = self._closed = False
        self._done = threading.Event()  # the W&B thread has ended on its own
        self._teardown: threading.Thread | None = None
        threading.Thread(target=self._work, args=(config,), daemon=True, name="mnistdist-wandb").start()

    def _warn_once(self, message: str) -> None:
        with self._lock:
            warned, self._warned = self._warned, True
        if not warned:
            _say("wandb", message)

    def _off(self, why: str) -> None:
        self._warn_once(f"{why}; W&B is off for the rest of this run, {self.run.metrics} has every record")

    # -- the training thread ----------------------------------------------------------------
    def log(self, record: dict[str, Any]) -> None:
        """Hand one metrics.jsonl record over: its values, per-class accuracy, the confusion table."""
        data = {k: v for k, v in record.items() if k != "step" and not isinstance(v, (list, dict))}
        for key, (_, new) in (record.get("config_changes") or {}).items():  # a resume with --allow-config-change
            data[f"config_change/{key}"] = new
        for c, acc in enumerate(record.get("per_class_acc") or []):
            data[f"test_acc_class/{c}"] = acc
        step, confusion = record["step"], record.get("confusion")

        def call(run: Any) -> None:
            if confusion is not None:
                data["confusion_matrix"] = self._wandb.Table(
                    columns=["true", *[f"pred_{c}" for c in range(len(confusion))]],
                    data=[[t, *row] for t, row in enumerate(confusion)])
            if not self._given_up:  # (given up while the Table was stuck)
                run.log(data, step=step)

        self._hand_over(f"logging step {step}", call)

    def log_images(self, images: dict[str, Path], step: int) -> None:
        """Hand the final plots (PNG files) over, as images at ``step``."""
        def call(run: Any) -> None:
            data = {tag: self._wandb.Image(str(path)) for tag, path in images.items() if not self._given_up}
            if not self._given_up:
                run.log(data, step=step)

        if images:
            self._hand_over("logging the plots", call)

    def summary(self, values: dict[str, Any]) -> None:
        """Hand the run's summary values over."""
        values = dict(values)
        self._hand_over("writing the summary", lambda run: run.summary.update(values))

    def _hand_over(self, what: str, call: Callable[[Any], None]) -> None:
        if self._failed or self._stuck():
            return
        try:
            self._queue.put_nowait((what, call))
        except queue.Full:
            self._give_up(f"W&B fell {QUEUE_RECORDS:,} records behind")

    def _stuck(self) -> bool:
        """Whether W&B is given up; gives it up when the call in progress is past its bound."""
        current = self._current
        if current is not None and time.monotonic() > current[1]:
            self._give_up(current[0])
        return self._given_up

    def _give_up(self, why: str) -> None:
        with self._lock:
            given_up, self._given_up = self._given_up, True
        if given_up:
            return
        self._off(why)
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(("stop", None))  # wakes the W&B thread if it waits for work: it ends
        if self._wandb is not None:
            # W&B's exit hook waits for W&B's process without a bound; teardown unregisters it first.
            self._teardown = threading.Thread(target=self._teardown_quietly, daemon=True,
                                              name="mnistdist-wandb-teardown")
            self._teardown.start()

    def _teardown_quietly(self) -> None:
        with contextlib.suppress(BaseException):  # given up already (and W&B's teardown may sys.exit)
            self._wandb.teardown()

    def close(self, exit_code: int) -> None:
        """Finish the run (what is queued first) within ``finish_timeout_s``, then print its last
        line: its URL, or its directory and the ``wandb sync`` command. Never raises."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + self.cfg.finish_timeout_s
        if not self._given_up:
            try:
                self._queue.put_nowait(("finish", lambda run: self._finish(run, exit_code, deadline)))
            except queue.Full:
                self._give_up(f"W&B fell {QUEUE_RECORDS:,} records behind")
        while not self._stuck() and not self._done.wait(0.05):
            if time.monotonic() > deadline:
                self._give_up(f"did not finish within {self.cfg.finish_timeout_s:g} s")
        if self._teardown is not None:
            self._teardown.join(TEARDOWN_WAIT_S)
        sync = f"wandb sync {shlex.quote(str(self.directory))}"
        if self.url is not None:
            print(f"W&B run: {self.url}" + ("" if self._finished or self.directory is None
                                            else f" (not all uploaded: {sync})"), flush=True)
        elif self.directory is not None:
            print(f"W&B offline run in {self.directory}; upload it with: {sync}", flush=True)

    # -- the W&B thread ---------------------------------------------------------------------
    @contextlib.contextmanager
    def _bounded(self, what_failed: str, bound_s: float, deadline: float | None = None) -> Iterator[None]:
        """One W&B call, its bound visible to the training thread (``what_failed`` names it in the
        give-up line: "did not start", "logging step 5 did not return", ...)."""
        deadline = time.monotonic() + bound_s if deadline is None else deadline
        self._current = (f"{what_failed} within {bound_s:g} s", deadline)
        try:
            yield
        finally:
            self._current = None

    def _work(self, config: dict[str, Any]) -> None:
        run = self._start(config)
        self._failed = run is None  # not started (said so, or given up): nothing to hand over
        while run is not None:
            what, call = self._queue.get()
            if self._given_up:
                return  # abandoned: no W&B call after a stuck one
            if what == "finish":
                call(run)
                break
            if self._failed:
                continue
            try:
                with self._bounded(f"{what} did not return", CALL_TIMEOUT_S):
                    call(run)
            except Exception as e:  # noqa: BLE001 - W&B must never stop training
                self._failed = True
                if not self._given_up:
                    self._off(f"{what} failed ({_describe(e)})")
        if not self._given_up:
            self._done.set()

    def _start(self, config: dict[str, Any]) -> Any:
        """``wandb.init`` in ``self.mode``; online, if W&B cannot be reached, offline instead. None: not started."""
        cfg = self.cfg
        for mode in ("online", "offline") if self.mode == "online" else (self.mode,):
            try:
                with self._bounded("did not start", cfg.init_timeout_s + INIT_MARGIN_S):
                    import wandb

                    if self._wandb is not None:
                        wandb.teardown()  # forget the failed online run, so that its id can be used offline
                    self._wandb, self.mode = wandb, mode
                    # console="off", silent: W&B prints nothing of its own, also from its process-wide
                    # code, which takes its settings from wandb.setup. W&B bounds its own start and upload.
                    settings = wandb.Settings(mode=mode, init_timeout=cfg.init_timeout_s,
                                              finish_timeout=cfg.finish_timeout_s, console="off", silent=True)
                    wandb.setup(settings=settings)
                    run = wandb.init(mode=mode, project=cfg.project, entity=cfg.entity or None,
                                     name=cfg.run_name or self.run.root.name, group=cfg.group or None,
                                     tags=list(cfg.tags) or None, config=config, dir=str(self.run.root),
                                     id=self.run_id, resume="allow", settings=settings)
                break
            except Exception as e:  # noqa: BLE001 - W&B must never stop training
                if self._given_up:
                    return None
                if mode != "online":
                    self._warn_once(f"disabled for this run: could not start {mode} ({_describe(e)})")
                    return None
                _say("wandb", f"cannot reach W&B ({type(e).__name__}); logging offline to {self.run.root / 'wandb'} "
                     "instead (the run's last line names the directory to upload with `wandb sync`)")
        if self._given_up:
            return None
        sync_dir = getattr(getattr(run, "settings", None), "sync_dir", None)
        self.directory = Path(sync_dir) if sync_dir else None
        if self.mode == "online" and not getattr(run, "offline", False):
            self.url = getattr(run, "url", None)  # (W&B warns when an offline run is asked for it)
        return run

    def _finish(self, run: Any, exit_code: int, deadline: float) -> None:
        """``run.finish``, also after a failed call (so that what W&B got is flushed to its files), then quietly."""
        try:
            with self._bounded("did not finish", self.cfg.finish_timeout_s, deadline):
                run.finish(exit_code=exit_code)
            self._finished = True
        except Exception as e:  # noqa: BLE001
            if not (self._failed or self._given_up):
                self._warn_once(f"finish failed ({_describe(e)}); what W&B got stays in {self.run.root / 'wandb'}")


class Tracker:
    """metrics.jsonl + TensorBoard + W&B for one run; every method is a no-op unless ``enabled``
    (the main process). ``log`` raises ``MetricsWriteError`` when metrics.jsonl cannot be written;
    TensorBoard and W&B never raise and never hold training.

    ``resumed_step``: the step of the checkpoint this run resumed from; None: the last step in
    metrics.jsonl, which ``rundir.start`` has already cut at that checkpoint (no record: a fresh start).
    """

    def __init__(self, cfg: TrackingConfig, run: RunDir, config: dict[str, Any], enabled: bool,
                 run_id: str | None = None, resumed_step: int | None = None) -> None:
        self.metrics = MetricsLog(run.metrics, enabled)
        self.tensorboard: TensorBoardLog | None = None
        if enabled and cfg.tensorboard:
            if resumed_step is None:
                steps = [r["step"] for r in read_metrics(run.root)
                         if isinstance(r.get("step"), int) and not isinstance(r["step"], bool)]
                resumed_step = max(steps, default=None)
            self.tensorboard = TensorBoardLog(run, resumed_step, config)
        mode = resolve_mode(cfg) if enabled else "disabled"
        self.wandb = WandbLog(cfg, run, config, mode, run_id) if mode != "disabled" else None
        self.run_id = self.wandb.run_id if self.wandb is not None else run_id

    def log(self, record: dict[str, Any]) -> None:
        """One record (with its global ``step``) to metrics.jsonl, TensorBoard and W&B."""
        self.metrics.log(record)
        if self.tensorboard is not None:
            self.tensorboard.log(record)
        if self.wandb is not None:
            self.wandb.log(record)

    def log_images(self, images: dict[str, Path], step: int) -> None:
        """The final plots (tag -> PNG file) to TensorBoard and W&B, at ``step``."""
        if self.tensorboard is not None:
            self.tensorboard.log_images(images, step)
        if self.wandb is not None:
            self.wandb.log_images(images, step)

    def summary(self, values: dict[str, Any]) -> None:
        """The run's summary values to W&B's run summary."""
        if self.wandb is not None:
            self.wandb.summary(values)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        # The run's exit code goes to W&B: 0, or the stop's own code (75 preempted, 3 NaN, ...).
        self.close(exit_code=0 if exc is None else getattr(exc, "exit_code", 1))

    def close(self, exit_code: int = 0) -> None:
        """Close metrics.jsonl and TensorBoard, finish W&B within ``finish_timeout_s`` and print
        the W&B run's last line. Never raises."""
        self.metrics.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.close(exit_code)
