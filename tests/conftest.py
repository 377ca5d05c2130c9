"""Shared test helpers: where real MNIST lives and how to start the real launcher."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CPU_LAUNCH_CONFIG = REPO / "configs" / "accelerate" / "cpu.yaml"


def data_root() -> Path:
    """Real MNIST: $MNISTDIST_DATA_ROOT, else ../shared/data next to the checkout."""
    root = Path(os.environ.get("MNISTDIST_DATA_ROOT") or REPO.parent / "shared" / "data")
    if not (root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").is_file():
        pytest.fail(f"real MNIST not found under {root}/MNIST/raw; set MNISTDIST_DATA_ROOT")
    return root.resolve()


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "ACCELERATE_"))}
    env.update(MNISTDIST_DATA_ROOT=str(data_root()), PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    env.update(extra)
    return env


def run_cmd(cmd: list[str], timeout: float = 300, env: dict[str, str] | None = None,
            cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env or child_env(), capture_output=True, text=True, timeout=timeout)


def train_cmd(*args: str) -> list[str]:
    """``python train_dist.py ...`` (one process, no launcher)."""
    return [sys.executable, str(REPO / "train_dist.py"), *args]


def launch_cmd(num_processes: int, *args: str, module: bool = False, script: Path | None = None) -> list[str]:
    """``accelerate launch --config_file configs/accelerate/cpu.yaml --num_processes N ...``
    running train_dist.py (or ``script``, or with ``module`` the module named first in args).

    Each call gets its own rendezvous port so tests never collide with each other.
    """
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    accelerate = Path(sys.executable).parent / "accelerate"
    head = [str(accelerate), "launch", "--config_file", str(CPU_LAUNCH_CONFIG),
            "--num_processes", str(num_processes), "--main_process_port", str(port)]
    if module:
        return [*head, "-m", *args]
    return [*head, str(script or REPO / "train_dist.py"), *args]


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\nSTDOUT:\n{result.stdout[-4000:]}\nSTDERR:\n{result.stderr[-6000:]}"
    return result


def outcome(run_dir: Path) -> dict:
    """What must match between two runs that should be the same: final parameters, every
    logged training loss and every evaluation."""
    from safetensors.torch import load_file

    from mnistdist.tracking import read_metrics

    records = read_metrics(run_dir)
    return {
        "params": load_file(str(run_dir / "model.safetensors")),
        "losses": [(r["step"], r["train_loss"]) for r in records if "train_loss" in r],
        "evals": [(r["step"], r["test_correct"], r["test_loss"]) for r in records if "test_acc" in r],
    }


def assert_same_run(golden: dict, other: dict) -> None:
    """Bitwise-equal parameters, the same per-step losses and evaluations."""
    import torch

    assert golden["params"].keys() == other["params"].keys()
    for k, v in golden["params"].items():
        assert torch.equal(v, other["params"][k]), f"{k} differs"
    assert other["losses"] == golden["losses"]
    assert other["evals"] == golden["evals"]
