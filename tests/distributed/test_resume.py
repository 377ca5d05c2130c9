"""Exact resume through the real launcher: interrupted runs end bitwise equal to a golden run.

Interruptions are injected at exact steps with MNISTDIST_FAULT (see mnistdist/signals.py),
which sends the real signal to one rank; one case sends SIGUSR1 from outside to the launcher.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from mnistdist import checkpoint
from mnistdist.signals import EXIT_NONFINITE, EXIT_PREEMPTED
from mnistdist.rundir import read_metrics
from tests.conftest import REPO, agreed_stop, assert_same_run, check, child_env, launch_cmd, outcome, run_cmd, train_cmd

pytestmark = pytest.mark.distributed

ARGS = ["train.epochs=2", "train.log_every_steps=1", "checkpoint.every_steps=100"]


def wrapper_cmd(cmd: list[str]) -> list[str]:
    """The same launch through ``python -m mnistdist.launch`` (forwards SIGUSR1)."""
    assert cmd[1] == "launch"
    return [sys.executable, "-m", "mnistdist.launch", *cmd[2:]]


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("golden") / "run"
    check(run_cmd(launch_cmd(2, *ARGS, "--run-dir", str(run_dir))))
    result = outcome(run_dir)
    assert len(result["losses"]) == 600 and len(result["evals"]) == 2
    return run_dir, result


CASES = {
    # name: (rank, step, signal) -- the fault fires after that step on that rank
    "sigkill-mid-epoch": (0, 150, "KILL"),
    "sigterm-mid-epoch": (1, 250, "TERM"),
    "sigkill-epoch-boundary": (1, 300, "KILL"),
    "sigterm-epoch-boundary": (0, 299, "TERM"),  # agreed at step 300, the epoch's last
}


@pytest.mark.parametrize("case", list(CASES))
def test_interrupted_then_resumed_equals_golden(golden, tmp_path, case):
    rank, step, sig = CASES[case]
    run_dir = tmp_path / "run"
    env = child_env(MNISTDIST_FAULT=f"step={step},rank={rank},action={sig}")
    first = run_cmd(wrapper_cmd(launch_cmd(2, *ARGS, "--run-dir", str(run_dir))), env=env)
    if sig == "TERM":
        # Every rank finished the same step, checkpointed, and exited 75.
        assert first.returncode == EXIT_PREEMPTED, first.stderr[-3000:]
        stopped_at = agreed_stop(step)
        assert checkpoint.list_checkpoints(run_dir)[0].name == f"step-{stopped_at:08d}"
        assert first.stderr.count("stopped by") == 1 and f"after step {stopped_at}" in first.stderr  # main only
    else:
        assert first.returncode not in (0, EXIT_PREEMPTED), first.stderr[-3000:]
        assert not (run_dir / "model.safetensors").exists()
    resumed = check(run_cmd(launch_cmd(2, *ARGS, "--run-dir", str(run_dir))))
    assert "resumed from" in resumed.stdout
    assert_same_run(golden[1], outcome(run_dir))


def test_external_sigusr1_to_the_launcher(golden, tmp_path):
    """SIGUSR1 sent to `python -m mnistdist.launch` reaches the workers (accelerate alone would die)."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(wrapper_cmd(launch_cmd(2, *ARGS, "--run-dir", str(run_dir))), cwd=REPO,
                            env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (run_dir / "checkpoints" / "step-00000100").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "run ended before the first checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, stderr[-3000:]
    assert "stopped by SIGUSR1" in stderr
    check(run_cmd(launch_cmd(2, *ARGS, "--run-dir", str(run_dir))))
    assert_same_run(golden[1], outcome(run_dir))


def test_one_process_sigterm_and_resume(tmp_path):
    args = ["train.epochs=1", "train.log_every_steps=1", "checkpoint.every_steps=100"]
    check(run_cmd(train_cmd(*args, "--run-dir", str(tmp_path / "golden"))))
    run_dir = tmp_path / "run"
    first = run_cmd(train_cmd(*args, "--run-dir", str(run_dir)), env=child_env(MNISTDIST_FAULT="step=120,action=TERM"))
    assert first.returncode == EXIT_PREEMPTED and f"stopped by SIGTERM after step {agreed_stop(120)}" in first.stderr
    check(run_cmd(train_cmd(*args, "--run-dir", str(run_dir))))
    assert_same_run(outcome(tmp_path / "golden"), outcome(run_dir))


