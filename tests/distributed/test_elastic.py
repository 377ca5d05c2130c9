"""The launcher wrapper and torchrun's elastic agent: healthy jobs are never killed, a lost
worker or node is replaced from the newest checkpoint, and the job still ends like an
uninterrupted one-process run (float64, to 1e-12), with every step logged once, one W&B run and
a valid newest checkpoint. A requested stop is never restarted; start-up is bounded.

Synthetic MNIST in the real IDX format: 1,200 images, global batch 40, 30 steps an epoch, 60 in
all; a checkpoint every 20 steps and at each epoch's end; the ranks agree on stops every 10.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from mnistdist import checkpoint
from mnistdist.launch import free_port
from mnistdist.rundir import read_metrics
from mnistdist.signals import EXIT_PREEMPTED
from tests.conftest import FAULT_TRAIN, REPO, check, child_env, launch_cmd, run_cmd, train_cmd
from tests.synthetic_mnist import write_synthetic_mnist

pytestmark = pytest.mark.distributed

STEPS = 60
ARGS = ["train.epochs=2", "train.global_batch_size=40", "train.lr=0.02", "train.log_every_steps=1",
        "checkpoint.every_steps=20", "model.dtype=float64", "dist.timeout_s=30", "tracking.plots=false"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_synthetic_mnist(tmp_path_factory.mktemp("data"), num_train=1200, num_test=200)


@pytest.fixture(scope="module")
def golden(tmp_path_factory, data) -> dict:
    """The same training, uninterrupted, on one process."""
    run_dir = tmp_path_factory.mktemp("golden") / "run"
    check(run_cmd(train_cmd(*ARGS, "--run-dir", str(run_dir)), env=child_env(MNISTDIST_DATA_ROOT=str(data))))
    return {"params": load_file(run_dir / "model.safetensors"), "losses": losses(run_dir)}


def losses(run_dir: Path) -> dict[int, float]:
    """step -> logged training loss; every step must be there exactly once."""
    steps = [r["step"] for r in read_metrics(run_dir) if "train_loss" in r]
    assert steps == list(range(1, STEPS + 1)), f"steps logged: {steps}"
    return {r["step"]: r["train_loss"] for r in read_metrics(run_dir) if "train_loss" in r}


def assert_like_golden(golden: dict, run_dir: Path) -> None:
    """Within 1e-12 of the one-process run: every step's loss and the final parameters; the
    newest checkpoint verifies."""
    got = losses(run_dir)
    for step, loss in golden["losses"].items():
        assert abs(got[step] - loss) <= 1e-12 * max(1.0, abs(loss)), (step, got[step], loss)
    params = load_file(run_dir / "model.safetensors")
    for name, value in golden["params"].items():
        assert torch.allclose(params[name], value, rtol=0, atol=1e-12), name
    newest = checkpoint.list_checkpoints(run_dir)[0]
    checkpoint.load_checkpoint(newest)
    assert newest.name == f"step-{STEPS:08d}"


def wrapper_cmd(num_processes: int, *args: str, launcher_args: tuple[str, ...] = (),
                script: Path | None = None) -> list[str]:
    """``python -m mnistdist.launch`` with the arguments of ``launch_cmd``."""
    cmd = launch_cmd(num_processes, *args, script=script)
    return [sys.executable, "-m", "mnistdist.launch", *launcher_args, *cmd[2:]]


def test_short_lived_helper_processes_are_not_mistaken_for_workers(data, tmp_path):
    """accelerate runs `nvidia-smi` from the launcher before the workers start; on a GPU node
    it takes a while. Its exit must not look like a rank that ended (the job would be killed)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\nsleep 1\nexit 1\n")  # slow, and finds no GPU
    (fake / "nvidia-smi").chmod(0o755)
    env = child_env(MNISTDIST_DATA_ROOT=str(data), PATH=f"{fake}:{child_env()['PATH']}")
    # 10 epochs: the workers live well over the wrapper's 5 s grace after the helper exited.
    result = run_cmd(wrapper_cmd(2, "train.global_batch_size=120", "train.epochs=10",
                                 "--run-dir", str(tmp_path / "run")), env=env)
    check(result)
    assert "killing it" not in result.stderr
    assert (tmp_path / "run" / "summary.json").is_file()


