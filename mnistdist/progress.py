"""What training shows while it runs (``tracking.progress``), on the main process only.

* ``bar``: a tqdm bar per epoch on stderr (the training loss of the last log in its postfix).
* ``lines``: a plain line on stdout every ``train.log_every_steps`` steps (the values of the
  metrics.jsonl training line), no ``\\r``, so Slurm logs and files stay readable::

      epoch 1/10  step 50/3000  train_loss 0.4123  lr 0.0998  12,345 samples/s

* ``off``: no per-step output.
* ``auto``: ``bar`` when stderr is a terminal, ``lines`` otherwise.

In every mode the epoch summary line (``epoch 1/10  train_loss ...  test_acc 97.12% ...``)
is printed on stdout at each epoch end. ``TQDM_DISABLE`` set (to anything but ``""``, ``0``,
``false``, ``no``, ``off``) turns ``auto`` and ``bar`` into ``off``; an explicit ``lines`` still
prints lines (they are not tqdm's).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TextIO

from tqdm.auto import tqdm

if TYPE_CHECKING:
    from mnistdist.metrics import EvalCounts

FALSE_VALUES = ("", "0", "false", "no", "off")


def tqdm_disabled(environ: Mapping[str, str] | None = None) -> bool:
    """``TQDM_DISABLE`` is set to a true value."""
    value = (os.environ if environ is None else environ).get("TQDM_DISABLE", "")
    return value.strip().lower() not in FALSE_VALUES


def resolve(mode: str, stderr: TextIO | None = None, environ: Mapping[str, str] | None = None) -> str:
    """``tracking.progress`` -> ``bar``, ``lines`` or ``off`` for this process's stderr and
    environment."""
    if mode in ("auto", "bar") and tqdm_disabled(environ):
        return "off"
    if mode == "auto":
        isatty = getattr(sys.stderr if stderr is None else stderr, "isatty", None)
        return "bar" if isatty is not None and isatty() else "lines"
    return mode


class Progress:
    """The progress output of one run: ``start_epoch``, then ``step`` after each optimizer step,
    ``log`` with each training record, ``epoch_end`` with the evaluation; ``close`` (or leaving
    the ``with`` block) removes a bar still drawn. Silent where ``enabled`` is false (every
    process but the main one)."""

    def __init__(self, mode: str, enabled: bool, epochs: int, last_step: int):
        self.mode = resolve(mode) if enabled else "off"
        self.enabled = enabled
        self.epochs, self.last_step = epochs, last_step
        self._bar: Any = None

    def start_epoch(self, epoch: int, steps: int) -> None:
        """Epoch ``epoch`` (0-based) begins; ``steps`` of it are left to run."""
        self.close()
        if self.mode == "bar":
            self._bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{self.epochs}", leave=False, disable=False,
                             mininterval=1.0, dynamic_ncols=True, file=sys.stderr)

    def step(self) -> None:
        """One optimizer step done."""
        if self._bar is not None:
            self._bar.update()

    def log(self, record: Mapping[str, Any]) -> None:
        """A training record (``epoch`` 1-based, ``step``, ``train_loss``, ``lr``, ``samples_per_s``)."""
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{record['train_loss']:.4f}", refresh=False)
        elif self.mode == "lines":
            self._print(f"epoch {record['epoch']}/{self.epochs}  step {record['step']}/{self.last_step}  "
                        f"train_loss {record['train_loss']:.4f}  lr {record['lr']:.4g}  "
                        f"{record['samples_per_s']:,.0f} samples/s")

    def epoch_end(self, epoch: int, train_loss: float, counts: EvalCounts, samples_per_s: float,
                  epoch_time_s: float) -> None:
        """The summary line of epoch ``epoch`` (0-based), in every mode."""
        self.close()
        if self.enabled:
            self._print(f"epoch {epoch + 1}/{self.epochs}  train_loss {train_loss:.4f}  "
                        f"test_loss {counts.mean_loss:.4f}  test_acc {100 * counts.accuracy:.2f}% "
                        f"({counts.correct}/{counts.total})  {samples_per_s:,.0f} samples/s  "
                        f"{epoch_time_s:.1f} s")

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
