"""Multi-process CPU runs through the real launcher (accelerate launch, gloo), compared with
one process: sharding, exact evaluation, launchers, pipelines and an end-to-end run (that N
processes train like one: tests/distributed/test_world_sizes.py).

Only the end-to-end run (and the evaluation of its model) reads real MNIST. Where the data is
not the point (sharding, launchers, pipelines) the runs use the tiny synthetic
MNIST in the real IDX format (tests/synthetic_mnist.py): 1,200 training images in global
batches of 120 (10 steps per epoch at 1, 2 or 3 processes) and 200 test images, so such a run
costs little more than its start-up."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mnistdist.launch import free_port
from mnistdist.rundir import read_metrics
from tests.conftest import REPO, check, child_env, launch_cmd, run_cmd
from tests.synthetic_mnist import write_synthetic_mnist

pytestmark = pytest.mark.distributed

NUM_TRAIN = 1200
TEARDOWN_PROBE = REPO / "tests" / "distributed" / "teardown_probe.py"
LATE_RANK0_PROBE = REPO / "tests" / "distributed" / "late_rank0_probe.py"
SYNTHETIC = ["--config", str(REPO / "configs" / "default.yaml"), "train.global_batch_size=120", "tracking.plots=false"]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict[str, str]:
    """The environment of a run on the synthetic data (1,200 training, 200 test images)."""
    root = write_synthetic_mnist(tmp_path_factory.mktemp("data"), num_train=NUM_TRAIN, num_test=200)
    return child_env(MNISTDIST_DATA_ROOT=str(root))


@pytest.fixture(scope="module")
def one_epoch_runs(tmp_path_factory):
    """1 epoch of configs/default.yaml on real MNIST on 2 gloo processes (float32). (That 2
    processes train like one, step by step in float64: tests/distributed/test_world_sizes.py.)"""
    base = tmp_path_factory.mktemp("runs")
    args = ["--config", str(REPO / "configs" / "default.yaml"), "train.epochs=1"]
    return {"p2": (base / "p2", check(run_cmd([*launch_cmd(2, *args), "--run-dir", str(base / "p2")])))}


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, synthetic):
    """accelerate launch, 2 processes, the tensor pipeline, 20 steps (2 epochs) on the
    synthetic data: the reference for the pipeline and the torchrun comparisons. Launched
    through tests/distributed/teardown_probe.py, which trains as train_dist.py does and then
    records each rank's threads in ``run/../threads``."""
    run_dir = tmp_path_factory.mktemp("accelerate") / "run"
    threads = run_dir.parent / "threads"
    threads.mkdir()
    check(run_cmd(launch_cmd(2, *SYNTHETIC, "train.max_steps=20", "--run-dir", str(run_dir), script=TEARDOWN_PROBE),
                  env={**synthetic, "TEARDOWN_PROBE_DIR": str(threads)}))
    return run_dir


def test_two_processes_really_ran(one_epoch_runs):
    _, result = one_epoch_runs["p2"]
    assert "training on 2 process(es), cpu, backend gloo" in result.stdout
    assert "global batch 200 = 2 x 100" in result.stdout


