"""slurm/elastic.sbatch on the real two-node test cluster: node 2 dies (its agent and worker are
SIGKILLed at once, after a checkpoint), and the job goes on with node 1 alone, resumes from the
newest checkpoint and finishes with exit 0, within 1e-12 of an uninterrupted one-process run.

The float64 training of tests/distributed/test_elastic.py (synthetic MNIST, 1,200 images, global
batch 40, 60 steps, a checkpoint every 20 steps): short, and exact whatever the world size.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

from tests.conftest import REPO, child_env, train_cmd
from tests.distributed.test_elastic import ARGS, assert_like_golden, losses
from tests.slurm.conftest import TERMINAL_STATES
from tests.synthetic_mnist import write_synthetic_mnist

pytestmark = [pytest.mark.slurm, pytest.mark.distributed]


def node_processes(job_id: int, node_id: int) -> list[psutil.Process]:
    """The processes of the job's step task on one node. Both test nodes are this machine, so a
    node's processes are told apart by the environment Slurm gave its task."""
    found = []
    for proc in psutil.process_iter():
        try:
            env = proc.environ()
        except (psutil.Error, OSError):
            continue  # gone, or a kernel thread
        if env.get("SLURM_JOB_ID") == str(job_id) and env.get("SLURM_NODEID") == str(node_id):
            found.append(proc)
    return found


def watch(job, done, timeout: float, what: str) -> None:
    """Wait for ``done()``, looked at every 20 ms; the job's state only every second (each look
    is a process, and the job shares this machine's cores)."""
    deadline = time.monotonic() + timeout
    checked = 0.0
    while not done():
        now = time.monotonic()
        if now - checked > 1:
            assert job.info()["JobState"] not in TERMINAL_STATES, f"job ended before it was {what}\n{job.describe()}"
            checked = now
        assert now < deadline, f"job not {what} after {timeout:.0f} s\n{job.describe()}"
        time.sleep(0.02)


@pytest.mark.timeout(300)
def test_a_lost_node_shrinks_the_job_and_it_finishes_like_one_process(slurm_cluster, tmp_path):
    data = write_synthetic_mnist(tmp_path / "data", num_train=1200, num_test=200)
    run_dir = tmp_path / "run"
    job = slurm_cluster.submit("elastic.sbatch", tmp_path, "--nodes=2", RUN_DIR=str(run_dir),
                               OVERRIDES=" ".join(ARGS), MNISTDIST_DATA_ROOT=str(data), MAX_RESTARTS="2")
    watch(job, lambda: (run_dir / "checkpoints" / "step-00000020").is_dir(), 180, "at its step-20 checkpoint")
    doomed = node_processes(job.job_id, 1)
    commands = [" ".join(p.cmdline()) for p in doomed]
    assert any("mnistdist.launch torchrun" in c for c in commands), (commands, job.describe())
    assert any("train_dist.py" in c for c in commands), (commands, job.describe())
    for proc in doomed:  # node 2 dies: its agent and its worker at once
        proc.kill()
    killed = time.monotonic()
    watch(job, lambda: "resumed from" in job.log_text(), 120, "resumed")
    reform = time.monotonic() - killed
    print(f"node 2 killed: the job resumed on node 1 alone {reform:.1f} s later")
    # The same training, uninterrupted, on one process (after the measurement: it shares the cores).
    golden_dir = tmp_path / "golden"
    golden = subprocess.run(train_cmd(*ARGS, "--run-dir", str(golden_dir)), cwd=REPO, capture_output=True,
                            text=True, env=child_env(MNISTDIST_DATA_ROOT=str(data)), timeout=240)
    assert golden.returncode == 0, golden.stderr[-3000:]
    info = job.wait_done(timeout=180)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", job.describe()
    log = job.log_text()
    assert "task on node1: node 0, rendezvous store host: true" in log, log
    assert "training on 2 process(es)" in log and "training on 1 process(es)" in log, job.describe()
    [resumed] = re.findall(r"resumed from \S+/step-(\d+) at step \d+ \(written by 2 process\(es\)\)", log)
    assert int(resumed) >= 20, log
    assert "a node's task ended early and the job went on without it" in log, job.describe()
    assert_like_golden({"params": load_file(golden_dir / "model.safetensors"), "losses": losses(golden_dir)}, run_dir)
