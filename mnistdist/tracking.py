"""What a run records: metrics.jsonl and Weights & Biases. Main process only.

``Tracker.log`` writes each record to metrics.jsonl and, with the same global step, to W&B,
so the two always hold the same numbers. W&B can never hold the job hostage:

* mode ``auto`` is online when an API key is configured, else offline; ``WANDB_MODE`` wins;
* start-up is bounded (``tracking.init_timeout_s``); if W&B cannot be reached, the run is
  logged offline instead (for ``wandb sync`` later) and the log says so once;
* finishing is bounded (``tracking.finish_timeout_s``); what is not uploaded stays on disk;
* after start-up, a W&B call that raises (``log``, a ``Table`` or ``Image``, the summary,
  ``finish``) is reported once on stderr and W&B is dropped for the rest of the run; training
  goes on, and metrics.jsonl (written first, always) holds every record;
* the run id lives in ``RUN_DIR/wandb_run_id`` (and in each checkpoint), so a resumed or
  requeued job continues the same W&B run.

The API key is never read from the config or the command line: wandb reads it from
``WANDB_API_KEY`` or ``~/.netrc`` itself, and we never log the environment.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import secrets
import string
import sys
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from tqdm.auto import tqdm

from mnistdist.config import TrackingConfig
from mnistdist.rundir import RunDir


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


class MetricsLog:
    """Appends one JSON object per line to ``run_dir/metrics.jsonl``; a no-op off the main rank."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.path = path
        self._file = open(self.path, "a", buffering=1) if enabled else None  # line-buffered
        if self._file is not None and _ends_mid_line(self.path):
            # A half-written line left by a killed run (rundir.start normally removes it): never
            # glue the next record to it.
            self._file.write("\n")

    def log(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


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


class Tracker:
    """metrics.jsonl + W&B for one run; every method is a no-op off the main process."""

    def __init__(self, cfg: TrackingConfig, run: RunDir, config: dict[str, Any], enabled: bool,
                 run_id: str | None = None) -> None:
        self.cfg = cfg
        self.run_dir = run.root
        self.run = run
        self.metrics = MetricsLog(run.metrics, enabled)
        self.mode = resolve_mode(cfg) if enabled else "disabled"
        self.run_id = run_id
        self._wandb: Any = None
        self._run: Any = None
        self._dropped: Any = None  # the run after a W&B call failed; only finished, quietly
        if self.mode != "disabled":
            self._start(config)

    def _say(self, message: str) -> None:
        # Through tqdm: on a line of its own even while the progress bar is drawn.
        tqdm.write(f"wandb: {message}", file=sys.stderr)
        sys.stderr.flush()

    @staticmethod
    def _describe(e: BaseException) -> str:
        """``Type: message`` on one line (W&B errors can span several), at most ~200 characters."""
        text = " ".join(str(e).split())
        return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__

    def _drop(self, what: str, e: Exception) -> None:
        """A W&B call failed after start-up: say so once and log to metrics.jsonl only from now on."""
        self._say(f"{what} failed ({self._describe(e)}); W&B is off for the rest of this run, "
                  f"{self.run.metrics} has every record")
        self._dropped, self._run = self._run, None

    def _start(self, config: dict[str, Any]) -> None:
        import wandb

        self._wandb = wandb
        id_file = self.run.wandb_run_id
        if self.run_id is None and id_file.is_file():
            self.run_id = id_file.read_text().strip() or None
        if self.run_id is None:
            # W&B run ids are short lowercase alphanumerics; chosen here so we can store it first.
            self.run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        id_file.write_text(self.run_id + "\n")
        kwargs = dict(
            project=self.cfg.project, entity=self.cfg.entity or None, name=self.cfg.run_name or self.run_dir.name,
            group=self.cfg.group or None, tags=list(self.cfg.tags) or None, config=config,
            dir=str(self.run_dir), id=self.run_id, resume="allow",
            # console="off": W&B does not capture our stdout/stderr; init is bounded.
            settings=wandb.Settings(init_timeout=self.cfg.init_timeout_s, console="off", silent=True),
        )
        try:
            self._run = wandb.init(mode=self.mode, **kwargs)
        except Exception as e:  # noqa: BLE001 - W&B must never stop training
            if self.mode != "online":
                self._say(f"disabled for this run: could not start ({type(e).__name__}: {e})")
                return
            self._say(f"cannot reach W&B ({type(e).__name__}); logging offline to {self.run_dir / 'wandb'} "
                      f"instead: upload later with `wandb sync {self.run_dir / 'wandb'}/offline-run-*`")
            wandb.teardown()  # forget the failed online run, so the same id can be used offline
            self.mode = "offline"
            try:
                self._run = wandb.init(mode="offline", **kwargs)
            except Exception as e2:  # noqa: BLE001
                self._say(f"disabled for this run: offline start failed too ({type(e2).__name__}: {e2})")
                self._run = None

    def log(self, record: dict[str, Any]) -> None:
        """One record (with its global ``step``) to metrics.jsonl and W&B."""
        self.metrics.log(record)
        if self._run is None:
            return
        try:
            data = {k: v for k, v in record.items() if k != "step" and not isinstance(v, (list, dict))}
            for key, (_, new) in (record.get("config_changes") or {}).items():  # a resume with --allow-config-change
                data[f"config_change/{key}"] = new
            for c, acc in enumerate(record.get("per_class_acc") or []):
                data[f"test_acc_class/{c}"] = acc
            if "confusion" in record:
                data["confusion_matrix"] = self._wandb.Table(
                    columns=["true", *[f"pred_{c}" for c in range(len(record["confusion"]))]],
                    data=[[t, *row] for t, row in enumerate(record["confusion"])],
                )
            self._run.log(data, step=record["step"])
        except Exception as e:  # noqa: BLE001 - W&B must never stop training
            self._drop(f"logging step {record.get('step')}", e)

    def log_images(self, images: dict[str, Path], step: int) -> None:
        if self._run is None or not images:
            return
        try:
            self._run.log({k: self._wandb.Image(str(p)) for k, p in images.items()}, step=step)
        except Exception as e:  # noqa: BLE001
            self._drop("logging the plots", e)

    def summary(self, values: dict[str, Any]) -> None:
        if self._run is None:
            return
        try:
            for k, v in values.items():
                self._run.summary[k] = v
        except Exception as e:  # noqa: BLE001
            self._drop("writing the summary", e)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        # The run's exit code goes to W&B: 0, or the stop's own code (75 preempted, 3 NaN, ...).
        self.close(exit_code=0 if exc is None else getattr(exc, "exit_code", 1))

    def close(self, exit_code: int = 0) -> None:
        """Finish W&B within ``finish_timeout_s``; never raises.

        A run dropped after a failed call is still finished (so what it got is flushed to
        ``RUN_DIR/wandb`` and wandb's exit hook has nothing left to wait for), without a word:
        its one warning was given when it failed.
        """
        self.metrics.close()
        quiet = self._run is None
        run, self._run, self._dropped = self._run or self._dropped, None, None
        if run is None:
            return
        done = threading.Event()

        def finish() -> None:
            try:
                run.finish(exit_code=exit_code)
            except Exception as e:  # noqa: BLE001
                if not quiet:
                    self._say(f"finish failed ({self._describe(e)}); data stays in {self.run_dir / 'wandb'}")
            done.set()

        threading.Thread(target=finish, daemon=True, name="wandb-finish").start()
        if not done.wait(self.cfg.finish_timeout_s) and not quiet:
            self._say(f"did not finish within {self.cfg.finish_timeout_s:g} s; the data stays in "
                      f"{self.run_dir / 'wandb'}: upload it with `wandb sync`")
