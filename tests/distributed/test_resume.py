"""Exact resume through the real launcher: interrupted runs end bitwise equal to a golden run.

Interruptions are injected at exact steps with MNISTDIST_FAULT by tests/fault_train.py (run in
place of train_dist.py), which sends the real signal to one rank; one cut sends SIGUSR1 from outside
to the launcher. One run directory goes through the cuts in turn, each run resuming from the one
before (a chain: one process start per cut, and every resume is checked by the final comparison).

The runs train on the tiny synthetic MNIST in the real IDX format (tests/synthetic_mnist.py):
what is proven here is the exactness of resume, not accuracy, and a run then costs little more
than its start-up. 1,200 training images in global batches of 40 give 30 steps per epoch, 60 in
the 2 epochs; checkpoints every 20 steps (and at each epoch end), and the ranks agree on a stop
every 10 steps (``train.stop_check_every_steps``, the default), so an agreed stop after a
signal is mid-epoch at step 50, at the epoch boundary at step 30. lr 0.02 keeps every logged
training loss well above 0 (~0.01 at step 60) so that a skipped or repeated batch changes the
losses and the parameters, not only the step counter.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from mnistdist import checkpoint
from mnistdist.signals import EXIT_NONFINITE, EXIT_PREEMPTED
from mnistdist.rundir import read_metrics
from tests.conftest import (FAULT_TRAIN, REPO, agreed_stop, as_one_process, assert_same_run, check, child_env, launch_cmd,
                            outcome, run_cmd, train_cmd, train_in_process)
from tests.synthetic_mnist import write_synthetic_mnist

pytestmark = pytest.mark.distributed

STEPS_PER_EPOCH = 1200 // 40
ARGS = ["train.epochs=2", "train.global_batch_size=40", "train.lr=0.02", "train.log_every_steps=1",
        "checkpoint.every_steps=20", "tracking.plots=false"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A data root with 1,200 synthetic training and 200 test images."""
    return write_synthetic_mnist(tmp_path_factory.mktemp("data"), num_train=1200, num_test=200)


def env(data: Path, **extra: str) -> dict[str, str]:
    """child_env() on the synthetic data instead of real MNIST."""
    return child_env(MNISTDIST_DATA_ROOT=str(data), **extra)


def wrapper_cmd(cmd: list[str]) -> list[str]:
    """The same launch through ``python -m mnistdist.launch`` (forwards SIGUSR1)."""
    assert cmd[1] == "launch"
    return [sys.executable, "-m", "mnistdist.launch", *cmd[2:]]


@pytest.fixture(scope="module")
def golden(tmp_path_factory, data):
    run_dir = tmp_path_factory.mktemp("golden") / "run"
    check(run_cmd(launch_cmd(2, *ARGS, "--run-dir", str(run_dir)), env=env(data)))
    result = outcome(run_dir)
    assert len(result["losses"]) == 2 * STEPS_PER_EPOCH and len(result["evals"]) == 2
    assert min(loss for _, loss in result["losses"]) > 1e-3  # no vanishing gradients to hide a wrong batch
    return run_dir, result


