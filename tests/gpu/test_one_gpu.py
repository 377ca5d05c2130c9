"""One GPU (issue 17): training eager and as a CUDA graph, bf16, exact evaluation, exact resume,
the NaN stop, eager vs graph equality.

Marked ``gpu``; skipped without CUDA. ``benchmarks/gpu_check.sh`` runs them on a lent GPU machine
with the benchmark. In this process, on the tiny synthetic MNIST of the smoke tests (1000
training images, batches of 50: 20 steps an epoch).

``MNISTDIST_GPU_TESTS_DEVICE=cpu`` runs them on the CPU instead, to check the tests themselves
where no GPU is lent: the CUDA-graph step then falls back to the eager one (one warning), so
only the assertions that the graph was really used are skipped there.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mnistdist import checkpoint, training
from mnistdist.config import load_config
from mnistdist.data import load_tensors, normalize
from mnistdist.model import MLP
from mnistdist.signals import NonFiniteLoss
from tests.fault_train import injected
from tests.synthetic_mnist import write_synthetic_mnist

DEVICE = os.environ.get("MNISTDIST_GPU_TESTS_DEVICE", "cuda")
ON_CUDA = DEVICE == "cuda"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(ON_CUDA and not torch.cuda.is_available(),
                       reason="needs CUDA (benchmarks/gpu_check.sh runs these on a GPU machine)"),
]
STEPS_PER_EPOCH, EPOCHS, STOP_AT = 20, 2, 13
GRAPH_FALLBACK = "warning: dist.cuda_graph"


def overrides(data_root: Path, *extra: str) -> list[str]:
    return [f"data.root={data_root}", "data.download=false", f"dist.device={DEVICE}", "tracking.mode=disabled",
            "tracking.tensorboard=false", "tracking.progress=off", f"train.epochs={EPOCHS}",
            "train.global_batch_size=50", "train.log_every_steps=1", *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_synthetic_mnist(tmp_path_factory.mktemp("data"), num_train=1000, num_test=200)


def train(data: Path, run_dir: Path, *extra: str) -> dict:
    return training.run(load_config(None, overrides(data, *extra)), run_dir, resume="auto")


def params(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model.safetensors"))


def records(run_dir: Path, key: str) -> list[tuple]:
    import json

    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in lines if key in r]


def assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name}: max diff {(a[name] - b[name]).abs().max().item()}"


@pytest.fixture(scope="module")
def eager(one_process_env, data, tmp_path_factory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("eager") / "run"
    return run_dir, train(data, run_dir)


@pytest.fixture(scope="module")
def graph(one_process_env, data, tmp_path_factory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("graph") / "run"
    return run_dir, train(data, run_dir, "dist.cuda_graph=true")


def test_eager_trains_on_one_gpu(eager):
    run_dir, summary = eager
    assert summary["steps"] == STEPS_PER_EPOCH * EPOCHS and summary["test_total"] == 200
    assert summary["final_test_acc"] >= 0.9, summary
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in params(run_dir).values())


def test_graph_step_is_captured_and_equals_eager_bitwise(one_process_env, data, eager, tmp_path, capfd):
    """The CUDA-graph step gives bitwise the eager run: weights, every step's loss, every evaluation."""
    run_dir = tmp_path / "graph"
    summary = train(data, run_dir, "dist.cuda_graph=true")
    if ON_CUDA:
        assert GRAPH_FALLBACK not in capfd.readouterr().err  # the graph ran, not the eager fallback
    eager_dir, eager_summary = eager
    assert_bitwise(params(eager_dir), params(run_dir))
    assert records(run_dir, "train_loss") == records(eager_dir, "train_loss")
    assert records(run_dir, "test_correct") == records(eager_dir, "test_correct")
    assert records(run_dir, "test_loss") == records(eager_dir, "test_loss")
    assert summary["final_test_acc"] == eager_summary["final_test_acc"]


def test_graph_resumes_exactly(one_process_env, data, graph, tmp_path):
    run_dir = tmp_path / "run"
    first = train(data, run_dir, "dist.cuda_graph=true", f"train.max_steps={STOP_AT}")
    assert first["steps"] == STOP_AT
    resumed = train(data, run_dir, "dist.cuda_graph=true")
    golden_dir, golden = graph
    assert resumed["steps"] == STEPS_PER_EPOCH * EPOCHS
    assert_bitwise(params(golden_dir), params(run_dir))
    assert records(run_dir, "train_loss") == records(golden_dir, "train_loss")
    assert resumed["final_test_acc"] == golden["final_test_acc"]


@pytest.mark.parametrize("graph_step", [False, True], ids=["eager", "graph"])
def test_nan_stops_the_run_and_is_never_applied(one_process_env, data, tmp_path, graph_step):
    """An injected NaN batch at step 5 stops the run (at step 5 eager, at the next stop check
    with the graph, which skipped the update in the graph); no checkpoint holds a non-finite
    weight and no final model is written."""
    run_dir = tmp_path / "run"
    with pytest.raises(NonFiniteLoss, match="non-finite loss or gradient at step"), injected("step=5,action=nan"):
        train(data, run_dir, f"dist.cuda_graph={str(graph_step).lower()}", "train.log_every_steps=100",
              "checkpoint.every_steps=4")
    saved = checkpoint.list_checkpoints(run_dir)
    assert saved, "the checkpoint before the NaN step is missing"
    for path in saved:
        assert all(torch.isfinite(t).all() for t in checkpoint.load_checkpoint(path).model.values()), path
    assert not (run_dir / "model.safetensors").exists()


def test_bf16_trains(data, tmp_path):
    """In a process of its own: accelerate's mixed precision is fixed per process."""
    import json
    import subprocess
    import sys

    from mnistdist.launch import child_env
    from tests.conftest import REPO

    run_dir = tmp_path / "run"
    env = {k: v for k, v in child_env().items() if k != "MNISTDIST_DATA_ROOT"}
    result = subprocess.run([sys.executable, str(REPO / "train_dist.py"), "--run-dir", str(run_dir),
                             *overrides(data, "dist.mixed_precision=bf16")],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    if ON_CUDA:
        assert "warning" not in result.stderr, result.stderr[-3000:]  # no fallback to fp32
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_test_acc"] >= 0.8, summary
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in params(run_dir).values())
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in records(run_dir, "train_loss"))


def test_evaluation_is_exact_on_the_gpu(one_process_env, data, eager):
    """Every test image counted once, and the counts are the model's own predictions."""
    run_dir, summary = eager
    cfg = load_config(None, overrides(data))
    counts = training.evaluate_model_file(cfg, run_dir / "model.safetensors")
    assert counts.total == 200 and counts.correct == summary["test_correct"]
    model = MLP(final_relu=cfg.model.final_relu).to(DEVICE)
    model.load_state_dict(params(run_dir))
    tensors = load_tensors(data).to(torch.device(DEVICE))
    with torch.no_grad():
        logits = model(normalize(tensors.test_images, cfg.data.normalize_mean, cfg.data.normalize_std))
    assert int((logits.argmax(1) == tensors.test_labels).sum()) == counts.correct
    assert counts.confusion.sum() == 200
