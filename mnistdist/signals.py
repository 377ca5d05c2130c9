"""Why training stops early: stop requests (SIGTERM, SIGUSR1), the exceptions and exit codes
that report it, and a test-only fault injector.

A signal handler only records the request; the training loop reads it at a step boundary and
all ranks agree (one all-reduce) on the step at which they stop, checkpoint and exit with
``EXIT_PREEMPTED``. Signals can reach ranks at different moments, so acting on a local flag
alone would leave ranks at different steps and deadlock the next collective.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on request, checkpoint written, resume to continue
EXIT_NONFINITE = 3  # a loss or gradient was NaN/Inf: stopped before the optimizer step
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class TrainingStopped(RuntimeError):
    """Training ended early on purpose; ``exit_code`` tells the launcher/scheduler why."""

    exit_code = 1


class Preempted(TrainingStopped):
    """Stopped on SIGTERM/SIGUSR1 after writing a checkpoint; resume to continue."""

    exit_code = EXIT_PREEMPTED


class NonFiniteLoss(TrainingStopped):
    """A loss or gradient was NaN/Inf; stopped before that optimizer step was applied."""

    exit_code = EXIT_NONFINITE


class RankFailure(TrainingStopped):
    """A collective failed: another rank died, raised, or stopped responding."""


class StopSignals:
    """Context manager: while active, SIGTERM/SIGUSR1 set ``received`` instead of killing us."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # handlers need the main thread
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else "none"


class FaultInjector:
    """Test hook: ``MNISTDIST_FAULT="step=K,rank=R,action=A"`` makes rank R do A at step K.

    Actions: ``KILL``/``TERM``/``USR1``/``STOP`` send that signal to this process after step K,
    ``raise`` raises after step K, ``nan`` feeds step K a NaN batch (so its loss and gradients
    are NaN). Used by the tests to interrupt runs at an exact step. It wraps the step from the
    outside (``wrap``); unset, the step is returned as it is and costs nothing.
    """

    def __init__(self, rank: int, env: str | None = None) -> None:
        self.step, self.action = -1, ""
        text = os.environ.get("MNISTDIST_FAULT", "") if env is None else env
        if not text:
            return
        spec = dict(part.split("=", 1) for part in text.split(","))
        if int(spec.get("rank", 0)) == rank:
            self.step = int(spec["step"])
            self.action = spec["action"]

    def wrap(self, step: Callable[..., bool], steps_done: int) -> Callable[..., bool]:
        """``step`` with the fault added at step ``self.step`` (``steps_done``: the steps taken
        before the first call, i.e. the resumed step)."""
        if self.step < 0:
            return step
        count = steps_done

        def faulty_step(x: Any, y: Any, lr: float) -> bool:
            nonlocal count
            count += 1
            if count == self.step and self.action == "nan":
                x = x * float("nan")
            stop = step(x, y, lr)
            if count == self.step and self.action == "raise":
                raise RuntimeError(f"injected fault after step {count}")
            if count == self.step and self.action != "nan":
                os.kill(os.getpid(), getattr(signal, f"SIG{self.action}"))
            return stop

        return faulty_step