RESTART_CASES = {
    # name: (rank, MNISTDIST_FAULT action, step): where the first generation loses a worker
    "sigkill-mid-epoch": (1, "KILL", 25),  # after the step-20 checkpoint; resumes from it
    "sigkill-during-a-save": (0, "KILL_IN_SAVE", 40),  # the step-40 save half written; resumes from 30
}


@pytest.mark.parametrize("case", list(RESTART_CASES))
def test_a_lost_worker_is_replaced_and_the_run_ends_like_one_process(data, golden, tmp_path, case):
    rank, action, step = RESTART_CASES[case]
    run_dir = tmp_path / "run"
    env = child_env(MNISTDIST_DATA_ROOT=str(data), WANDB_MODE="offline",
                    MNISTDIST_FAULT=f"step={step},rank={rank},action={action}")
    started = time.monotonic()
    result = run_cmd(wrapper_cmd(2, *ARGS, "--run-dir", str(run_dir), launcher_args=("--max_restarts", "2"),
                                 script=FAULT_TRAIN), env=env)
    print(f"{case}: whole job {time.monotonic() - started:.1f} s")
    check(result)
    assert result.stderr.count("restarting the workers from the newest checkpoint (restart 1 of 2)") == 1
    assert f"rank {rank} exited (exit -9, SIGKILL)" in result.stderr
    resumed = {"KILL": 20, "KILL_IN_SAVE": 30}[action]
    assert f"resumed from {run_dir / 'checkpoints' / f'step-{resumed:08d}'} at step {resumed}" in result.stdout
    assert_like_golden(golden, run_dir)
    ids = {run.name.rsplit("-", 1)[1] for run in (run_dir / "wandb").glob("offline-run-*")}
    assert ids == {(run_dir / "wandb_run_id").read_text().strip()}  # both generations: one W&B run


def wait_for_checkpoint(proc: subprocess.Popen, run_dir: Path, step: int, limit_s: float = 240) -> None:
    deadline = time.monotonic() + limit_s
    while not (run_dir / "checkpoints" / f"step-{step:08d}").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)


def test_a_requested_stop_is_not_restarted(data, tmp_path):
    """SIGTERM to the job: the workers checkpoint and exit 75, and the agent, which counts
    any non-zero exit as a failure, must not start a new generation."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(wrapper_cmd(2, *ARGS, "train.epochs=20", "--run-dir", str(run_dir),
                                        launcher_args=("--max_restarts", "3")),
                            cwd=REPO, env=child_env(MNISTDIST_DATA_ROOT=str(data)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(proc, run_dir, 20)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, stderr[-3000:]
    assert "restarting" not in stderr and stdout.count("training on 2 process(es)") == 1
    assert "all workers stopped on request after writing a checkpoint (exit 75)" in stderr
    stopped = int(re.search(r"stopped by SIGTERM after step (\d+)", stderr).group(1))
    assert checkpoint.list_checkpoints(run_dir)[0].name == f"step-{stopped:08d}"


def handles(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler for ``signum`` (its SigCgt mask in /proc)."""
    caught = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) & (1 << (signum - 1)))


