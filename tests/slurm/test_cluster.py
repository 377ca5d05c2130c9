"""The Slurm templates on a real Slurm cluster: two slurmd "nodes" (CPUs=2 each) on this machine.

* 2 nodes x 1 process gives exactly the result of 2 local processes;
* each node's task may run on the CPUs the job asked for (--cpus-per-task);
* SIGUSR1 to the batch script (what `#SBATCH --signal=B:USR1@LEAD` sends) checkpoints,
  requeues, resumes, and ends bitwise equal to an uninterrupted run, in the same W&B run;
* a job whose time limit is too short for the run gets the warning signal from Slurm itself,
  requeues itself as often as needed and ends bitwise equal to an uninterrupted run.

Timing on the test cluster (see scripts/slurm_cluster.sh): Slurm checks time limits every
30 s and sends `--signal=B:USR1@L` at the first check with at most L + 30 s left; a requeued
job may start again cred_expire + 1 = 11 s later.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mnistdist.rundir import read_metrics
from tests.conftest import REPO, assert_same_run, child_env, launch_cmd, outcome, run_cmd
from tests.slurm.conftest import TERMINAL_STATES

pytestmark = [pytest.mark.slurm, pytest.mark.distributed]

# The preemption case: 600 steps, a checkpoint every 50 steps.
SHORT = ["train.epochs=2", "checkpoint.every_steps=50"]
# The time-limit case: 300 steps; the job's first run is slowed down (see that test).
ONE_EPOCH = ["train.epochs=1", "checkpoint.every_steps=50"]


def assert_finished(job, info: dict) -> None:
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", job.describe()


class LocalRun:
    """The same config trained without interruption by 2 local processes, in the background
    (it overlaps with the Slurm job's start-up and requeue waits). As a context manager it is
    killed on leaving, if still running (a failed wait must not leave it behind)."""

    def __init__(self, run_dir: Path, *args: str):
        self.run_dir = run_dir
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        self.log = run_dir.parent / f"{run_dir.name}.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(launch_cmd(2, *args, "--run-dir", str(run_dir)), cwd=REPO,
                                         env=child_env(), stdout=log, stderr=subprocess.STDOUT)

    def outcome(self, timeout: float = 300) -> dict:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        assert code == 0, f"local run failed (exit {code}):\n{self.log.read_text()[-4000:]}"
        return outcome(self.run_dir)

    def __enter__(self) -> "LocalRun":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.mark.timeout(300)
def test_two_nodes_equal_two_local_processes(slurm_cluster, tmp_path):
    run_dir = tmp_path / "slurm"
    job = slurm_cluster.submit("cpu.sbatch", tmp_path, "--nodes=2", RUN_DIR=str(run_dir),
                               OVERRIDES="train.epochs=1")
    with LocalRun(tmp_path / "local", "train.epochs=1") as local:
        info = job.wait_done(timeout=240)
        expected = local.outcome()
    assert_finished(job, info)
    log = job.log_text()
    # One launcher per node, each with its own machine rank (expanded on the node itself).
    assert "task on node1: machine rank 0" in log and "task on node2: machine rank 1" in log, log
    assert "training on 2 process(es), cpu, backend gloo" in log
    assert re.search(r"running: srun .*mnistdist\.launch.* --num_machines 2 --num_processes 2 "
                     rf"--main_process_ip node1 --main_process_port {20000 + job.job_id % 20000} ", log)
    [slurm_eval] = [r for r in read_metrics(run_dir) if "test_correct" in r]
    [local_eval] = [r for r in read_metrics(local.run_dir) if "test_correct" in r]
    assert slurm_eval["test_correct"] == local_eval["test_correct"]
    assert slurm_eval["test_loss"] == local_eval["test_loss"]
    assert_same_run(expected, outcome(run_dir))


PROBE = """#!{python}
# Stands in for PYTHON in a job: each node's task records the CPUs it may run on and the
# launcher arguments it got, then exits 0.
import json, os, sys
with open(os.path.join(os.environ["PROBE_DIR"], "task-" + os.environ["SLURM_NODEID"] + ".json"), "w") as f:
    json.dump({{"cpus": sorted(os.sched_getaffinity(0)), "args": sys.argv[1:]}}, f)
"""


@pytest.mark.timeout(180)
def test_each_nodes_task_gets_the_cpus_of_the_job(slurm_cluster, tmp_path):
    """--cpus-per-task=2 on the 2-CPU nodes: each node's task may run on both CPUs, and its
    launcher runs 2 threads per process. srun does not take --cpus-per-task from sbatch (Slurm
    22.05 on): without passing it on, the step got one CPU per node, and the task was bound to
    it. The test cluster binds no task by default (its two nodes share this machine's cores,
    see scripts/slurm_cluster.sh), so this job asks for binding as a real cluster's default
    does (SLURM_CPU_BIND=cores: srun's --cpu-bind)."""
    probe = tmp_path / "python"
    probe.write_text(PROBE.format(python=sys.executable))
    probe.chmod(0o755)
    job = slurm_cluster.submit("cpu.sbatch", tmp_path, "--nodes=2", "--cpus-per-task=2", PYTHON=str(probe),
                               PROBE_DIR=str(tmp_path), SLURM_CPU_BIND="cores", RUN_DIR=str(tmp_path / "run"))
    assert_finished(job, job.wait_done(timeout=150))
    for rank in (0, 1):
        task = json.loads((tmp_path / f"task-{rank}.json").read_text())
        assert task["cpus"] == [0, 1], (rank, task, job.describe())
        args = task["args"]
        assert args[args.index("--num_cpu_threads_per_process") + 1] == "2", args


@pytest.mark.timeout(360)
def test_usr1_checkpoints_requeues_and_resumes_exactly(slurm_cluster, tmp_path):
    run_dir = tmp_path / "run"
    job = slurm_cluster.submit("cpu.sbatch", tmp_path, RUN_DIR=str(run_dir), OVERRIDES=" ".join(SHORT),
                               WANDB_MODE="offline")
    with LocalRun(tmp_path / "golden", *SHORT) as golden:
        job.wait_until(lambda i: i["JobState"] == "RUNNING" and any((run_dir / "checkpoints").glob("step-*"))
                       or i["JobState"] in TERMINAL_STATES,
                       timeout=240, what="running with a first checkpoint", poll=0.2)
        run_id = (run_dir / "wandb_run_id").read_text().strip()
        # What `#SBATCH --signal=B:USR1@LEAD` does before the time limit (or a preemption notice).
        signal = run_cmd(["scancel", "--signal=USR1", "--batch", str(job.job_id)], timeout=30)
        assert signal.returncode == 0, signal.stderr
        job.wait_until(lambda i: i.get("Restarts") == "1", timeout=120, what="requeued")
        info = job.wait_done(timeout=240)
        expected = golden.outcome()
    assert_finished(job, info)
    assert info["Restarts"] == "1", job.describe()
    log = job.log_text()
    # Both ranks (one per node) got USR1 and stopped at the same step with one checkpoint: the
    # main process says where, and each node's launcher saw its worker exit 75.
    stops = re.findall(r"\[rank (\d)\] stopped by SIGUSR1 after step (\d+)", log)
    assert [r for r, _ in stops] == ["0"], log
    step = int(stops[0][1])
    assert log.count("mnistdist.launch: all workers stopped on request after writing a checkpoint (exit 75)") == 2
    assert f"resumed from {run_dir}/checkpoints/step-{step:08d} at step {step}" in log
    assert "requeueing job" in log and "training finished" in log
    assert_same_run(expected, outcome(run_dir))
    # The requeued job continued the same W&B run: two offline segments, one run id.
    assert (run_dir / "wandb_run_id").read_text().strip() == run_id
    segments = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(segments) == 2, segments
    for segment in segments:
        assert (segment / f"run-{run_id}.wandb").is_file(), list(segment.iterdir())


SLOW_FIRST_RUN = """#!/bin/bash
# Stands in for PYTHON in a job: the job's first run trains through tests/fault_train.py with
# MNISTDIST_FAULT (slowed down); a requeued run (SLURM_RESTART_COUNT > 0) trains as given.
args=()
for arg in "$@"; do
    if [[ $arg == train_dist.py && ${{SLURM_RESTART_COUNT:-0}} == 0 ]]; then arg={fault_train}; fi
    args+=("$arg")
done
exec {python} "${{args[@]}}"
"""


@pytest.mark.timeout(600)
def test_time_limit_too_short_requeues_until_done(slurm_cluster, tmp_path):
    """--time=1 --signal=B:USR1@5: Slurm checks time limits every 30 s and sends the signal at
    the first check with at most 5 + 30 s left, i.e. 25-55 s into each run (after the ~7-17 s
    start-up), and kills at the first check after 60 s, at least 30 s after the signal. The
    job's first run is made too slow to finish in its minute (rank 0 sleeps 0.3 s after every
    step: 300 steps take 90 s), so Slurm's signal stops it mid-training; it checkpoints and
    requeues itself, and the requeued run, at full speed (~5 s for the epoch), finishes before
    its own signal (or is stopped and requeued again: the job requeues as often as needed).
    The sleep changes no number: the uninterrupted reference run trains at full speed."""
    run_dir = tmp_path / "run"
    python = tmp_path / "python"
    python.write_text(SLOW_FIRST_RUN.format(fault_train=REPO / "tests" / "fault_train.py", python=sys.executable))
    python.chmod(0o755)
    job = slurm_cluster.submit("cpu.sbatch", tmp_path, "--time=1", "--signal=B:USR1@5", RUN_DIR=str(run_dir),
                               OVERRIDES=" ".join(ONE_EPOCH), PYTHON=str(python),
                               MNISTDIST_FAULT="step=1,rank=0,action=sleep:0.3")
    with LocalRun(tmp_path / "golden", *ONE_EPOCH) as golden:
        info = job.wait_done(timeout=540)
        expected = golden.outcome()
    assert_finished(job, info)
    restarts = int(info["Restarts"])
    log = job.log_text()
    assert restarts >= 1, job.describe()
    assert log.count("SIGUSR1 (time limit near") >= restarts
    assert log.count("requeueing job") == restarts
    # The first run at least was stopped mid-training by Slurm's warning signal (both ranks).
    assert len(re.findall(r"\[rank 0\] stopped by SIGUSR1 after step", log)) >= 1, log
    assert log.count("all workers stopped on request after writing a checkpoint (exit 75)") >= 2, log
    assert "DUE TO TIME LIMIT" not in log, log  # every run stopped itself before Slurm killed it
    assert_same_run(expected, outcome(run_dir))


@pytest.mark.timeout(420)
def test_a_two_node_job_is_continued_by_a_one_node_job(slurm_cluster, tmp_path):
    """Preempted on 2 nodes (USR1, not requeued: MAX_REQUEUES=0), the same RUN_DIR finished by
    a 1-node job: in float64 within 1e-12 of an uninterrupted 1-process run, in one W&B run."""
    from safetensors.torch import load_file

    from tests.conftest import train_cmd

    args = ["model.dtype=float64", *SHORT]
    run_dir = tmp_path / "run"
    first = slurm_cluster.submit("cpu.sbatch", tmp_path, "--nodes=2", RUN_DIR=str(run_dir), OVERRIDES=" ".join(args),
                                 WANDB_MODE="offline", MAX_REQUEUES="0")
    golden_dir = tmp_path / "golden"
    golden = subprocess.Popen(train_cmd(*args, "--run-dir", str(golden_dir)), cwd=REPO, env=child_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        first.wait_until(lambda i: i["JobState"] == "RUNNING" and any((run_dir / "checkpoints").glob("step-*"))
                         or i["JobState"] in TERMINAL_STATES, timeout=240, what="running with a checkpoint")
        run_id = (run_dir / "wandb_run_id").read_text().strip()
        assert run_cmd(["scancel", "--signal=USR1", "--batch", str(first.job_id)], timeout=30).returncode == 0
        info = first.wait_done(timeout=180)
        assert info["ExitCode"] == "75:0" and info["Restarts"] == "0", first.describe()
        second = slurm_cluster.submit("cpu.sbatch", tmp_path, "--nodes=1", RUN_DIR=str(run_dir),
                                      OVERRIDES=" ".join(args), WANDB_MODE="offline")
        assert_finished(second, second.wait_done(timeout=240))
        assert golden.wait(timeout=300) == 0
    finally:
        golden.kill()
    assert "(written by 2 process(es))" in second.log_text()
    a, b = load_file(str(golden_dir / "model.safetensors")), load_file(str(run_dir / "model.safetensors"))
    assert a["fc1.weight"].dtype.is_floating_point and str(a["fc1.weight"].dtype) == "torch.float64"
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"2 nodes -> 1 node: max |param difference| to one uninterrupted process {worst:.1e}")
    assert worst <= 1e-12
    steps = [r["step"] for r in read_metrics(run_dir) if "train_loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 600
    assert (run_dir / "wandb_run_id").read_text().strip() == run_id
    segments = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(segments) == 2 and all((s / f"run-{run_id}.wandb").is_file() for s in segments), segments
