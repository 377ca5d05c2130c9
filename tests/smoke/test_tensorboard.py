"""TensorBoard beside W&B: ``RUN_DIR/tensorboard/`` holds the numbers of metrics.jsonl at the same
global steps, read back with TensorBoard's own reader (``EventAccumulator``, the loader of
``tensorboard --load_fast=false``, which applies the purge markers of restarted runs).

* every number of every metrics.jsonl record is one scalar event at the record's step, nothing
  more; the final plots are images;
* ``tracking.tensorboard`` and W&B's ``tracking.mode`` are independent (either, both, neither);
  ``tracking.tensorboard=false`` writes no tensorboard directory; ``tracking.plots=false`` writes
  no plots and sends no images to either;
* after stops and resumes (``train.max_steps``, an injected ``raise`` (tests/fault_train.py) after a
  checkpoint), and after a rerun of a run killed before its first checkpoint, each step holds
  exactly one value, the one metrics.jsonl holds;
* a TensorBoard call that raises is reported once and training finishes.

The real training loop runs in this process on tiny synthetic MNIST (10 steps of 100 images
per epoch, 2 epochs).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mnistdist.config import TrackingConfig
from mnistdist.rundir import RunDir
from mnistdist.tracking import Tracker
from tests.conftest import as_one_process
from tests.smoke.test_metrics_history import train  # the same tiny runs (10 steps x 2 epochs)
from tests.synthetic_mnist import write_synthetic_mnist

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

STEPS_PER_EPOCH, EPOCHS = 10, 2
LAST = STEPS_PER_EPOCH * EPOCHS
SHORT = ("train.epochs=1", "train.max_steps=3")  # 3 steps, an evaluation and the plots: enough where the number of steps does not matter
PLOTS = {"plots/loss", "plots/accuracy", "plots/confusion"}
WITH_PLOTS = "tracking.plots=true"  # train() leaves them out where a test does not look at them


@pytest.fixture(scope="module")
def env():
    """The environment of ``python train_dist.py``: no launcher variables, no W&B settings."""
    with pytest.MonkeyPatch.context() as mp:
        yield as_one_process(mp, wandb_mode=None)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_synthetic_mnist(tmp_path_factory.mktemp("data"), num_train=1000, num_test=200)


def records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def expected_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard must show, from metrics.jsonl alone: every number of a training line as
    ``train/<key>``, of an evaluation line as ``eval/<key>``, per-class accuracy as
    ``test_acc_class/<c>``, at the record's step; as float32, TensorBoard's scalar type."""
    want: dict[str, list[tuple[int, float]]] = {}
    for r in records(run_dir):
        prefix = "train/" if "train_loss" in r else "eval/"
        assert "train_loss" in r or "test_acc" in r, r
        values = {prefix + k: v for k, v in r.items() if k != "step" and isinstance(v, (int, float))}
        values.update({f"test_acc_class/{c}": acc for c, acc in enumerate(r.get("per_class_acc", []))})
        for tag, value in values.items():
            want.setdefault(tag, []).append((r["step"], float(np.float32(value))))
    return want


