"""A real Slurm cluster on the test machine, for the template tests in this directory.

The session fixture ``slurm_cluster`` runs ``scripts/slurm_cluster.sh up`` (munged, slurmctld
and two slurmd "nodes", node1 and node2, CPUs=2 each) and ``down`` afterwards, also when a test
fails. Without Slurm (or without root) the tests are skipped locally, but FAIL under CI=true:
.ci/run installs Slurm with apt-get, and a CI that cannot is broken, not green.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, child_env

CLUSTER_SCRIPT = REPO / "scripts" / "slurm_cluster.sh"
SLURM_BINARIES = ("slurmctld", "slurmd", "sbatch", "scontrol", "munged")
IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
# Two pytest sessions on one machine must not share (and tear down) one cluster.
LOCK_FILE = Path(os.environ.get("MNISTDIST_SLURM_LOCK", "/var/tmp/mnistdist-slurm.lock"))
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
                   "OUT_OF_MEMORY", "PREEMPTED", "SPECIAL_EXIT", "REVOKED"}


def pytest_configure(config):
    config.addinivalue_line("markers", "slurm: submits jobs to a real Slurm cluster started on this machine")


def unavailable(reason: str) -> None:
    """Skip locally; fail in CI."""
    if IN_CI:
        pytest.fail(f"{reason} (CI is set: the Slurm tests must run here; .ci/run installs Slurm with apt-get)")
    pytest.skip(reason)


def missing_slurm() -> list[str]:
    return [b for b in SLURM_BINARIES if shutil.which(b) is None]


@dataclass
class Job:
    """A submitted batch job and where its log goes."""

    job_id: int | str  # an array task: "ARRAYID_INDEX"
    log: Path

    def info(self) -> dict[str, str]:
        return job_info(self.job_id)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace").replace("\r", "\n") if self.log.exists() else ""

    def describe(self) -> str:
        try:
            state = subprocess.run(["scontrol", "show", "job", str(self.job_id)], capture_output=True,
                                   text=True, timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired) as e:
            state = f"(scontrol failed: {e})"
        lines = [ln for ln in self.log_text().splitlines() if "it/s" not in ln]  # drop progress bars
        return f"scontrol show job {self.job_id}:\n{state}\nlog {self.log} (tail):\n" + "\n".join(lines[-80:])

    def wait_until(self, predicate, timeout: float, what: str, poll: float = 0.5) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            info = self.info()
            if predicate(info):
                return info
            if time.monotonic() > deadline:
                self.cancel()
                pytest.fail(f"job {self.job_id}: not {what} after {timeout:.0f} s\n{self.describe()}")
            time.sleep(poll)

    def wait_done(self, timeout: float) -> dict[str, str]:
        """Wait until the job has ended for good (not just one run of a requeued job)."""
        return self.wait_until(lambda i: i.get("JobState") in TERMINAL_STATES, timeout, "finished")

    def cancel(self) -> None:
        subprocess.run(["scancel", str(self.job_id)], capture_output=True, timeout=30)


def job_info(job_id: int) -> dict[str, str]:
    """``scontrol show job -o`` as a dict (finished jobs stay visible for MinJobAge = 1 h)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True,
                         timeout=30)
    if out.returncode != 0:
        return {"JobState": "UNKNOWN", "error": out.stderr.strip()}
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


class Cluster:
    """Submits the real templates in slurm/ with the test's environment."""

    def submit(self, template: str, log_dir: Path, *sbatch_args: str, **env: str) -> Job:
        environment = {k: v for k, v in child_env().items() if not k.startswith("SLURM_")}
        environment.update({"PYTHON": sys.executable, **env})  # env may name another PYTHON
        log = log_dir / "slurm-%j.out"
        result = subprocess.run(
            ["sbatch", "--parsable", f"--output={log}", *sbatch_args, str(REPO / "slurm" / template)],
            cwd=REPO, env=environment, capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == 0, f"sbatch failed: {result.stderr}"
        job_id = int(result.stdout.strip().split(";")[0])
        return Job(job_id, Path(str(log).replace("%j", str(job_id))))


@pytest.fixture(scope="session")
def slurm_cluster():
    if os.geteuid() != 0:
        unavailable("the Slurm tests start daemons and need root")
    missing = missing_slurm()
    if missing:
        unavailable(f"Slurm is not installed ({', '.join(missing)} not found): "
                    "`scripts/slurm_cluster.sh install` or apt-get install slurmctld slurmd slurm-client munge")
    lock = open(LOCK_FILE, "w")
    deadline = time.monotonic() + 900
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                lock.close()
                pytest.fail(f"another test session holds {LOCK_FILE} (its Slurm cluster) for 15 minutes")
            time.sleep(2)
    try:
        up = subprocess.run(["bash", str(CLUSTER_SCRIPT), "up"], capture_output=True, text=True, timeout=180)
        if up.returncode != 0:
            pytest.fail(f"scripts/slurm_cluster.sh up failed (exit {up.returncode}):\n{up.stdout}\n{up.stderr}")
        yield Cluster()
    finally:
        subprocess.run(["bash", str(CLUSTER_SCRIPT), "down"], capture_output=True, text=True, timeout=180)
        lock.close()
