"""``python -m mnistdist.launch ARGS`` = ``accelerate launch ARGS``, made safe for clusters.

Underneath runs torchrun's own elastic agent (``LocalElasticAgent``) with its restarts
(``--max_restarts N``: a failed generation of workers is replaced by one that resumes from the
newest checkpoint). What this wrapper adds, and why torchrun alone does not do it:

* SIGUSR1, SIGTERM and Ctrl-C reach the workers, and the job ends with what they did (75:
  stopped with a checkpoint; 130: after Ctrl-C). The agent does not forward SIGUSR1 (Slurm's
  usual "time is nearly up" warning; its default action kills the launcher) and tears the job
  down itself on SIGTERM/SIGINT, so it is told to leave them alone (``signals_to_handle``).
* A requested stop is not a failure: after a stop request, or workers that exit 75/130, no
  restart is made (the agent would restart on any non-zero exit).
* A failed generation ends within ``WORKER_GRACE_S`` (the agent waits a fixed 30 s before it
  SIGKILLs the others; a stopped or hung rank cannot act on SIGTERM). Only the current
  generation's workers are watched (the agent's own process handles), so helper processes
  (accelerate runs ``nvidia-smi``) and earlier generations never count.
* One line naming the first rank that failed; exit 2 when every worker stopped on bad input;
  a free rendezvous port on one machine; no orphan processes.

The agent class is swapped in ``torch.distributed.launcher.api`` for the duration of ``main``:
torch's launcher extended without a process tree of our own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

import psutil

from mnistdist.signals import EXIT_INTERRUPTED, EXIT_PREEMPTED, EXIT_USAGE, STOP_SIGNALS

WORKER_GRACE_S = 5.0
"""Seconds the other workers of a generation get to leave after one exited non-zero."""
STOP_CODES = frozenset({EXIT_PREEMPTED, EXIT_INTERRUPTED})
"""Worker exit codes of a requested stop (a checkpoint was written): never restarted."""


@dataclass
class _Job:
    """What the wrapper knows of its job; shared by the signal handler and the agent."""

    stop: int | None = None  # the first stop signal received (forwarded to the workers)
    agent: Any = None  # the running agent, once torch's launcher has built it
    first_failure: tuple[int, int] | None = None  # (global rank, exit code), current generation
    restarts: int = 0


_job = _Job()


class StoppedBeforeStart(Exception):
    """A stop signal arrived before any worker of the job was started."""


def _signal_name(code: int) -> str:
    return f", {signal.Signals(-code).name}" if code < 0 and -code in signal.Signals._value2member_map_ else ""


def _make_agent_class() -> type:
    """torchrun's ``LocalElasticAgent`` with the behaviour described in the module docstring."""
    from torch.distributed.elastic.agent.server.api import RunResult, WorkerState
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    class _Agent(LocalElasticAgent):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._failed_at: float | None = None
            _job.agent = self

        def workers(self) -> dict[int, Any]:
            """Global rank -> the ``Popen`` of each worker of the current generation."""
            handlers = getattr(self._pcontext, "subprocess_handlers", None) or {}
            ranks = {w.local_rank: w.global_rank for w in self._worker_group.workers}
            return {ranks.get(local, local): h.proc for local, h in handlers.items()}

        def _start_workers(self, worker_group: Any) -> dict[int, Any]:
            if _job.stop is not None:  # asked to stop while the rendezvous was going on
                raise StoppedBeforeStart(signal.Signals(_job.stop).name)
            self._failed_at, _job.first_failure = None, None
            return super()._start_workers(worker_group)

        def _monitor_workers(self, worker_group: Any) -> Any:
            workers = self.workers()
            codes = {rank: proc.poll() for rank, proc in workers.items()}
            failed = {r: c for r, c in codes.items() if c not in (None, 0)}
            if failed and _job.first_failure is None:
                _job.first_failure = min(failed.items())
            if _job.stop is not None or (failed and set(failed.values()) <= STOP_CODES):
                self._remaining_restarts = 0  # a requested stop ends the job
            alive = [r for r, c in codes.items() if c is None]
            if failed and alive:  # SIGTERM the survivors at once, SIGKILL them after the grace
                if self._failed_at is None:
                    self._failed_at = time.monotonic()
                    for rank in alive:
                        _send(workers[rank], signal.SIGTERM)
                elif time.monotonic() - self._failed_at > WORKER_GRACE_S:
                    for rank in alive:
                        print(f"mnistdist.launch: rank {rank} (pid {workers[rank].pid}) still running "
                              f"{WORKER_GRACE_S:g} s after another rank ended; killing it", file=sys.stderr, flush=True)
                        _send(workers[rank], signal.SIGKILL, group=True)
                return RunResult(state=WorkerState.HEALTHY)  # look again at the next interval
            result = super()._monitor_workers(worker_group)
            if result.state == WorkerState.FAILED and self._remaining_restarts > 0 and _job.first_failure:
                (rank, code), spec = _job.first_failure, worker_group.spec
                _job.restarts += 1
                print(f"mnistdist.launch: rank {rank} exited (exit {code}{_signal_name(code)}); restarting the workers "
                      f"from the newest checkpoint (restart {spec.max_restarts - self._remaining_restarts + 1} of "
                      f"{spec.max_restarts})", file=sys.stderr, flush=True)
            return result

    return _Agent


def _send(proc: Any, signum: int, group: bool = False) -> None:
    with contextlib.suppress(OSError):  # already gone
        os.killpg(proc.pid, signum) if group else proc.send_signal(signum)


def _on_stop_signal(signum: int, frame: FrameType | None) -> None:
    if _job.stop is None:
        _job.stop = signum
    if _job.agent is not None:
        for proc in _job.agent.workers().values():
            if proc.poll() is None:
                _send(proc, signum)