def test_damaged_newest_checkpoint_falls_back_to_previous(golden, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(golden[0] / "checkpoints", run_dir / "checkpoints")
    shutil.copy(golden[0] / "metrics.jsonl", run_dir / "metrics.jsonl")
    newest, previous = checkpoint.list_checkpoints(run_dir)[:2]
    assert (newest.name, previous.name) == ("step-00000600", "step-00000500")
    model = newest / "model.safetensors"
    model.write_bytes(model.read_bytes()[:1000])  # truncated
    result = check(run_cmd(launch_cmd(2, *ARGS, "--run-dir", str(run_dir))))
    assert f"skipping damaged checkpoint: {model}" in result.stdout + result.stderr
    assert f"resumed from {previous}" in result.stdout
    assert_same_run(golden[1], outcome(run_dir))
    # Asked for explicitly, the damaged one is refused with the file named.
    copy = tmp_path / "damaged"
    shutil.copytree(golden[0] / "checkpoints" / "step-00000600", copy)
    (copy / "optimizer.safetensors").write_bytes(b"\0" * 10)
    bad = run_cmd(launch_cmd(2, *ARGS, "--run-dir", str(tmp_path / "other"), "--resume", str(copy)))
    assert bad.returncode != 0 and f"{copy / 'optimizer.safetensors'}: 10 bytes" in bad.stderr


def test_global_batch_change_is_refused(golden, tmp_path):
    """Another number of processes resumes (tests/distributed/test_world_sizes.py); another
    global batch would change every batch from the checkpoint on, so it is refused."""
    run_dir = tmp_path / "run"
    shutil.copytree(golden[0] / "checkpoints", run_dir / "checkpoints")
    result = run_cmd(train_cmd(*ARGS, "train.global_batch_size=100", "--run-dir", str(run_dir)))
    assert result.returncode == 2
    assert "written with train.global_batch_size 200; this run has 100" in result.stderr
    assert "another --run-dir" in result.stderr and "--resume never" not in result.stderr
    assert "Traceback" not in result.stderr


def test_nan_on_one_rank_stops_all_ranks_at_that_step(tmp_path):
    run_dir = tmp_path / "run"
    env = child_env(MNISTDIST_FAULT="step=50,rank=1,action=nan")
    result = run_cmd(launch_cmd(2, "train.epochs=1", "checkpoint.every_steps=20", "--run-dir", str(run_dir)), env=env)
    assert result.returncode != 0
    for rank in (0, 1):
        assert f"[rank {rank}] error: non-finite loss or gradient at step 50" in result.stderr
    assert f"exitcode  : {EXIT_NONFINITE}" in result.stderr
    steps = [int(p.name.split("-")[1]) for p in checkpoint.list_checkpoints(run_dir)]
    assert steps and max(steps) == 40  # nothing written at or after the bad step
    snap = checkpoint.load_checkpoint(checkpoint.list_checkpoints(run_dir)[0])
    assert all(torch.isfinite(t).all() for t in snap.model.values())
    assert not (run_dir / "model.safetensors").exists()


def test_resume_path_that_does_not_exist(tmp_path):
    result = run_cmd(train_cmd("--resume", str(tmp_path / "nope"), "--run-dir", str(tmp_path / "r")))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: --resume {tmp_path / 'nope'}: no such checkpoint directory"


def test_resume_never_refuses_a_run_dir_with_checkpoints(golden, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(golden[0] / "checkpoints", run_dir / "checkpoints")
    result = run_cmd(launch_cmd(2, *ARGS, "--run-dir", str(run_dir), "--resume", "never"))
    assert result.returncode != 0 and "--resume never:" in result.stderr and "already holds checkpoints" in result.stderr


def test_metrics_are_not_duplicated_after_resume(golden, tmp_path):
    """A run killed after logging past its last checkpoint: the resumed run drops the lines
    after the checkpoint and logs those steps again, once."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(golden[0] / "checkpoints" / "step-00000500", run_dir / "checkpoints" / "step-00000500")
    shutil.copy(golden[0] / "metrics.jsonl", run_dir / "metrics.jsonl")  # logged up to step 600
    before = [r["step"] for r in read_metrics(run_dir) if "train_loss" in r]
    assert before == list(range(1, 601))  # so keeping them would duplicate steps 501-600
    result = check(run_cmd(launch_cmd(2, *ARGS, "--run-dir", str(run_dir))))
    assert f"resumed from {run_dir / 'checkpoints' / 'step-00000500'}" in result.stdout
    records = read_metrics(run_dir)
    assert [r["step"] for r in records if "train_loss" in r] == list(range(1, 601))
    assert [(r["epoch"], r["step"]) for r in records if "test_acc" in r] == [(1, 300), (2, 600)]
    assert_same_run(golden[1], outcome(run_dir))


