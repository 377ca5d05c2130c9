"""Shared test helpers: where real MNIST lives, a tiny synthetic MNIST, how to start the real
launcher, and the ``slow`` marker that ``make test-fast`` (``pytest -m "not slow"``) leaves out."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
CPU_LAUNCH_CONFIG = REPO / "configs" / "accelerate" / "cpu.yaml"
FAULT_TRAIN = TESTS / "fault_train.py"
"""train_dist.py with ``MNISTDIST_FAULT`` injected (see tests/fault_train.py): ``script=FAULT_TRAIN``."""

# `slow`: left out of `make test-fast` (pytest -m "not slow"). Every test in these
# directories starts several processes, a Slurm cluster or reads real MNIST.
SLOW_DIRECTORIES = ("distributed", "faults", "slurm", "tools", "tracking")
# Slow tests elsewhere carry @pytest.mark.slow. Any test that reads real MNIST must be slow:
# data_root() fails in one that is not.
_running: pytest.Item | None = None


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        try:
            top = item.path.resolve().relative_to(TESTS).parts[0]
        except ValueError:
            continue
        if top in SLOW_DIRECTORIES:
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(tryfirst=True)  # before the test's fixtures are set up
def pytest_runtest_setup(item: pytest.Item) -> None:
    global _running
    _running = item


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    # This conftest's hooks see only items under tests/: forget the item, so a benchmarks/
    # test that runs next is not judged by the marker of the last test here.
    global _running
    _running = None


@pytest.fixture
def synthetic_mnist(tmp_path: Path) -> Path:
    """A data root with a tiny learnable MNIST (1000 train, 200 test images) in the real IDX
    format under ``MNIST/raw/`` (see tests/synthetic_mnist.py)."""
    from tests.synthetic_mnist import write_synthetic_mnist

    return write_synthetic_mnist(tmp_path / "data")


LAUNCHER_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                      "MNISTDIST_DATA_ROOT")


def as_one_process(mp: pytest.MonkeyPatch, wandb_mode: str | None = "disabled") -> pytest.MonkeyPatch:
    """Give this process the environment of ``python train_dist.py`` typed by hand, for runs of
    the real training loop in the test process: no launcher variables, no accelerate or W&B
    settings; then ``WANDB_MODE=wandb_mode`` unless it is None (W&B follows the config)."""
    for name in LAUNCHER_VARIABLES:
        mp.delenv(name, raising=False)
    for name in [n for n in os.environ if n.startswith(("ACCELERATE_", "WANDB_"))]:
        mp.delenv(name)
    if wandb_mode is not None:
        mp.setenv("WANDB_MODE", wandb_mode)
    return mp


@pytest.fixture(scope="module")
def one_process_env():
    """``as_one_process`` for a whole test module (W&B off); yields the MonkeyPatch."""
    with pytest.MonkeyPatch.context() as mp:
        yield as_one_process(mp)


def train_in_process(capfd: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``python train_dist.py ARGS`` run in this process: (exit code, stdout, stderr). For tests
    of an error that the command line reports before training (one line, exit 2): it is the
    same ``cli.train_main`` the script calls, without the seconds a process start costs. The
    caller gives the environment (``as_one_process``); stdout and stderr are read at the file
    descriptors, so anything else printed meanwhile shows too."""
    from mnistdist import cli

    capfd.readouterr()  # only what this call prints
    try:
        code = cli.train_main(list(args))
    except SystemExit as e:  # argparse's errors exit from inside the parser
        code = e.code
    out, err = capfd.readouterr()
    return code, out, err


def data_root() -> Path:
    """Real MNIST: $MNISTDIST_DATA_ROOT, else ../shared/data next to the checkout."""
    if _running is not None and _running.get_closest_marker("slow") is None:
        pytest.fail(f"{_running.nodeid} reads real MNIST but is not marked slow: add @pytest.mark.slow "
                    "or use the synthetic_mnist fixture")
    root = Path(os.environ.get("MNISTDIST_DATA_ROOT") or REPO.parent / "shared" / "data")
    if not (root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").is_file():
        pytest.fail(f"real MNIST not found under {root}/MNIST/raw; set MNISTDIST_DATA_ROOT")
    return root.resolve()


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a run a test starts: mnistdist.launch.child_env on real MNIST."""
    from mnistdist.launch import child_env as clean_env

    return clean_env(**{"MNISTDIST_DATA_ROOT": str(data_root()), **extra})


def run_cmd(cmd: list[str], timeout: float = 300, env: dict[str, str] | None = None,
            cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env or child_env(), capture_output=True, text=True, timeout=timeout)


def train_cmd(*args: str, script: Path | None = None) -> list[str]:
    """``python train_dist.py ...`` (or ``script``; one process, no launcher)."""
    return [sys.executable, str(script or REPO / "train_dist.py"), *args]


def launch_cmd(num_processes: int, *args: str, module: bool = False, script: Path | None = None) -> list[str]:
    """``accelerate launch --config_file configs/accelerate/cpu.yaml --num_processes N ...``
    running train_dist.py (or ``script``, or with ``module`` the module named first in args).

    Each call gets its own rendezvous port so tests never collide with each other.
    """
    from mnistdist.launch import free_port

    port = free_port()
    accelerate = Path(sys.executable).parent / "accelerate"
    head = [str(accelerate), "launch", "--config_file", str(CPU_LAUNCH_CONFIG),
            "--num_processes", str(num_processes), "--main_process_port", str(port)]
    if module:
        return [*head, "-m", *args]
    return [*head, str(script or REPO / "train_dist.py"), *args]


def agreed_stop(step: int) -> int:
    """The step after which the ranks stop when a stop signal arrives after ``step``: the next
    agreement (every ``train.stop_check_every_steps`` steps, the default here)."""
    from mnistdist.config import TrainConfig

    every = TrainConfig().stop_check_every_steps
    return -(-(step + 1) // every) * every


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\nSTDOUT:\n{result.stdout[-4000:]}\nSTDERR:\n{result.stderr[-6000:]}"
    return result


def outcome(run_dir: Path) -> dict:
    """What must match between two runs that should be the same: final parameters, every
    logged training loss and every evaluation."""
    from safetensors.torch import load_file

    from mnistdist.rundir import read_metrics

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