def test_end_to_end_two_processes_reach_95_percent(one_epoch_runs):
    run_dir, _ = one_epoch_runs["p2"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["final_test_acc"] >= 0.95, summary


def test_run_directory_contents(one_epoch_runs):
    run_dir, result = one_epoch_runs["p2"]
    assert {"config.yaml", "metrics.jsonl", "model.safetensors"} <= {p.name for p in run_dir.iterdir()}
    assert {"loss.png", "accuracy.png", "confusion.png"} <= {p.name for p in (run_dir / "plots").iterdir()}
    records = read_metrics(run_dir)
    train_lines = [r for r in records if "train_loss" in r]
    eval_lines = [r for r in records if "test_acc" in r]
    assert len(eval_lines) == 1
    assert {"epoch", "step", "test_loss", "test_acc", "test_correct", "test_total"} <= eval_lines[0].keys()
    assert eval_lines[0]["test_total"] == 10000 and eval_lines[0]["step"] == 300
    assert train_lines and all({"step", "train_loss", "lr", "samples_per_s"} <= r.keys() for r in train_lines)
    steps = [r["step"] for r in train_lines]
    assert steps == sorted(steps) and steps[-1] == 300
    # One epoch line on stdout, from the main process only.
    assert result.stdout.count("epoch 1/10  train_loss") == 0  # epochs=1 override shows 1/1
    assert result.stdout.count("epoch 1/1  train_loss") == 1


@pytest.mark.parametrize("num_processes", [2, 3])
def test_sampler_shards_the_training_set(tmp_path, synthetic, num_processes):
    out = tmp_path / "seen.json"
    probe = launch_cmd(num_processes, str(out), script=REPO / "tests" / "distributed" / "sharding_probe.py")
    check(run_cmd(probe, env=synthetic))
    data = json.loads(out.read_text())
    assert data["world_size"] == num_processes
    seen = data["seen"]
    per_rank = math.ceil(NUM_TRAIN / num_processes)
    for ids in seen:
        assert len(ids) == per_rank  # not NUM_TRAIN/N^2: the loader was not sharded a second time
        assert len(set(ids)) == len(ids)
    assert set().union(*map(set, seen)) == set(range(NUM_TRAIN))


def test_exact_evaluation_at_1_2_3_processes(one_epoch_runs):
    model = one_epoch_runs["p2"][0] / "model.safetensors"
    results = {}
    for n in (1, 2, 3):
        cmd = launch_cmd(n, "mnistdist.cli", "evaluate", "--model", str(model), "--json", module=True)
        out = check(run_cmd(cmd)).stdout.strip().splitlines()
        json_lines = [line for line in out if line.startswith("{")]
        assert len(json_lines) == 1, out  # printed by the main process only
        results[n] = json.loads(json_lines[0])
    for n in (2, 3):
        assert results[n]["test_total"] == 10000
        assert results[n]["test_correct"] == results[1]["test_correct"]
        assert results[n]["confusion"] == results[1]["confusion"]
        assert math.isclose(results[n]["test_loss"], results[1]["test_loss"], rel_tol=1e-6)
    # The same numbers as the training run's own final evaluation.
    last_eval = [r for r in read_metrics(one_epoch_runs["p2"][0]) if "test_acc" in r][-1]
    assert results[1]["test_correct"] == last_eval["test_correct"]
    assert math.isclose(results[1]["test_loss"], last_eval["test_loss"], rel_tol=1e-6)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="thread names from /proc (Linux)")
def test_a_finished_rank_leaves_no_gloo_threads_for_interpreter_exit(two_process_run):
    """Closing the run destroys the process group for real: gloo's worker threads are joined
    while the interpreter is fully alive. Left to interpreter exit they aborted a finished rank
    now and then ("terminate called without an active exception", SIGABRT, exit 1 for a run
    that had said "finished")."""
    for rank in (0, 1):
        record = json.loads((two_process_run.parent / "threads" / f"rank-{rank}.json").read_text())
        assert record["exit_code"] == 0
        left = [name for name in record["threads"] if "gloo" in name]
        assert not left, f"rank {rank}: gloo threads still running after the run closed: {record['threads']}"


def test_a_finished_rank_ends_without_interpreter_finalization(two_process_run):
    """A launched rank whose run is done and closed leaves as multiprocessing's children do,
    without interpreter finalization, where torch can still abort it (a C++ thread taking the
    GIL from a dying interpreter; docs/reliability.md). Its atexit handlers still run."""
    probe = two_process_run.parent / "threads"
    for rank in (0, 1):
        assert (probe / f"rank-{rank}.atexit").exists(), f"rank {rank}: atexit handlers did not run"
        assert not (probe / f"rank-{rank}.finalized").exists(), f"rank {rank} went through interpreter finalization"


