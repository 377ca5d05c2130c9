"""Stopping on purpose keeps its promises: Ctrl-C (once, twice, to a group or one process),
SIGTERM to the launcher, a launcher that dies, and a main process finishing W&B while the
others are done. CPU, gloo, real launchers."""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from mnistdist import checkpoint
from mnistdist.ranks import SPEAKER_WAIT_S
from mnistdist.signals import EXIT_INTERRUPTED, EXIT_PREEMPTED
from tests.conftest import FAULT_TRAIN, REPO, child_env, launch_cmd, train_cmd
from tests.faults.test_faults import wait_for

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]

ARGS = ["train.epochs=2", "checkpoint.every_steps=50"]


def wrapper(*args: str) -> list[str]:
    return [sys.executable, "-m", "mnistdist.launch", *launch_cmd(2, *args)[2:]]


def start(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    # Its own session: the test can signal the whole group, as a terminal's Ctrl-C does.
    return subprocess.Popen(cmd, cwd=REPO, env=env or child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def no_traceback_of_ours(stderr: str) -> None:
    """No Python traceback from the workers (the launcher's own agent may print its own)."""
    assert "mnistdist/" not in "".join(line for line in stderr.splitlines(True) if line.startswith('  File "')), \
        stderr[-3000:]
    assert "KeyboardInterrupt" not in stderr


def stop_steps(stderr: str) -> list[int]:
    return [int(line.split("after step ")[1].split(";")[0]) for line in stderr.splitlines() if "stopped by SIG" in line]


@pytest.mark.parametrize("launcher", ["train_dist", "mnistdist.launch"])
def test_ctrl_c_is_a_clean_stop_with_a_checkpoint_and_exit_130(tmp_path, launcher):
    run_dir = tmp_path / "run"
    args = [*ARGS, "--run-dir", str(run_dir)]
    proc = start(train_cmd(*args) if launcher == "train_dist" else wrapper(*args))
    wait_for(run_dir / "checkpoints" / "step-00000050", proc)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, stderr[-3000:]
    assert "Traceback" not in stderr
    steps = stop_steps(stderr)
    assert len(steps) == 1, stderr[-3000:]  # one line, from the main process
    assert checkpoint.list_checkpoints(run_dir)[0].name == f"step-{steps[0]:08d}"
    checkpoint.load_checkpoint(checkpoint.list_checkpoints(run_dir)[0])
    assert "run again with the same --run-dir to resume" in stderr
    if launcher == "mnistdist.launch":
        assert "mnistdist.launch: the workers stopped on Ctrl-C (exit 130)" in stderr


def test_ctrl_c_under_plain_accelerate_launch_checkpoints_without_worker_tracebacks(tmp_path):
    run_dir = tmp_path / "run"
    proc = start(launch_cmd(2, *ARGS, "--run-dir", str(run_dir)))
    wait_for(run_dir / "checkpoints" / "step-00000050", proc)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    no_traceback_of_ours(stderr)  # torchrun's agent prints its own SignalException: theirs
    steps = stop_steps(stderr)
    assert len(steps) == 1 and checkpoint.list_checkpoints(run_dir)[0].name == f"step-{steps[0]:08d}", stderr[-3000:]


def stub_wandb_env(marker: Path, finish_s: float, **extra: str) -> dict[str, str]:
    """W&B replaced by tests/faults/stub_wandb: its finish() takes ``finish_s`` seconds."""
    return child_env(WANDB_MODE="offline", STUB_WANDB_FINISH_S=str(finish_s), STUB_WANDB_MARKER=str(marker),
                     PYTHONPATH=os.pathsep.join([str(Path(__file__).parent / "stub_wandb"), str(REPO)]), **extra)


def test_a_second_ctrl_c_exits_at_once(tmp_path):
    run_dir, marker = tmp_path / "run", tmp_path / "wandb-finished"
    # After the first Ctrl-C the ranks checkpoint; then rank 0 waits up to 60 s for W&B to finish.
    proc = start(wrapper(*ARGS, "tracking.finish_timeout_s=90", "--run-dir", str(run_dir)),
                 env=stub_wandb_env(marker, finish_s=60))
    wait_for(run_dir / "checkpoints" / "step-00000050", proc)
    os.killpg(proc.pid, signal.SIGINT)
    deadline = time.monotonic() + 60
    while checkpoint.list_checkpoints(run_dir)[0].name == "step-00000050":  # the stop's checkpoint
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    time.sleep(1.5)  # a second press, well after the first
    os.killpg(proc.pid, signal.SIGINT)
    pressed = time.monotonic()
    _, stderr = proc.communicate(timeout=60)
    took = time.monotonic() - pressed
    assert took < 10, f"took {took:.1f} s after the second Ctrl-C"
    assert proc.returncode == EXIT_INTERRUPTED, stderr[-3000:]
    assert "Traceback" not in stderr
    assert stderr.count("interrupted again: exiting now without a checkpoint") == 1, stderr[-3000:]
    assert not marker.exists()  # it really did not wait for W&B
    checkpoint.load_checkpoint(checkpoint.list_checkpoints(run_dir)[0])  # the newest checkpoint stays valid


def test_sigterm_to_the_launcher_exits_75_after_the_workers_checkpointed(tmp_path):
    run_dir = tmp_path / "run"
    proc = start(wrapper(*ARGS, "--run-dir", str(run_dir)))
    wait_for(run_dir / "checkpoints" / "step-00000050", proc)
    proc.send_signal(signal.SIGTERM)  # to the launcher only
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, stderr[-3000:]
    steps = stop_steps(stderr)
    assert len(steps) == 1 and checkpoint.list_checkpoints(run_dir)[0].name == f"step-{steps[0]:08d}"
    assert "all workers stopped on request after writing a checkpoint (exit 75)" in stderr
    assert "Traceback" not in stderr


def test_workers_stop_when_their_launcher_is_killed(tmp_path):
    run_dir = tmp_path / "run"
    proc = start(wrapper(*ARGS, "--run-dir", str(run_dir)))
    wait_for(run_dir / "checkpoints" / "step-00000050", proc)
    workers = psutil.Process(proc.pid).children()
    assert len(workers) == 2
    proc.kill()  # SIGKILL: the launcher cannot pass anything on
    killed = time.monotonic()
    gone, alive = psutil.wait_procs(workers, timeout=30)
    took = time.monotonic() - killed
    for p in alive:
        p.kill()
    assert not alive, f"workers still running {took:.1f} s after their launcher died"
    assert took < 10, took
    print(f"workers gone {took:.1f} s after the launcher's SIGKILL")
    newest = checkpoint.load_latest(run_dir)
    assert newest is not None and newest.step > 50  # they checkpointed on the way out


def test_the_main_process_finishes_wandb_before_the_job_ends(tmp_path):
    """Under plain accelerate launch, a rank that exits first makes torchrun SIGTERM the others;
    after a preemption every rank must wait until rank 0 has finished W&B."""
    run_dir, marker = tmp_path / "run", tmp_path / "wandb-finished"
    env = stub_wandb_env(marker, finish_s=4, MNISTDIST_FAULT="step=60,rank=1,action=TERM")
    proc = start(launch_cmd(2, *ARGS, "--run-dir", str(run_dir), script=FAULT_TRAIN), env=env)
    _, stderr = proc.communicate(timeout=180)
    assert marker.is_file(), f"W&B never finished on rank 0:\n{stderr[-3000:]}"
    assert marker.read_text().strip() == f"finished with exit code {EXIT_PREEMPTED}"
    # Rank 0 ended on its own, not SIGTERMed: torchrun's failure report lists each rank's code.
    assert re.search(r"rank +: 0 \(local_rank: 0\)\s+exitcode +: 75 ", stderr), stderr[-3000:]


def test_an_error_decided_on_rank_0_is_said_once_after_its_wandb_finish(tmp_path):
    """A failure decided on rank 0 (the disk fills up at a save) is raised on every rank
    together (Dist.on_main). The ranks leave together once rank 0 has finished W&B, which takes
    longer here than a rank waits for rank 0 to say an error (ranks.SPEAKER_WAIT_S): so rank 0
    says it, once (rank 1 does not give up waiting and say it too), and exits on its own (2)."""
    run_dir, marker = tmp_path / "run", tmp_path / "wandb-finished"
    proc = start(launch_cmd(2, *ARGS, "--run-dir", str(run_dir)),
                 env=stub_wandb_env(marker, finish_s=SPEAKER_WAIT_S + 3))
    wait_for(run_dir / "checkpoints" / "step-00000050", proc)
    for worker in psutil.Process(proc.pid).children(recursive=True):  # the disk is now "full"
        resource.prlimit(worker.pid, resource.RLIMIT_FSIZE, (65536, 65536))
    _, stderr = proc.communicate(timeout=180)
    assert marker.is_file(), f"W&B never finished on rank 0:\n{stderr[-3000:]}"
    assert stderr.count("error: cannot write checkpoint in") == 1 and "[rank 1]" not in stderr, stderr[-3000:]
    assert re.search(r"rank +: 0 \(local_rank: 0\)\s+exitcode +: 2 ", stderr), stderr[-3000:]


def test_sigterm_stops_with_a_checkpoint_while_wandb_hangs(tmp_path):
    """A W&B call that never returns (the stub's run.log) holds neither training nor a stop:
    SIGTERM still gives the agreed stop, a checkpoint and exit 75, with one line about W&B."""
    run_dir, marker = tmp_path / "run", tmp_path / "wandb-stub"
    env = stub_wandb_env(marker, finish_s=0, STUB_WANDB_HANG="log")
    proc = start(wrapper(*ARGS, "tracking.finish_timeout_s=5", "--run-dir", str(run_dir)), env=env)
    try:
        wait_for(marker, proc)  # the main process's W&B is stuck in run.log from here on
        wait_for(run_dir / "checkpoints" / "step-00000100", proc)  # and training goes on
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == EXIT_PREEMPTED, stderr[-3000:]
    steps = stop_steps(stderr)
    assert len(steps) == 1 and checkpoint.list_checkpoints(run_dir)[0].name == f"step-{steps[0]:08d}", stderr[-3000:]
    checkpoint.load_checkpoint(checkpoint.list_checkpoints(run_dir)[0])
    assert "Traceback" not in stderr
    warnings = [line for line in stderr.splitlines() if line.startswith("wandb:")]
    assert len(warnings) == 1 and "W&B is off for the rest of this run" in warnings[0], stderr[-3000:]
    assert marker.read_text() == "hanging in log\n"  # never finished: it was given up
