"""Why training stops early: stop requests (SIGTERM, SIGUSR1, Ctrl-C), and the exceptions and
exit codes that report it.

A signal handler only records the request; at a step boundary all ranks agree (one all-reduce)
on the step at which they stop, checkpoint and exit with ``EXIT_PREEMPTED`` (``EXIT_INTERRUPTED``
after Ctrl-C): signals reach ranks at different moments, and a rank acting alone would deadlock
the next collective. One Ctrl-C reaches a rank as several SIGINTs (the terminal's whole group,
then the launchers again): those within ``SIGINT_REPEAT_S`` of the first are that one press; a
later one exits at once (no checkpoint; the newest one stays valid).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from types import FrameType

EXIT_USAGE = 2  # bad input (config, flags, data, checkpoint): nothing was started
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on request, checkpoint written, resume to continue
EXIT_NONFINITE = 3  # a loss or gradient was NaN/Inf: stopped before the optimizer step
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130, the shell's code for Ctrl-C
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
SIGINT_REPEAT_S = 1.0
ORPHAN_POLL_S = 0.5
ORPHAN_GRACE_S = 30.0


class TrainingStopped(RuntimeError):
    """Training ended early on purpose; ``exit_code`` tells the launcher/scheduler why."""

    exit_code = 1
    agreed = False
    """Raised on every rank together, from one decision (``Dist.on_main``): said once, by the main
    process, instead of once per rank."""


class Preempted(TrainingStopped):
    """Stopped on SIGTERM/SIGUSR1 after writing a checkpoint; resume to continue."""

    exit_code = EXIT_PREEMPTED


class Interrupted(Preempted):
    """Stopped on Ctrl-C (SIGINT) after writing a checkpoint; resume to continue."""

    exit_code = EXIT_INTERRUPTED


class NonFiniteLoss(TrainingStopped):
    """A loss or gradient was NaN/Inf; stopped before that optimizer step was applied."""

    exit_code = EXIT_NONFINITE


class RankFailure(TrainingStopped):
    """A collective failed: another rank died, raised, or stopped responding."""


class StopSignals:
    """Context manager: while active, SIGTERM/SIGUSR1/SIGINT set ``received`` (the first one)
    instead of killing us; a second Ctrl-C exits at once with ``EXIT_INTERRUPTED``."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._first_sigint: float | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._first_sigint is None:
                self._first_sigint = now
            elif now - self._first_sigint > SIGINT_REPEAT_S:
                if os.environ.get("RANK", "0") == "0":
                    os.write(2, b"interrupted again: exiting now without a checkpoint; "
                                b"the newest checkpoint in the run directory stays valid\n")
                os._exit(EXIT_INTERRUPTED)  # no cleanup, no traceback: the user asked twice
        if self.received is None:
            self.received = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # handlers need the main thread
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
            if "LOCAL_RANK" in os.environ:  # started by a launcher (torchrun, accelerate)
                threading.Thread(target=_stop_when_orphaned, args=(os.getppid(),), daemon=True,
                                 name="mnistdist-parent-watch").start()
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def stopped(self, step: int, checkpoint: Path) -> Preempted:
        """What ends a run whose ranks agreed to stop after ``step`` and wrote ``checkpoint``:
        Interrupted after Ctrl-C here, else Preempted (a signal here or on another rank)."""
        why = signal.Signals(self.received).name if self.received else "a stop signal on another rank"
        stop = Interrupted if self.received == signal.SIGINT else Preempted
        return stop(f"stopped by {why} after step {step}; checkpoint written to {checkpoint}; "
                    "run again with the same --run-dir to resume")


def _stop_when_orphaned(parent: int) -> None:
    """A worker whose launcher is gone (SIGKILLed, OOM-killed) must not train on unwatched:
    once this process is re-parented, it asks itself to stop (SIGTERM: the ranks, which all lost
    the same launcher, agree, checkpoint and exit 75) and exits for good if that has not
    happened within ``ORPHAN_GRACE_S`` (e.g. a peer on another machine is gone too)."""
    while os.getppid() == parent:
        time.sleep(ORPHAN_POLL_S)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(ORPHAN_GRACE_S)
    os._exit(1)
