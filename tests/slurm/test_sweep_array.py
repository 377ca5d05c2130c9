"""slurm/sweep.sbatch on the real two-node test cluster: a 4-run sweep as a job array.

One task is preempted (SIGUSR1 to its batch script, what `--signal=B:USR1@LEAD` sends): it
checkpoints, that task alone is requeued (Restarts=1) and it ends bitwise equal to the same
run uninterrupted; the other tasks are untouched. Submitting the same array again trains
nothing: every task sees its run finished and exits 0.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mnistdist.tools import sweep
from tests.conftest import REPO, assert_same_run, child_env, outcome, run_cmd
from tests.slurm.conftest import TERMINAL_STATES, Job

pytestmark = [pytest.mark.slurm, pytest.mark.distributed]

SWEEP = """
name: arr
overrides: {train.epochs: 2, checkpoint.every_steps: 50}
grid: {train.lr: [0.05, 0.1]}
seeds: [0, 1]
"""
PREEMPTED = 1  # the array task (= run index) that gets SIGUSR1


def submit_array(cluster, tmp_path: Path, sweep_file: Path, sweep_dir: Path, tag: str) -> tuple[int, list[Job]]:
    """sbatch --array=0-3%2 slurm/sweep.sbatch (at most 2 at once: this machine has 2 cores)."""
    log = tmp_path / f"{tag}-%A_%a.out"
    environment = {k: v for k, v in child_env().items() if not k.startswith("SLURM_")}
    environment.update(PYTHON=sys.executable, SWEEP=str(sweep_file), SWEEP_DIR=str(sweep_dir), WANDB_MODE="offline")
    result = subprocess.run(["sbatch", "--parsable", "--array=0-3%2", "--cpus-per-task=1", f"--output={log}",
                             str(REPO / "slurm" / "sweep.sbatch")],
                            cwd=REPO, env=environment, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"sbatch failed: {result.stderr}"
    array_id = int(result.stdout.strip().split(";")[0])
    return array_id, [Job(f"{array_id}_{i}", Path(str(log).replace("%A", str(array_id)).replace("%a", str(i))))
                      for i in range(4)]


def wait_all(jobs: list[Job], timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    return [job.wait_done(timeout=max(1.0, deadline - time.monotonic())) for job in jobs]


def timeline(jobs: list[Job]) -> str:
    """When each task's runs started and stopped (the log's own time stamps)."""
    lines = []
    for job in jobs:
        info = job.info()
        events = re.findall(r"\[mnistdist-slurm (\d\d:\d\d:\d\d)\] (job \d+ \(restart \d+\)|training finished"
                            r"|SIGUSR1|requeueing job)", job.log_text())
        lines.append(f"task {job.job_id}: Restarts={info.get('Restarts')} start {info.get('StartTime')} "
                     f"end {info.get('EndTime')}: " + "; ".join(f"{t} {what}" for t, what in events))
    return "\n".join(lines)


@pytest.mark.timeout(600)
def test_a_sweep_runs_as_a_job_array_one_task_preempted_and_requeued(slurm_cluster, tmp_path):
    sweep_file = tmp_path / "arr.yaml"
    sweep_file.write_text(SWEEP)
    sweep_dir = tmp_path / "sweep"
    runs = sweep.load_sweep(sweep_file, sweep_dir).elements
    submitted = time.monotonic()
    array_id, jobs = submit_array(slurm_cluster, tmp_path, sweep_file, sweep_dir, "first")
    # The same run, uninterrupted, as one local process (what each array task is), meanwhile.
    golden = subprocess.Popen([sys.executable, "-m", "mnistdist.cli", "sweep", str(sweep_file), "--out",
                               str(tmp_path / "golden"), "--run", str(PREEMPTED), "dist.device=cpu",
                               "dist.threads_per_process=1"],  # as the task: 1 CPU, 1 thread
                              cwd=REPO, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        target = jobs[PREEMPTED]
        checkpoints = runs[PREEMPTED].run_dir / "checkpoints"
        target.wait_until(lambda i: i["JobState"] == "RUNNING" and any(checkpoints.glob("step-*"))
                          or i["JobState"] in TERMINAL_STATES, timeout=300, what="running with a checkpoint",
                          poll=0.2)
        signal = run_cmd(["scancel", "--signal=USR1", "--batch", target.job_id], timeout=30)
        assert signal.returncode == 0, signal.stderr
        infos = wait_all(jobs, timeout=420)
        assert golden.wait(timeout=300) == 0
    finally:
        golden.kill()
        for job in jobs:
            job.cancel()
    elapsed = time.monotonic() - submitted
    print(f"array {array_id}: all 4 tasks done {elapsed:.0f} s after sbatch\n{timeline(jobs)}")
    for job, info in zip(jobs, infos):
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", job.describe()
        assert info["Restarts"] == ("1" if job is jobs[PREEMPTED] else "0"), job.describe()
    log = jobs[PREEMPTED].log_text()
    step = int(re.search(r"^(?:\[rank 0\] )?stopped by SIGUSR1 after step (\d+)", log, re.M).group(1))
    assert f"resumed from {runs[PREEMPTED].run_dir}/checkpoints/step-{step:08d} at step {step}" in log
    assert "requeueing job" in log and "training finished" in log
    assert all(r.finished for r in runs)
    assert_same_run(outcome(tmp_path / "golden" / runs[PREEMPTED].name), outcome(runs[PREEMPTED].run_dir))
    for i, job in enumerate(jobs):
        assert f"array task {array_id}_{i}: run {i} of {sweep_file}" in job.log_text()

    # Submitting the same sweep again: every task finds its run finished and trains nothing.
    models = {r.name: (r.run_dir / "model.safetensors").stat().st_mtime_ns for r in runs}
    _, again = submit_array(slurm_cluster, tmp_path, sweep_file, sweep_dir, "again")
    for job, info in zip(again, wait_all(again, timeout=240)):
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", job.describe()
    for i, job in enumerate(again):
        assert f"run {i} ({runs[i].name}) finished before" in job.log_text(), job.describe()
    assert models == {r.name: (r.run_dir / "model.safetensors").stat().st_mtime_ns for r in runs}