def read_tensorboard(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(acc: EventAccumulator) -> dict[str, list[tuple[int, float]]]:
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def assert_tensorboard_equals_metrics(run_dir: Path) -> EventAccumulator:
    acc = read_tensorboard(run_dir)
    got = scalars(acc)
    for tag, events in got.items():
        repeated = [step for step, n in Counter(step for step, _ in events).items() if n > 1]
        assert not repeated, f"{tag}: steps {repeated} hold more than one value: {events}"
    want = expected_scalars(run_dir)
    assert got.keys() == want.keys()
    for tag in want:
        assert got[tag] == want[tag], tag
    return acc


def test_scalars_and_steps_equal_metrics_jsonl(env, data, tmp_path):
    run_dir = tmp_path / "run"
    train(data, run_dir, WITH_PLOTS)

    acc = assert_tensorboard_equals_metrics(run_dir)
    assert [s for s, _ in scalars(acc)["train/train_loss"]] == list(range(1, LAST + 1))
    assert [s for s, _ in scalars(acc)["eval/test_acc"]] == [STEPS_PER_EPOCH, LAST]
    assert {f"train/{k}" for k in ("train_loss", "lr", "samples_per_s")} <= set(acc.Tags()["scalars"])
    assert {f"test_acc_class/{c}" for c in range(10)} <= set(acc.Tags()["scalars"])
    # The final plots, as images at the last step.
    assert set(acc.Tags()["images"]) == PLOTS
    assert all([e.step for e in acc.Images(tag)] == [LAST] for tag in PLOTS)
    assert acc.Images("plots/confusion")[0].encoded_image_string.startswith(b"\x89PNG")


def test_tensorboard_and_wandb_are_independent(env, data, tmp_path, monkeypatch):
    """tracking.tensorboard with W&B (a stand-in, offline) and without: both, W&B only, neither.
    (TensorBoard only: the other tests, which run with tracking.mode=disabled.) And
    ``tracking.plots``: with it, ``RUN_DIR/plots`` and the images in both; without it, neither."""
    import wandb

    logged: list[tuple[int, str]] = []

    class Run:  # what wandb.init returns
        summary: dict = {}

        def log(self, values: dict, step: int) -> None:
            logged.extend((step, key) for key in values)

        def finish(self, exit_code: int = 0) -> None:
            pass

    monkeypatch.setattr(wandb, "init", lambda **kwargs: Run())
    monkeypatch.setattr(wandb, "setup", lambda settings=None: None)  # no W&B process: init is faked
    for tensorboard, wandb_mode, plots in ((True, "offline", True), (True, "offline", False),
                                           (False, "offline", False), (False, "disabled", False)):
        logged.clear()
        run_dir = tmp_path / f"run-{tensorboard}-{wandb_mode}-{plots}"
        train(data, run_dir, *SHORT, f"tracking.tensorboard={str(tensorboard).lower()}", f"tracking.mode={wandb_mode}",
              f"tracking.plots={str(plots).lower()}")

        assert sorted(p.name for p in run_dir.glob("tensorboard*")) == (["tensorboard"] if tensorboard else [])
        train_steps = [r["step"] for r in records(run_dir) if "train_loss" in r]
        assert train_steps == [1, 2, 3]
        assert sorted({step for step, _ in logged}) == (train_steps if wandb_mode == "offline" else [])
        assert (run_dir / "plots").exists() == plots
        assert {key for _, key in logged if key.startswith("plots/")} == (PLOTS if plots else set())
        if plots:
            assert sorted(p.name for p in (run_dir / "plots").iterdir()) == ["accuracy.png", "confusion.png",
                                                                             "loss.png"]
        if tensorboard:
            acc = assert_tensorboard_equals_metrics(run_dir)
            assert set(acc.Tags()["images"]) == (PLOTS if plots else set())


def test_stopped_and_resumed_runs_hold_each_step_once(env, data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    # Stopped by train.max_steps at step 6 (a checkpoint there), resumed and killed after step 15:
    # its last checkpoint is step 12, so steps 13 and 14 are in the event files twice, once from
    # the killed attempt and once from the resumed one, until TensorBoard discards the first.
    train(data, run_dir, "train.max_steps=6", "checkpoint.every_steps=4", WITH_PLOTS)
    train(data, run_dir, "checkpoint.every_steps=4", WITH_PLOTS, fault_after=15)
    capsys.readouterr()
    summary = train(data, run_dir, "checkpoint.every_steps=4", WITH_PLOTS)

    assert summary["steps"] == LAST
    assert "resumed from" in capsys.readouterr().out
    assert [r["step"] for r in records(run_dir) if "train_loss" in r] == list(range(1, LAST + 1))
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 3
    acc = assert_tensorboard_equals_metrics(run_dir)
    assert [s for s, _ in scalars(acc)["train/train_loss"]] == list(range(1, LAST + 1))
    assert [s for s, _ in scalars(acc)["eval/test_acc"]] == [6, STEPS_PER_EPOCH, LAST]  # 6: the stopped run's
    # A finished run run again trains nothing and logs nothing twice, its plots included.
    train(data, run_dir, WITH_PLOTS)
    acc = assert_tensorboard_equals_metrics(run_dir)
    assert {tag: [e.step for e in acc.Images(tag)] for tag in PLOTS} == {tag: [6, LAST] for tag in PLOTS}


def test_rerun_after_a_kill_before_the_first_checkpoint_sets_old_event_files_aside(env, data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    train(data, run_dir, "train.epochs=1", fault_after=4)  # no checkpoint yet: the rerun starts afresh
    capsys.readouterr()
    train(data, run_dir, "train.epochs=1")

    acc = assert_tensorboard_equals_metrics(run_dir)
    assert [s for s, _ in scalars(acc)["train/train_loss"]] == list(range(1, STEPS_PER_EPOCH + 1))
    old = EventAccumulator(str(run_dir / "tensorboard.old-1"))
    old.Reload()
    assert [e.step for e in old.Scalars("train/train_loss")] == [1, 2, 3]  # kept as it was
    assert "tensorboard.old-1" in capsys.readouterr().err


def test_an_explicit_resumed_step_is_the_purge_point(tmp_path):
    """``Tracker(..., resumed_step=K)``: what an earlier attempt logged after step K is discarded
    as TensorBoard reads it, even where metrics.jsonl was not cut (the Tracker alone); and even
    when the earlier attempt's event file is named with a later second than the resumed one's
    clock shows (a restart within the same second, or a clock a little behind)."""
    run = RunDir(tmp_path)
    cfg = TrackingConfig(mode="disabled")
    with Tracker(cfg, run, {}, enabled=True) as tracker:
        for step in range(1, 6):
            tracker.log({"step": step, "train_loss": float(step), "lr": 0.1, "samples_per_s": 1.0})
    [earlier] = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    earlier.rename(earlier.with_name(f"events.out.tfevents.{int(time.time()) + 1:010d}.zzz.1.0"))
    with Tracker(cfg, run, {}, enabled=True, resumed_step=3) as tracker:
        for step in range(4, 8):
            tracker.log({"step": step, "train_loss": 10.0 * step, "lr": 0.1, "samples_per_s": 1.0})
    assert scalars(read_tensorboard(tmp_path))["train/train_loss"] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0), (7, 70.0)]


class Broken(OSError):
    pass


@pytest.mark.parametrize("method,fail_after", [
    ("add_scalar", 17),   # mid-run, on the training line of step 5 (4 scalars a line)
    ("add_image", 0),     # the final plots
    ("__init__", 0),      # start-up: the event file cannot be created
])
def test_a_failing_tensorboard_call_is_reported_once_and_training_finishes(env, data, tmp_path, capsys,
                                                                          monkeypatch, method, fail_after):
    from torch.utils.tensorboard import SummaryWriter

    calls = {"before": 0, "after": 0}
    real = getattr(SummaryWriter, method)

    def flaky(self, *args: Any, **kwargs: Any) -> Any:
        if calls["before"] >= fail_after:
            calls["after"] += 1
            raise Broken("No space left on device")
        calls["before"] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SummaryWriter, method, flaky)
    run_dir = tmp_path / "run"
    capsys.readouterr()
    steps = STEPS_PER_EPOCH if method == "add_scalar" else 3
    plots = [WITH_PLOTS] if method == "add_image" else []
    summary = train(data, run_dir, "train.epochs=1", f"train.max_steps={steps}", *plots)

    assert summary["steps"] == steps
    assert json.loads((run_dir / "summary.json").read_text())["final_test_acc"] == summary["final_test_acc"]
    assert [r["step"] for r in records(run_dir) if "train_loss" in r] == list(range(1, steps + 1))
    err = capsys.readouterr().err
    warnings = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("tensorboard:")]
    assert len(warnings) == 1 and err.count("tensorboard:") == 1, err
    assert "Broken: No space left on device" in warnings[0]
    assert calls["after"] == 1  # TensorBoard was dropped for the rest of the run
    if method == "add_scalar":
        # What was written before the failure is in the event files, and nothing after it.
        assert [s for s, _ in scalars(read_tensorboard(run_dir))["train/train_loss"]] == [1, 2, 3, 4]
