"""The launcher wrapper and torchrun's elastic agent: healthy jobs are never killed, a lost
worker or node is replaced from the newest checkpoint, and the job still ends exactly like an
uninterrupted one-process run (float64, synthetic MNIST in the real IDX format)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, check, child_env, launch_cmd, run_cmd
from tests.synthetic_mnist import write_synthetic_mnist

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_synthetic_mnist(tmp_path_factory.mktemp("data"), num_train=1200, num_test=200)


def wrapper_cmd(num_processes: int, *args: str) -> list[str]:
    """``python -m mnistdist.launch`` with the arguments of ``launch_cmd``."""
    return [sys.executable, "-m", "mnistdist.launch", *launch_cmd(num_processes, *args)[2:]]


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
