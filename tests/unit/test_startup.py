"""Start-up: what a training run imports before its first step, and the IDX reader that keeps
torchvision out of it (issue 17). No test here measures a time; see ``python -m benchmarks.bench
--startup`` and docs/benchmarks.md for the numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mnistdist.data import load_tensors, read_idx, raw_dir
from tests.conftest import REPO
from tests.synthetic_mnist import write_synthetic_mnist

# Imported by a run only after training (plots), for another pipeline or tracker, or never.
NOT_BEFORE_FIRST_STEP = ("torchvision", "matplotlib", "wandb", "PIL", "psutil")

# Runs training in a fresh interpreter and prints, as JSON, the top-level modules loaded when
# the first step is called, and the modules loaded when the run has finished.
PROBE = """
import json, sys
from mnistdist import training
from mnistdist.config import load_config
seen = {}
build_step = training.build_step
def recording_build_step(*args, **kwargs):
    step = build_step(*args, **kwargs)
    def first(x, y, lr, number):
        seen.setdefault("first_step", sorted({m.split(".")[0] for m in sys.modules}))
        return step(x, y, lr, number)
    return first
training.build_step = recording_build_step
training.run(load_config(None, sys.argv[2:]), sys.argv[1], resume="never")
seen["after_run"] = sorted({m.split(".")[0] for m in sys.modules})
print(json.dumps(seen))
"""


def test_load_tensors_equals_torchvision(tmp_path: Path) -> None:
    """The IDX reader gives torchvision MNIST's tensors exactly: values, dtype, shape, strides."""
    import torchvision

    root = write_synthetic_mnist(tmp_path / "data", num_train=120, num_test=30)
    ours = load_tensors(root)
    for train, images, labels in ((True, ours.train_images, ours.train_labels),
                                  (False, ours.test_images, ours.test_labels)):
        theirs = torchvision.datasets.MNIST(str(root), train=train, download=False)
        for mine, reference in ((images, theirs.data), (labels, theirs.targets)):
            assert mine.dtype == reference.dtype and mine.shape == reference.shape
            assert mine.stride() == reference.stride()
            assert torch.equal(mine, reference)
    assert ours.train_images.shape == (120, 28, 28) and ours.test_labels.shape == (30,)


def test_read_idx_reads_the_header_shape(tmp_path: Path) -> None:
    root = write_synthetic_mnist(tmp_path / "data", num_train=7, num_test=3)
    assert read_idx(raw_dir(root) / "train-images-idx3-ubyte").shape == (7, 28, 28)
    labels = read_idx(raw_dir(root) / "t10k-labels-idx1-ubyte")
    assert labels.shape == (3,) and labels.dtype == torch.uint8 and int(labels.max()) <= 9


@pytest.mark.slow  # a real `python train_dist.py` process (~5 s, most of it import torch)
def test_first_step_imports_only_what_training_needs(tmp_path: Path) -> None:
    """A default run (tensor pipeline, W&B off) reaches its first step without torchvision,
    matplotlib, ...; matplotlib comes in after training, for the plots, which are still written."""
    root = write_synthetic_mnist(tmp_path / "data", num_train=200, num_test=50)
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "WANDB_", "MNISTDIST_"))}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    env["WANDB_MODE"] = "disabled"
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(run_dir), f"data.root={root}", "data.download=false", "dist.device=cpu",
         "train.epochs=1", "train.global_batch_size=50", "tracking.progress=off"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    early = [m for m in NOT_BEFORE_FIRST_STEP if m in seen["first_step"]]
    assert early == [], f"imported before the first step: {early}"
    assert "torch" in seen["first_step"] and "matplotlib" in seen["after_run"]
    assert sorted(p.name for p in (run_dir / "plots").iterdir()) == ["accuracy.png", "confusion.png", "loss.png"]


# Runs the train command on each line of argv in a fresh interpreter, as rank RANK of WORLD_SIZE
# launched processes, and prints, as JSON, each exit code and whether torch was imported by then.
REFUSE_PROBE = """
import contextlib, io, json, os, sys
from mnistdist.cli import train_main
out = []
for rank, world_size, argv in json.loads(sys.argv[1]):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = train_main(argv)
    out.append({"code": code, "stderr": err.getvalue(), "torch": "torch" in sys.modules})
print(json.dumps(out))
"""


def test_a_refused_config_or_flag_never_imports_torch(tmp_path: Path) -> None:
    """A bad value, an unknown key, a missing --resume directory, a world size that does not
    divide the batch: one line, exit 2, from rank 0 only, before torch is imported (~5 s that a
    process which only says no does not spend: every rank of a launch, a sweep, a Slurm job)."""
    cases = [(0, 1, ["train.lr=abc"]), (0, 1, ["train.nosuch=1"]), (0, 1, ["--resume", str(tmp_path / "none")]),
             (0, 7, ["train.global_batch_size=600"]), (1, 7, ["train.global_batch_size=600"])]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "MASTER_"))}
    result = subprocess.run([sys.executable, "-c", REFUSE_PROBE, json.dumps(cases)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert [s["code"] for s in seen] == [2] * len(cases), seen
    assert not any(s["torch"] for s in seen), seen
    lines = [s["stderr"].splitlines() for s in seen]
    assert [len(x) for x in lines] == [1, 1, 1, 1, 0], seen  # rank 1 leaves the message to rank 0
    assert all(x[0].startswith("error: ") for x in lines[:4]), seen
    assert "train.lr" in lines[0][0] and "train.nosuch" in lines[1][0] and "--resume" in lines[2][0], seen
    assert "7" in lines[3][0], seen