def pending_signals(pid: int) -> int:
    """The signals pending for a process (thread and process-wide), as a bit mask."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["SigPnd"], 16) | int(fields["ShdPnd"], 16)


def stopped_children(pid: int) -> list[psutil.Process]:
    out = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if child.status() == psutil.STATUS_STOPPED:
                out.append(child)
        except psutil.Error:
            pass  # gone meanwhile
    return out


def external_sigusr1(cmd: list[str], fault_env: dict[str, str]) -> tuple[int, str, str]:
    """Run ``cmd`` (``python -m mnistdist.launch``, rank 0 stopping itself with SIGSTOP) and send
    SIGUSR1 to the launcher: no race with the end of the run, as the test waits until the
    launcher has passed it on to that worker (pending there), then lets the worker continue.
    Returns (exit code, stdout, stderr)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=fault_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        stopped: list[psutil.Process] = []
        while not stopped:
            assert proc.poll() is None and time.monotonic() < deadline, "run ended before rank 0 stopped"
            time.sleep(0.05)
            stopped = stopped_children(proc.pid)
        worker = stopped[0]
        proc.send_signal(signal.SIGUSR1)
        while not pending_signals(worker.pid) & (1 << (signal.SIGUSR1 - 1)):
            assert time.monotonic() < deadline, "the launcher did not pass SIGUSR1 on to the workers"
            time.sleep(0.02)
        worker.send_signal(signal.SIGCONT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, stdout, stderr


CUTS = [
    # (rank, step, action): the fault fires after that step on that rank. Each run of the chain
    # resumes from what the one before it left and is cut in turn; the last one runs to the end.
    (0, 5, "USR1"),  # SIGUSR1 from outside, to `python -m mnistdist.launch` (accelerate alone would die): agreed at 10
    (0, 25, "KILL"),  # mid-epoch 1: resumes from step 20, logged past it
    (1, 30, "KILL"),  # epoch 1's last step, before its evaluation: resumes from 20 again
    (0, 29, "TERM"),  # agreed at step 30, the epoch's last: the resume owes its evaluation
    (1, 45, "TERM"),  # agreed at step 50 (no scheduled checkpoint), in epoch 2
]


def test_a_chain_of_cuts_then_resumes_equals_golden(data, golden, tmp_path):
    """One run directory through every kind of cut in turn (see CUTS), all through
    tests/fault_train.py under ``python -m mnistdist.launch``; a last plain ``accelerate launch``
    finishes it. After each cut, the checkpoint is the one the cut must leave and every loss
    logged so far is the golden run's; at the end the run equals the golden run bitwise."""
    run_dir = tmp_path / "run"
    newest = None
    for rank, step, action in CUTS:
        cmd = wrapper_cmd(launch_cmd(2, *ARGS, "--run-dir", str(run_dir), script=FAULT_TRAIN))
        if action == "USR1":
            fault = env(data, MNISTDIST_FAULT=f"step={step},rank={rank},action=STOP")
            code, stdout, stderr = external_sigusr1(cmd, fault)
        else:
            first = run_cmd(cmd, env=env(data, MNISTDIST_FAULT=f"step={step},rank={rank},action={action}"))
            code, stdout, stderr = first.returncode, first.stdout, first.stderr
        where = f"cut {action} after step {step} on rank {rank}"
        if newest is None:
            assert "resumed from" not in stdout, where
        else:
            assert f"resumed from {newest}" in stdout, f"{where}:\n{stdout[-3000:]}"
        if action in ("TERM", "USR1"):
            # Every rank finished the same step, checkpointed, and exited 75.
            assert code == EXIT_PREEMPTED, f"{where}: {stderr[-3000:]}"
            stopped_at = agreed_stop(step)
            assert checkpoint.list_checkpoints(run_dir)[0].name == f"step-{stopped_at:08d}", where
            assert stderr.count("stopped by") == 1, where  # main only
            said = f"stopped by SIGUSR1 after step {stopped_at}" if action == "USR1" else f"after step {stopped_at}"
            assert said in stderr, f"{where}: {stderr[-3000:]}"
        else:
            assert code not in (0, EXIT_PREEMPTED), f"{where}: {stderr[-3000:]}"
            assert not (run_dir / "model.safetensors").exists(), where
            assert checkpoint.list_checkpoints(run_dir)[0].name == "step-00000020", where  # steps 21.. are redone
            logged = [r["step"] for r in read_metrics(run_dir) if "train_loss" in r]
            assert logged[-1] >= step - 1, where  # logged past the checkpoint: the resume must drop those lines
        losses = [(r["step"], r["train_loss"]) for r in read_metrics(run_dir) if "train_loss" in r]
        assert losses == golden[1]["losses"][:len(losses)], f"{where}: a logged loss differs from the golden run's"
        newest = checkpoint.list_checkpoints(run_dir)[0]
    resumed = check(run_cmd(launch_cmd(2, *ARGS, "--run-dir", str(run_dir)), env=env(data)))
    assert f"resumed from {newest}" in resumed.stdout
    assert_same_run(golden[1], outcome(run_dir))


def test_one_process_sigterm_and_resume(data, tmp_path):
    check(run_cmd(train_cmd(*ARGS, "--run-dir", str(tmp_path / "golden")), env=env(data)))
    run_dir = tmp_path / "run"
    first = run_cmd(train_cmd(*ARGS, "--run-dir", str(run_dir), script=FAULT_TRAIN),
                    env=env(data, MNISTDIST_FAULT="step=45,action=TERM"))
    assert first.returncode == EXIT_PREEMPTED and f"stopped by SIGTERM after step {agreed_stop(45)}" in first.stderr
    check(run_cmd(train_cmd(*ARGS, "--run-dir", str(run_dir)), env=env(data)))
    assert_same_run(outcome(tmp_path / "golden"), outcome(run_dir))


def test_damaged_newest_checkpoint_falls_back_to_previous(data, golden, tmp_path, capfd, monkeypatch):
    """The newest checkpoint (step 60) truncated: the run resumes from step 40, and since
    metrics.jsonl was logged up to step 60 the resume drops the lines after step 40 and logs
    those steps again, once."""
    run_dir = tmp_path / "run"
    shutil.copytree(golden[0] / "checkpoints", run_dir / "checkpoints")
    shutil.copy(golden[0] / "metrics.jsonl", run_dir / "metrics.jsonl")
    newest, previous = checkpoint.list_checkpoints(run_dir)[:2]
    assert (newest.name, previous.name) == ("step-00000060", "step-00000040")
    before = [r["step"] for r in read_metrics(run_dir) if "train_loss" in r]
    assert before == list(range(1, 61))  # so keeping them would duplicate steps 41-60
    model = newest / "model.safetensors"
    model.write_bytes(model.read_bytes()[:1000])  # truncated
    result = check(run_cmd(launch_cmd(2, *ARGS, "--run-dir", str(run_dir)), env=env(data)))
    assert f"skipping damaged checkpoint: {model}" in result.stdout + result.stderr
    assert f"resumed from {previous}" in result.stdout
    records = read_metrics(run_dir)
    assert [r["step"] for r in records if "train_loss" in r] == list(range(1, 61))
    assert [(r["epoch"], r["step"]) for r in records if "test_acc" in r] == [(1, 30), (2, 60)]
    assert_same_run(golden[1], outcome(run_dir))
    # Asked for explicitly, the damaged one is refused with the file named (a one-line error
    # before training: checked in this process).
    copy = tmp_path / "damaged"
    shutil.copytree(golden[0] / "checkpoints" / "step-00000060", copy)
    (copy / "optimizer.safetensors").write_bytes(b"\0" * 10)
    as_one_process(monkeypatch).setenv("MNISTDIST_DATA_ROOT", str(data))
    code, _, err = train_in_process(capfd, *ARGS, "--run-dir", str(tmp_path / "other"), "--resume", str(copy))
    assert code == 2 and f"{copy / 'optimizer.safetensors'}: 10 bytes" in err, err
    assert not (tmp_path / "other" / "checkpoints").exists()


def test_global_batch_change_is_refused(data, golden, tmp_path, capfd, monkeypatch):
    """Another number of processes resumes (tests/distributed/test_world_sizes.py); another
    global batch would change every batch from the checkpoint on, so it is refused (a one-line
    error before training: checked in this process)."""
    run_dir = tmp_path / "run"
    shutil.copytree(golden[0] / "checkpoints", run_dir / "checkpoints")
    as_one_process(monkeypatch).setenv("MNISTDIST_DATA_ROOT", str(data))
    code, _, err = train_in_process(capfd, *ARGS, "train.global_batch_size=20", "--run-dir", str(run_dir))
    assert code == 2, err
    assert "written with train.global_batch_size 40; this run has 20" in err
    assert "another --run-dir" in err and "--resume never" not in err
    assert "Traceback" not in err


def test_nan_on_one_rank_stops_all_ranks_at_that_step(data, tmp_path):
    run_dir = tmp_path / "run"
    fault = env(data, MNISTDIST_FAULT="step=50,rank=1,action=nan")
    result = run_cmd(launch_cmd(2, *ARGS, "--run-dir", str(run_dir), script=FAULT_TRAIN), env=fault)
    assert result.returncode != 0
    for rank in (0, 1):
        assert f"[rank {rank}] error: non-finite loss or gradient at step 50" in result.stderr
    assert f"exitcode  : {EXIT_NONFINITE}" in result.stderr
    steps = [int(p.name.split("-")[1]) for p in checkpoint.list_checkpoints(run_dir)]
    assert steps and max(steps) == 40  # nothing written at or after the bad step
    snap = checkpoint.load_checkpoint(checkpoint.list_checkpoints(run_dir)[0])
    assert all(torch.isfinite(t).all() for t in snap.model.values())
    assert not (run_dir / "model.safetensors").exists()


def test_resume_path_that_does_not_exist(tmp_path, capfd, monkeypatch):
    as_one_process(monkeypatch).setenv("MNISTDIST_DATA_ROOT", str(tmp_path))
    code, _, err = train_in_process(capfd, "--resume", str(tmp_path / "nope"), "--run-dir", str(tmp_path / "r"))
    assert code == 2
    assert err.strip() == f"error: --resume {tmp_path / 'nope'}: no such checkpoint directory"


def test_resume_never_refuses_a_run_dir_with_checkpoints(data, golden, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(golden[0] / "checkpoints", run_dir / "checkpoints")
    result = run_cmd(launch_cmd(2, *ARGS, "--run-dir", str(run_dir), "--resume", "never"), env=env(data))
    assert result.returncode != 0 and "--resume never:" in result.stderr and "already holds checkpoints" in result.stderr


def files(run_dir: Path) -> dict[str, tuple[int, bytes]]:
    """Every file of a run directory but its lock (whose holder line each job rewrites)."""
    return {str(p.relative_to(run_dir)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(run_dir.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_a_finished_run_stays_finished_on_every_rank(data, golden, tmp_path):
    """Decided on rank 0 under the lock, for both ranks: said once, exit 0, nothing written."""
    run_dir = tmp_path / "run"
    shutil.copytree(golden[0], run_dir)
    before = files(run_dir)
    result = check(run_cmd(wrapper_cmd(launch_cmd(2, *ARGS, "--run-dir", str(run_dir))), env=env(data)))
    assert result.stdout.count("already finished: ") == 1 and "resumed" not in result.stdout, result.stdout
    assert files(run_dir) == before


def test_a_run_directory_deleted_mid_run_stops_every_rank_together(data, tmp_path):
    """Rank 0 deletes the run directory after step 5; at the step-20 checkpoint both ranks stop
    together (no rank left waiting in a collective until dist.timeout_s), and it is said once."""
    run_dir = tmp_path / "run"
    fault = env(data, MNISTDIST_FAULT="step=5,rank=0,action=rmtree", MNISTDIST_FAULT_PATH=str(run_dir))
    started = time.monotonic()
    result = run_cmd(wrapper_cmd(launch_cmd(2, *ARGS, "dist.timeout_s=120", "--run-dir", str(run_dir),
                                            script=FAULT_TRAIN)), env=fault)
    assert time.monotonic() - started < 120
    assert result.returncode == 1, result.stderr[-3000:]
    said = [line for line in result.stderr.splitlines() if "deleted during the run" in line]
    assert len(said) == 1 and said[0].startswith("[rank 0] error: "), result.stderr[-3000:]
    assert "Traceback" not in result.stderr and not run_dir.exists()
