"""``train_dist.py`` with a fault injected at an exact step on an exact rank, for the tests.

    MNISTDIST_FAULT="step=K,rank=R,action=A" python tests/fault_train.py [train_dist.py arguments]

Launched in place of ``train_dist.py`` (``train_cmd(..., script=FAULT_TRAIN)``, ``launch_cmd(...,
script=FAULT_TRAIN)``): rank R (default 0) does A at optimizer step K (1-based):

* ``KILL``, ``TERM``, ``USR1``, ``STOP``, ``INT``: sends itself that signal after step K;
* ``raise``: raises after step K;
* ``nan``: step K gets a NaN batch, so its loss and gradients are NaN;
* ``KILL_IN_SAVE``: SIGKILL in the middle of writing the checkpoint of step K (its tensors are
  written, its state and manifest not yet): rank R must be the main process, which writes it.
* ``rmtree``: deletes the directory ``MNISTDIST_FAULT_PATH`` (the run directory) after step K.
* ``sleep:S``: sleeps S seconds after step K and after every step after it (a slow run whose
  numbers are those of a fast one; the other ranks wait for R in the next step).

Under an elastic agent the fault happens in the first generation of workers only.

Runs of the training loop inside the test process use ``injected(spec)`` instead. Both wrap
what ``training.build_step`` returns, so the package itself has no test hook.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from mnistdist import checkpoint, training

Step = Callable[[Any, Any, float, int], bool]


def parse(spec: str, rank: int) -> tuple[int, str] | None:
    """``"step=K,rank=R,action=A"`` -> ``(K, A)`` for rank R; None for other ranks or ``""``."""
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return None  # once per job: not again in the workers an elastic agent restarts
    fields = dict(part.split("=", 1) for part in spec.split(","))
    if int(fields.get("rank", 0)) != rank:
        return None
    return int(fields["step"]), fields["action"]


def with_fault(step: Step, at: int, action: str) -> Step:
    """``step`` doing ``action`` at step number ``at``."""

    def faulty_step(x: Any, y: Any, lr: float, number: int) -> bool:
        if number == at and action == "nan":
            x = x * float("nan")
        stop = step(x, y, lr, number)
        if action.startswith("sleep:"):
            if number >= at:
                time.sleep(float(action.removeprefix("sleep:")))
        elif number == at and action == "raise":
            raise RuntimeError(f"injected fault after step {number}")
        elif number == at and action == "rmtree":
            shutil.rmtree(os.environ["MNISTDIST_FAULT_PATH"])
        elif number == at and action != "nan":
            os.kill(os.getpid(), getattr(signal, f"SIG{action}"))
        return stop

    return faulty_step


def kill_in_save(at: int) -> Callable[..., None]:
    """``checkpoint._write`` that SIGKILLs this process before the state of step ``at``."""
    write = checkpoint._write

    def write_or_die(path: Any, data: bytes) -> None:
        if path.name == "state.json" and f"step-{at:08d}" in path.parent.name:
            os.kill(os.getpid(), signal.SIGKILL)
        write(path, data)

    return write_or_die


@contextlib.contextmanager
def injected(spec: str) -> Iterator[None]:
    """While active, the steps of ``training.run`` in this process carry the fault ``spec``."""
    build_step = training.build_step
    fault = parse(spec, int(os.environ.get("RANK", "0")))
    if fault is not None and fault[1] == "KILL_IN_SAVE":
        write, checkpoint._write = checkpoint._write, kill_in_save(fault[0])
        try:
            yield
        finally:
            checkpoint._write = write
        return

    def build_faulty_step(cfg: Any, dist: Any, *args: Any, **kwargs: Any) -> Step:
        step = build_step(cfg, dist, *args, **kwargs)
        fault = parse(spec, dist.rank)
        return step if fault is None else with_fault(step, *fault)

    training.build_step = build_faulty_step
    try:
        yield
    finally:
        training.build_step = build_step


if __name__ == "__main__":
    from mnistdist.cli import train_main

    with injected(os.environ.get("MNISTDIST_FAULT", "")):
        sys.exit(train_main(sys.argv[1:]))