def free_port() -> int:
    """A TCP port that is free on this machine now (for a rendezvous of one machine's job)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a training run started by a tool or a test: this one without
    launcher and W&B settings that would change the run, unbuffered, W&B off; then ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "WANDB_"))}
    return {**env, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", **extra}


def _reap_children() -> None:
    """No orphans: whatever the launcher left behind is killed before we exit."""
    children = psutil.Process().children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.kill()
    psutil.wait_procs(children, timeout=5)


def outcome(codes: list[int], stop: int | None) -> int | None:
    """The exit code of a job whose last generation failed with worker exit ``codes``, when it
    was a clean stop or bad input (None: a failure).

    A stop ends with every worker at 75/130, except workers that the agent's tear-down
    SIGTERMed on their way out (the checkpoint was complete before any rank exited: saving is
    collective), or that a requested stop reached before they could handle it (the newest
    checkpoint is still the newest)."""
    if not codes:
        return None
    signalled = {-s for s in STOP_SIGNALS} if stop is not None else {-signal.SIGTERM}
    if set(codes) <= STOP_CODES | signalled and (set(codes) & STOP_CODES or stop is not None):
        return EXIT_INTERRUPTED if EXIT_INTERRUPTED in codes or stop == signal.SIGINT else EXIT_PREEMPTED
    if EXIT_USAGE in codes and set(codes) <= {EXIT_USAGE, -signal.SIGTERM}:
        return EXIT_USAGE  # every rank refused the same input; the tear-down may have caught some
    return None


def _launcher(argv: list[str]) -> Callable[[], object]:
    """What to run: accelerate's launcher with its arguments (the default), or torchrun's with
    ``torchrun ARGS`` (for what accelerate cannot say, such as ``--nnodes 1:4``)."""
    if argv[:1] == ["torchrun"]:
        from torch.distributed import run as torchrun

        args, launch = torchrun.parse_args(argv[1:]), torchrun.run
    else:
        from accelerate.commands.launch import launch_command, launch_command_parser

        args, launch = launch_command_parser().parse_args(argv), launch_command
        if args.main_process_port is None and (args.num_machines or 1) == 1:
            args.main_process_port = free_port()  # accelerate's default, 29500, would make two jobs collide
    args.signals_to_handle = "SIGHUP,SIGQUIT"  # not SIGTERM/SIGINT: we forward them and wait
    return lambda: launch(args)


def main(argv: list[str] | None = None) -> int:
    """Run the launcher on ``argv`` with the agent above; returns the job's exit code."""
    for sig in STOP_SIGNALS:  # first: a stop during the imports below is kept
        signal.signal(sig, _on_stop_signal)
    import torch.distributed.launcher.api as launcher_api
    from torch.distributed.elastic.rendezvous import RendezvousError

    # Bounds the agent's own tear-downs (the default is 30 s; a checkpoint takes well under 1 s).
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "10")
    # Each round of an elastic rendezvous gives the workers a store of their own instead of the
    # agent's, which keeps the keys of earlier rounds (pytorch/pytorch issue 135712).
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    launch = _launcher(list(sys.argv[1:] if argv is None else argv))
    # The agent logs each failed worker; we say it once, or not at all for a stop or bad input.
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(
        lambda record: not str(record.msg).startswith("failed (exitcode"))
    original_agent, launcher_api.LocalElasticAgent = launcher_api.LocalElasticAgent, _make_agent_class()
    try:
        launch()
    except StoppedBeforeStart as e:
        print(f"mnistdist.launch: stopped by {e} before any worker started; nothing was trained "
              "(the newest checkpoint, if any, is unchanged)", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED if _job.stop == signal.SIGINT else EXIT_PREEMPTED
    except RendezvousError as e:  # the agents did not come together (bounded by the join timeout)
        _reap_children()
        print(f"mnistdist.launch: the rendezvous did not complete: {type(e).__name__}: "
              f"{' '.join(str(e).split())[:300]} (its wait is --rdzv_conf join_timeout=SECONDS, "
              "default 600)", file=sys.stderr, flush=True)
        return 1
    except Exception as e:  # noqa: BLE001 - classify the workers' exit, then re-raise
        _reap_children()
        failures = getattr(e, "failures", None) or {}  # torch's ChildFailedError
        codes = [f.exitcode for f in failures.values()]
        code = outcome(codes, _job.stop)
        if code in (EXIT_PREEMPTED, EXIT_INTERRUPTED):
            what = ("the workers were stopped before they could write a checkpoint" if not set(codes) & STOP_CODES
                    else "the workers stopped on Ctrl-C (exit 130)" if code == EXIT_INTERRUPTED
                    else "all workers stopped on request after writing a checkpoint (exit 75)")
            print(f"mnistdist.launch: {what}; run again with the same --run-dir to resume from the newest "
                  "checkpoint", file=sys.stderr, flush=True)
            return code
        if code == EXIT_USAGE:
            return code  # the workers said what is wrong, in one line
        if not (_job.first_failure or failures):
            raise
        rank, first = _job.first_failure or min((r, f.exitcode) for r, f in failures.items())
        restarts = f" after {_job.restarts} restart(s)" if _job.restarts else ""
        print(f"mnistdist.launch: training failed{restarts}; first rank to exit: rank {rank} "
              f"(exit {first}{_signal_name(first)}) (see the ranks' errors above)", file=sys.stderr, flush=True)
        return 1
    finally:
        launcher_api.LocalElasticAgent = original_agent
        for sig in STOP_SIGNALS:  # a late signal (a scheduler's warning) must not kill us while Python shuts down
            signal.signal(sig, signal.SIG_IGN)
    return 0


if __name__ == "__main__":
    sys.exit(main())
