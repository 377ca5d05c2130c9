"""What training shows while it runs (``tracking.progress``, on the main process only) and the
throughput it reports (timed on every process).

``bar``: a tqdm bar per epoch on stderr; ``lines``: a plain line on stdout every
``train.log_every_steps`` steps, no ``\\r``, so Slurm logs stay readable::

    epoch 1/10  step 50/3000  train_loss 0.4123  lr 0.0998  12,345 samples/s

``off``: no per-step output; ``auto``: ``bar`` on a terminal, else ``lines``. ``TQDM_DISABLE``
set (to anything but ``""``, ``0``, ``false``, ``no``, ``off``) turns ``auto`` and ``bar`` into
``off``. In every mode the start line, each epoch's summary line and the finished line are
printed on stdout.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from tqdm.auto import tqdm


def resolve(mode: str, stderr: TextIO | None = None, environ: Mapping[str, str] | None = None) -> str:
    """``tracking.progress`` -> ``bar``, ``lines`` or ``off`` for this stderr and environment."""
    tqdm_disable = (os.environ if environ is None else environ).get("TQDM_DISABLE", "")
    if mode in ("auto", "bar") and tqdm_disable.strip().lower() not in ("", "0", "false", "no", "off"):
        return "off"
    if mode == "auto":
        isatty = getattr(sys.stderr if stderr is None else stderr, "isatty", None)
        return "bar" if isatty is not None and isatty() else "lines"
    return mode


def precision_name(dtype: str, mixed_precision: str) -> str:
    """How the model computes: its parameter dtype, or ``bf16-mixed`` under bf16 autocast."""
    return "bf16-mixed" if mixed_precision == "bf16" else dtype


def start_line(start: Mapping[str, Any], run_dir: Any) -> str:
    """The line a run starts with, from its run.json entry (``rundir.record_start``)."""
    n = start["world_size"]
    precision = start["precision"] + (f" ({start['dtype']} weights)" if start["precision"] != start["dtype"] else "")
    images = f"{start['steps_per_epoch']} steps/epoch over {start['training_images']} images"
    if start["validation_images"]:
        images += f" ({start['validation_images']} held out for validation)"
    if start["repeated_images_per_epoch"]:
        images += (f"; {start['repeated_images_per_epoch']} image(s) repeated per epoch to share {start['training_images']} among {n} "
                   "processes: not exactly the 1-process result")
    return (f"training on {n} process(es), {start['device']}, backend {start['backend']}; precision {precision}, "
            f"{start['threads_per_process']} thread(s) per process; global batch {start['global_batch_size']} = "
            f"{n} x {start['per_process_batch_size']}; {images}; run dir {run_dir}")


def finished_line(summary: Mapping[str, Any]) -> str:
    """The line of a finished run, from its summary: the final model, with a validation set the
    best one too, and their test accuracy."""
    line = (f"finished after {summary['steps']} steps: {summary['model']} test_acc "
            f"{100 * summary['final_test_acc']:.2f}% ({summary['test_correct']}/{summary['test_total']})")
    if summary.get("best_model") not in (None, summary["model"]):
        line += (f"; best by val_acc: {Path(summary['best_model']).name} (epoch {summary['best_epoch']}, step "
                 f"{summary['best_step']}, val_acc {100 * summary['best_val_acc']:.2f}%) test_acc "
                 f"{100 * summary['best_test_acc']:.2f}% ({summary['best_test_correct']}/{summary['test_total']})")
    return line


class Progress:
    """The progress output of one run and its throughput: ``start_epoch``, ``update`` after each
    optimizer step, ``log`` with each training record, ``epoch_end`` with the epoch's evaluation
    record; leaving the ``with`` block removes a bar still drawn. Prints only where ``enabled``.
    Training time runs from ``start_epoch`` to the latest ``log`` (logged once the loss was read,
    so the steps before it have finished, on a GPU too): evaluation and checkpoints don't count."""

    def __init__(self, mode: str, enabled: bool, epochs: int, last_step: int, global_batch_size: int,
                 train_time_s: float = 0.0):
        self.mode = resolve(mode) if enabled else "off"
        self.enabled = enabled
        self.epochs, self.last_step, self.global_batch_size = epochs, last_step, global_batch_size
        self.train_time_s = train_time_s  # of the earlier jobs (a resumed run) and the epochs ended
        self._bar: Any = None
        self._epoch_start = self._window_start = self._trained_until = time.perf_counter()
        self._epoch_steps = self._window_steps = 0
        self._in_epoch = False

    @property
    def trained_s(self) -> float:
        """Training time so far: ``train_time_s``, and the current epoch's up to its latest ``log``."""
        return self.train_time_s + (self._trained_until - self._epoch_start if self._in_epoch else 0.0)

    def start_epoch(self, epoch: int, steps: int) -> None:
        """Epoch ``epoch`` (0-based) begins; ``steps`` of it are left to run."""
        self.close()
        self._epoch_start = self._window_start = self._trained_until = time.perf_counter()
        self._epoch_steps = self._window_steps = 0
        self._in_epoch = True
        if self.mode == "bar":
            self._bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{self.epochs}", leave=False, disable=False,
                             mininterval=1.0, dynamic_ncols=True, file=sys.stderr)

    def update(self) -> None:
        """One optimizer step done."""
        self._epoch_steps += 1
        self._window_steps += 1
        if self._bar is not None:
            self._bar.update()

    def log(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """A training record (``epoch`` 1-based, ``step``, ``train_loss``, ``lr``), returned with
        ``samples_per_s`` since the previous one; shown in the bar or printed as a line."""
        now = time.perf_counter()
        samples_per_s = self.global_batch_size * self._window_steps / (now - self._window_start)
        record = {**record, "samples_per_s": samples_per_s}
        self._window_start = self._trained_until = now
        self._window_steps = 0
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{record['train_loss']:.4f}", refresh=False)
        elif self.mode == "lines":
            self._print(f"epoch {record['epoch']}/{self.epochs}  step {record['step']}/{self.last_step}  "
                        f"train_loss {record['train_loss']:.4f}  lr {record['lr']:.4g}  "
                        f"{samples_per_s:,.0f} samples/s")
        return record

    def epoch_end(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """An epoch's evaluation record (``test_*`` or ``val_*``), returned with its training time
        ``epoch_time_s`` and ``samples_per_s``; its summary line is printed in every mode."""
        self.close()
        epoch_time_s = self._trained_until - self._epoch_start
        self.train_time_s += epoch_time_s
        self._in_epoch = False
        samples_per_s = self.global_batch_size * self._epoch_steps / epoch_time_s if self._epoch_steps else 0.0
        record = {**record, "epoch_time_s": epoch_time_s, "samples_per_s": samples_per_s}
        if self.enabled:
            on = "val" if "val_acc" in record else "test"
            self._print(f"epoch {record['epoch']}/{self.epochs}  train_loss {record['train_loss_epoch']:.4f}  "
                        f"{on}_loss {record[f'{on}_loss']:.4f}  {on}_acc {100 * record[f'{on}_acc']:.2f}% "
                        f"({record[f'{on}_correct']}/{record[f'{on}_total']})  {samples_per_s:,.0f} samples/s  "
                        f"{epoch_time_s:.1f} s")
        return record

    def close(self) -> None:
        """Remove the bar, if one is drawn (safe to call twice)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _print(line: str) -> None:
        tqdm.write(line, file=sys.stdout)  # through tqdm: never into the middle of a bar
        sys.stdout.flush()