def test_a_stop_before_any_worker_exists_ends_the_job(data, tmp_path):
    """A SIGTERM that arrives while the launcher starts is kept, not lost: nothing is trained."""
    proc = subprocess.Popen(wrapper_cmd(2, *ARGS, "--run-dir", str(tmp_path / "run")), cwd=REPO,
                            env=child_env(MNISTDIST_DATA_ROOT=str(data)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not handles(proc.pid, signal.SIGTERM):  # the launcher's handler is installed, no worker yet
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    assert not psutil.Process(proc.pid).children()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, stderr[-3000:]
    assert "Traceback" not in stderr
    assert not (tmp_path / "run" / "summary.json").exists()


def test_ctrl_c_through_the_launcher_is_one_line_with_wandb(data, tmp_path):
    """Ctrl-C reaches the launcher (the workers run in sessions of their own): it passes the
    stop to the workers only, not to W&B's helper process, whose death would print a traceback."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(wrapper_cmd(2, *ARGS, "train.epochs=20", "--run-dir", str(run_dir)), cwd=REPO,
                            env=child_env(MNISTDIST_DATA_ROOT=str(data), WANDB_MODE="offline"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(proc, run_dir, 20)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "finish failed" not in stderr, stderr[-3000:]
    assert "the workers stopped on Ctrl-C (exit 130)" in stderr
    assert "wandb:" not in stderr, stderr[-3000:]  # W&B finished the run (its helper was left alone)


def listens(pid: int, port: int) -> bool:
    return any(c.laddr.port == port and c.status == psutil.CONN_LISTEN
               for c in psutil.Process(pid).net_connections())


def test_a_lost_node_shrinks_the_job_and_the_run_ends_like_one_process(data, golden, tmp_path):
    """Two agents (``--nnodes 1:2``, c10d rendezvous), one killed with its worker as a node
    dies: the survivor re-forms the job with 1 process, resumes and finishes."""
    run_dir, port = tmp_path / "run", free_port()
    agent = [sys.executable, "-m", "mnistdist.launch", "torchrun", "--nnodes", "1:2", "--nproc_per_node", "1",
             "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "shrink", "--rdzv-conf", "last_call_timeout=5,keep_alive_interval=1,keep_alive_max_attempt=3",
             "--max-restarts", "2", str(REPO / "train_dist.py"), *ARGS, "--run-dir", str(run_dir)]
    env = child_env(MNISTDIST_DATA_ROOT=str(data))
    logs = [(tmp_path / f"agent{i}.out", tmp_path / f"agent{i}.err") for i in range(2)]
    procs = []
    try:
        deadline = time.monotonic() + 240
        for out, err in logs:
            procs.append(subprocess.Popen(agent, cwd=REPO, env=env, stdout=open(out, "w"), stderr=open(err, "w")))
            # The first agent hosts the rendezvous store (as the node at --rdzv-endpoint does): a
            # job survives the loss of any other node, not of that one (docs/reliability.md).
            while not listens(procs[0].pid, port):
                assert procs[0].poll() is None and time.monotonic() < deadline, err.read_text()[-3000:]
                time.sleep(0.05)
        while not (run_dir / "checkpoints" / "step-00000020").exists():
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline
            time.sleep(0.02)
        doomed = psutil.Process(procs[1].pid)
        for p in [doomed, *doomed.children(recursive=True)]:  # the node dies: agent and worker at once
            p.kill()
        killed = time.monotonic()
        while "resumed from" not in logs[0][0].read_text():
            assert procs[0].poll() is None and time.monotonic() < deadline, logs[0][1].read_text()[-3000:]
            time.sleep(0.05)
        print(f"the survivor resumed {time.monotonic() - killed:.1f} s after the other node died")
        assert procs[0].wait(timeout=240) == 0, logs[0][1].read_text()[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    out = logs[0][0].read_text()
    assert "training on 1 process(es)" in out and "(written by 2 process(es))" in out
    assert_like_golden(golden, run_dir)


def test_a_process_group_that_does_not_come_up_is_one_line_within_the_timeout(data, tmp_path):
    """Rank 0 of 2, its peer never starts: bounded by dist.timeout_s, one line."""
    env = child_env(MNISTDIST_DATA_ROOT=str(data), WORLD_SIZE="2", RANK="0", LOCAL_RANK="0",
                    LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    started = time.monotonic()
    result = run_cmd(train_cmd("dist.timeout_s=5", "--run-dir", str(tmp_path / "run")), env=env, timeout=120)
    took = time.monotonic() - started
    print(f"gave up after {took:.1f} s")
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert "the process group of 2 processes did not come up within dist.timeout_s=5" in line
    assert "127.0.0.1" in line


def test_a_rendezvous_that_does_not_complete_is_one_line(data, tmp_path):
    """One agent of a two-node job: the c10d rendezvous gives up after join_timeout."""
    cmd = [sys.executable, "-m", "mnistdist.launch", "torchrun", "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "alone",
           "--rdzv-conf", "join_timeout=5", str(REPO / "train_dist.py"), "--run-dir", str(tmp_path / "run")]
    result = run_cmd(cmd, env=child_env(MNISTDIST_DATA_ROOT=str(data)), timeout=120)
    assert result.returncode == 1
    assert "mnistdist.launch: the rendezvous did not complete" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