def test_both_pipelines_train_identically_on_two_processes(two_process_run, synthetic, tmp_path):
    run_dir = tmp_path / "torchvision"
    check(run_cmd(launch_cmd(2, *SYNTHETIC, "train.max_steps=20", "data.pipeline=torchvision",
                             "--run-dir", str(run_dir)), env=synthetic))
    tensor, torchvision = load_file(two_process_run / "model.safetensors"), load_file(run_dir / "model.safetensors")
    assert "pipeline: tensor" in (two_process_run / "config.yaml").read_text()
    assert "pipeline: torchvision" in (run_dir / "config.yaml").read_text()
    for k in tensor:
        assert torch.equal(tensor[k], torchvision[k]), k


def test_config_error_under_the_launchers_is_one_line(tmp_path, synthetic):
    """A bad value is the same on every rank: said once (by rank 0), before training. Through
    mnistdist.launch that line is all, with exit 2; accelerate's and torchrun's agents add their
    own report and exit 1 (docs/reliability.md). Rank 0 starts 2.5 s after rank 1 here (on a busy
    machine it can be last): launchers stop every rank once one has exited, so the ranks that
    leave the line to rank 0 must not exit before it."""
    message = "error: train.global_batch_size: 201 is not divisible by the 2 processes"
    plain = launch_cmd(2, "train.global_batch_size=201", "--run-dir", str(tmp_path / "r"), script=LATE_RANK0_PROBE)
    wrapped = [sys.executable, "-m", "mnistdist.launch", *plain[2:]]
    for cmd in (plain, wrapped):
        result = run_cmd(cmd, env={**synthetic, "LATE_RANK0_S": "2.5"}, timeout=120)
        assert result.stderr.count(message) == 1, result.stderr[-3000:]
        assert "[rank 1]" not in result.stderr
        assert "mnistdist/" not in result.stderr and "probe.py\", line" not in result.stderr
        assert not (tmp_path / "r").exists()
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [message + "; use a multiple of 2"]


def test_accelerate_commands_that_start_one_process_instead_of_two_are_refused(synthetic, tmp_path):
    """`accelerate launch --num_processes 2` (no accelerate config) and `--cpu --num_processes 2`
    start ONE process on a machine without GPUs; it must not train alone."""
    accelerate = str(Path(sys.executable).parent / "accelerate")
    env = {**synthetic, "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf")}  # no user accelerate config
    for flags in (["--num_processes", "2"], ["--cpu", "--num_processes", "2"]):
        result = run_cmd([accelerate, "launch", *flags, str(REPO / "train_dist.py"), "--run-dir", str(tmp_path / "r")],
                         env=env, timeout=120)
        assert result.returncode != 0, result.stdout[-2000:]
        assert "error: accelerate launch started 1 process although more were asked for" in result.stderr
        assert "configs/accelerate/cpu.yaml" in result.stderr and "Traceback (most recent call last)" not in \
            result.stderr.split("error: accelerate launch started")[0]
        assert not (tmp_path / "r").exists()
    # Plain `accelerate launch train_dist.py` stays a valid one-process run.
    one = check(run_cmd([accelerate, "launch", str(REPO / "train_dist.py"), "train.max_steps=5",
                         "--run-dir", str(tmp_path / "one")], env=env, timeout=300))
    assert "training on 1 process(es)" in one.stdout


def test_torchrun_is_a_first_class_launcher(two_process_run, synthetic, tmp_path):
    """torchrun --nproc_per_node 2 trains exactly like accelerate's 2-process launch."""
    torchrun = str(Path(sys.executable).parent / "torchrun")
    check(run_cmd([torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), str(REPO / "train_dist.py"),
                   *SYNTHETIC, "train.max_steps=20", "--run-dir", str(tmp_path / "torchrun")], env=synthetic, timeout=300))
    a, b = load_file(tmp_path / "torchrun" / "model.safetensors"), load_file(two_process_run / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "torchrun" / "summary.json").read_text())["world_size"] == 2
