"""``python -m mnistdist.launch ARGS`` = ``accelerate launch ARGS``, made safe for clusters.

What it adds: SIGUSR1, SIGTERM and Ctrl-C reach the workers and the launcher then reports what
they did (exit 75: stopped with a checkpoint; 130: stopped by Ctrl-C); a free rendezvous port
on one machine (two jobs never collide); a 10 s shutdown grace instead of 30 s; a one-line
report of the first failed rank; no orphan processes.

Why a wrapper (torchrun's elastic agent runs underneath): the agent does not forward SIGUSR1
at all (USR1's default action kills the launcher and the workers never hear of it; Slurm's
``--signal=USR1@lead`` is the usual "time is nearly up" warning), and on SIGTERM/SIGINT it
tears the job down itself and exits 143/130 whatever the workers did. So the agent is told to
leave SIGTERM and SIGINT alone (its ``signals_to_handle``), and this process passes all three
signals on to every worker and keeps waiting: each worker finishes its step, the ranks agree,
checkpoint, and exit 75 (130 after Ctrl-C), which is what this launcher then exits with.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from types import FrameType

import psutil

from mnistdist.signals import EXIT_INTERRUPTED, EXIT_PREEMPTED

WORKER_GRACE_S = 5.0  # see _watch_workers
FORWARDED_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


def _forward_to_workers(signum: int, frame: FrameType | None) -> None:
    for child in psutil.Process().children(recursive=True):
        try:
            child.send_signal(signum)
        except psutil.Error:
            pass  # already gone


def _exit_codes(exc: BaseException) -> list[int]:
    failures = getattr(exc, "failures", None)  # torch.distributed.elastic ChildFailedError
    if failures:
        return [f.exitcode for f in failures.values()]
    returncode = getattr(exc, "returncode", None)  # subprocess.CalledProcessError (1 process)
    return [returncode] if returncode is not None else []


def free_port() -> int:
    """A TCP port that is free on this machine now (for a rendezvous of one machine's job)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a training run started by a tool or a test: this one without
    launcher and W&B settings that would change the run, unbuffered, W&B off; then ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "WANDB_"))}
    env.update(PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    env.update(extra)
    return env


def _first_failure(exc: BaseException) -> str | None:
    """'rank R (exit C[, SIGNAME])' of the first failed worker, from torchrun's report."""
    failures = getattr(exc, "failures", None)
    if not failures:
        return None
    rank, failure = min(failures.items(), key=lambda kv: kv[1].timestamp)
    code = failure.exitcode
    how = f", {signal.Signals(-code).name}" if code < 0 and -code in signal.Signals._value2member_map_ else ""
    return f"rank {rank} (exit {code}{how})"


def _reap_children() -> None:
    """No orphans: whatever the launcher left behind is killed before we exit."""
    children = psutil.Process().children(recursive=True)
    for child in children:
        try:
            child.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(children, timeout=5)


def _watch_workers(grace_s: float, poll_s: float = 0.5) -> None:
    """Once a worker is gone, kill the ones still there after ``grace_s``.

    When a rank fails, torchrun sends the others SIGTERM and then waits a fixed 30 s before
    SIGKILL (its shutdown-timeout setting does not cover this path). A rank that is stopped
    (SIGSTOP) or hung cannot act on SIGTERM, so this watchdog bounds that wait. Healthy ranks
    leave together (the last collective is a barrier), well within the grace.
    """
    me = psutil.Process()
    known: dict[int, psutil.Process] = {}
    first_gone: float | None = None
    while True:
        for child in me.children():  # the workers are the launcher's direct children
            known.setdefault(child.pid, child)
        alive = []
        for child in known.values():
            try:
                if child.status() != psutil.STATUS_ZOMBIE:
                    alive.append(child)
            except psutil.Error:
                pass
        if alive and len(alive) < len(known):
            first_gone = first_gone or time.monotonic()
            if time.monotonic() - first_gone > grace_s:
                for child in alive:
                    print(f"mnistdist.launch: worker pid {child.pid} still running {grace_s:g} s after "
                          "another rank ended; killing it", file=sys.stderr, flush=True)
                    try:
                        child.kill()
                    except psutil.Error:
                        pass
        time.sleep(poll_s)


def main(argv: list[str] | None = None) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser

    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, _forward_to_workers)
    # torchrun gives workers 30 s between SIGTERM and SIGKILL when it shuts a job down (a rank
    # failed). Checkpointing this model takes well under a second, and a shorter grace bounds
    # how long a job with a hung rank lingers.
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "10")
    args = launch_command_parser().parse_args(sys.argv[1:] if argv is None else argv)
    # The agent must not act on SIGTERM/SIGINT itself (we forward them and wait, see above).
    args.signals_to_handle = "SIGHUP,SIGQUIT"
    if args.main_process_port is None and (args.num_machines or 1) == 1:
        # accelerate's default port (29500) would make two jobs on one machine collide.
        args.main_process_port = free_port()
    threading.Thread(target=_watch_workers, args=(WORKER_GRACE_S,), daemon=True, name="worker-watchdog").start()
    try:
        launch_command(args)
    except Exception as e:  # noqa: BLE001 - classify the workers' exit, then re-raise
        _reap_children()
        codes = _exit_codes(e)
        # Once the first worker exits, the agent SIGTERMs the others; one caught in its
        # tear-down shows as -15. The checkpoint was complete before any rank exited (saving is
        # collective, and the ranks leave together), so that still counts as a clean stop.
        stops = {EXIT_PREEMPTED, EXIT_INTERRUPTED}
        if codes and set(codes) & stops and set(codes) <= stops | {-signal.SIGTERM}:
            if EXIT_INTERRUPTED in codes:
                print("mnistdist.launch: the workers stopped on Ctrl-C (exit 130); run again with the "
                      "same --run-dir to resume from the newest checkpoint", file=sys.stderr, flush=True)
                return EXIT_INTERRUPTED
            print("mnistdist.launch: all workers stopped on request after writing a checkpoint (exit 75); "
                  "run again with the same --run-dir to resume", file=sys.stderr, flush=True)
            return EXIT_PREEMPTED
        first = _first_failure(e)
        if first:
            print(f"mnistdist.launch: training failed; first rank to exit: {first} (see the ranks' errors above)",
                  file=sys.stderr, flush=True)
            return 1
        raise
    finally:
        # A late signal (e.g. a scheduler's warning) must not kill us while Python shuts down.
        for sig in FORWARDED_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
    return 0


if __name__ == "__main__":
    sys.exit(main())
