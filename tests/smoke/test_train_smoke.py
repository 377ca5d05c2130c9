"""End-to-end smoke runs of the real training loop, in this process, on a tiny synthetic MNIST.

The real config loader, file checks, data loader and training loop (``training.run``), one
process and no launcher; 1000 training images in batches of 50 (20 steps per epoch), 2 epochs.
A few seconds per run, so this is part of ``make test-fast``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mnistdist import training
from mnistdist.config import load_config
from tests.synthetic_mnist import write_synthetic_mnist

STEPS_PER_EPOCH, EPOCHS = 20, 2
STOP_AT = 13  # mid-epoch: the resumed run must skip exactly the batches already done


def overrides(data_root: Path, *extra: str) -> list[str]:
    return [f"data.root={data_root}", "data.download=false", "dist.device=cpu", "tracking.mode=disabled",
            f"train.epochs={EPOCHS}", "train.global_batch_size=50", "train.log_every_steps=1",
            "tracking.plots=false", *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_synthetic_mnist(tmp_path_factory.mktemp("data"), num_train=1000, num_test=200)


@pytest.fixture(scope="module")
def uninterrupted(one_process_env, data, tmp_path_factory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    summary = training.run(load_config(None, overrides(data)), run_dir, resume="auto")
    return run_dir, summary


def records(run_dir: Path) -> list[dict]:
    """metrics.jsonl, strictly: every line one JSON object."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_lines(run_dir: Path) -> list[dict]:
    return [r for r in records(run_dir) if "train_loss" in r]


def eval_lines(run_dir: Path) -> list[dict]:
    return [r for r in records(run_dir) if "test_acc" in r]


def checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir())


def test_training_learns_and_writes_the_run_directory(uninterrupted, data):
    run_dir, summary = uninterrupted
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "model.safetensors"):
        assert (run_dir / name).is_file(), f"{name} missing from {run_dir}"
    assert checkpoints(run_dir)[-1] == f"step-{STEPS_PER_EPOCH * EPOCHS:08d}"
    assert not (run_dir / "plots").exists()  # tracking.plots=false

    written = json.loads((run_dir / "summary.json").read_text())
    assert written["final_test_acc"] == summary["final_test_acc"]
    assert summary["steps"] == STEPS_PER_EPOCH * EPOCHS and summary["test_total"] == 200
    # Chance is 10%; the classes are distinct patterns, so 40 steps learn them.
    assert summary["final_test_acc"] >= 0.9, summary

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["data"]["root"] == str(data) and config["train"]["global_batch_size"] == 50

    steps = [r["step"] for r in train_lines(run_dir)]
    assert steps == list(range(1, STEPS_PER_EPOCH * EPOCHS + 1))
    losses = [r["train_loss"] for r in train_lines(run_dir)]
    assert losses[-1] < losses[0] / 4
    assert [(r["epoch"], r["step"]) for r in eval_lines(run_dir)] == [(1, 20), (2, 40)]

    params = load_file(str(run_dir / "model.safetensors"))
    assert set(params) == {f"fc{i}.{kind}" for i in (1, 2, 3) for kind in ("weight", "bias")}
    assert all(torch.isfinite(p).all() for p in params.values())


def test_stopped_early_then_resumed_equals_uninterrupted(uninterrupted, one_process_env, data, tmp_path, capsys):
    golden_dir, golden_summary = uninterrupted
    run_dir = tmp_path / "run"

    first = training.run(load_config(None, overrides(data, f"train.max_steps={STOP_AT}")), run_dir, resume="auto")
    assert first["steps"] == STOP_AT
    assert checkpoints(run_dir)[-1] == f"step-{STOP_AT:08d}"

    capsys.readouterr()
    resumed = training.run(load_config(None, overrides(data)), run_dir, resume="auto")
    assert resumed["steps"] == STEPS_PER_EPOCH * EPOCHS
    assert f"resumed from {run_dir / 'checkpoints' / f'step-{STOP_AT:08d}'}" in capsys.readouterr().out

    golden, other = (load_file(str(d / "model.safetensors")) for d in (golden_dir, run_dir))
    assert golden.keys() == other.keys()
    for name, tensor in golden.items():
        assert torch.equal(tensor, other[name]), f"{name} differs from the uninterrupted run"
    assert resumed["final_test_acc"] == golden_summary["final_test_acc"]

    # One training line per step (none repeated by the resume), with the uninterrupted run's losses.
    assert [(r["step"], r["train_loss"]) for r in train_lines(run_dir)] == [
        (r["step"], r["train_loss"]) for r in train_lines(golden_dir)
    ]
    # No evaluation repeated either, and every evaluation of the uninterrupted run is there, equal
    # (plus the stopped run's own evaluation at step 13, of the weights it wrote then).
    evals = [(r["step"], r["test_correct"], r["test_loss"]) for r in eval_lines(run_dir)]
    assert len({step for step, _, _ in evals}) == len(evals), evals
    golden_evals = [(r["step"], r["test_correct"], r["test_loss"]) for r in eval_lines(golden_dir)]
    assert all(e in evals for e in golden_evals), (evals, golden_evals)
