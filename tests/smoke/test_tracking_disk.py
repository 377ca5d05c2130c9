"""A disk that fills up, or a directory that cannot be written, under the files a run records.

* metrics.jsonl cannot be written: training stops at once with one line naming the file (exit
  1), without a new checkpoint, so the newest one resumes into a complete history; TensorBoard
  and W&B are still closed and finished;
* TensorBoard's event file cannot be written (a full disk, a read-only ``tensorboard/``): one
  line, no traceback from TensorBoard's writer thread, and training finishes.

A full disk is ``/dev/full`` under the file (``fill_disk``): every later write to it fails with
ENOSPC, as on a full disk, while the rest of the run directory stays writable.
The real training loop runs in this process on tiny synthetic MNIST (10 steps per epoch).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mnistdist import checkpoint, cli, tracking
from tests.conftest import as_one_process
from tests.smoke.test_metrics_history import train
from tests.synthetic_mnist import write_synthetic_mnist

# A traceback printed by a thread (TensorBoard's writer) reaches pytest as this warning: an error here.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_synthetic_mnist(tmp_path_factory.mktemp("data"), num_train=1000, num_test=200)


@pytest.fixture
def env(monkeypatch):
    return as_one_process(monkeypatch, wandb_mode=None)


def fill_disk(run_dir: Path, metrics: bool, tensorboard: bool) -> None:
    """Every later write to metrics.jsonl (an open descriptor: /dev/full is put under it) or to
    the TensorBoard event files (opened by name for each write: the name now leads to /dev/full)
    fails with ENOSPC, as on a full disk."""
    if metrics:
        full = os.open("/dev/full", os.O_WRONLY)
        try:
            for fd in os.listdir("/proc/self/fd"):
                try:
                    target = os.readlink(f"/proc/self/fd/{fd}")
                except OSError:
                    continue
                if target == str(run_dir / "metrics.jsonl"):
                    os.dup2(full, int(fd))
        finally:
            os.close(full)
    if tensorboard:
        for events in (run_dir / "tensorboard").glob("events.out.tfevents.*"):
            events.rename(events.with_name(f"written-{events.name}"))
            events.symlink_to("/dev/full")


def full_disk_at(monkeypatch: pytest.MonkeyPatch, step: int, run_dir: Path, metrics: bool, tensorboard: bool) -> None:
    """Before metrics.jsonl gets the record of ``step``, the disk is full under these files."""
    real = tracking.MetricsLog.log

    def log(self: Any, record: dict[str, Any]) -> None:
        if record.get("step") == step:
            fill_disk(run_dir, metrics, tensorboard)
        real(self, record)

    monkeypatch.setattr(tracking.MetricsLog, "log", log)


def no_tracebacks(err: str) -> None:
    assert "Traceback" not in err and "Exception in thread" not in err, err


def test_a_full_disk_under_metrics_jsonl_stops_training_in_one_line(env, data, tmp_path, capsys, monkeypatch):
    import wandb

    finished: list[int] = []

    class Run:  # what wandb.init returns
        summary: dict = {}

        def log(self, values: dict, step: int) -> None:
            pass

        def finish(self, exit_code: int = 0) -> None:
            finished.append(exit_code)

    monkeypatch.setattr(wandb, "init", lambda **kwargs: Run())
    monkeypatch.setattr(wandb, "setup", lambda settings=None: None)  # no W&B process: init is faked
    run_dir = tmp_path / "run"
    args = ["--run-dir", str(run_dir), f"data.root={data}", "data.download=false", "dist.device=cpu",
            "tracking.mode=offline", "train.epochs=1", "train.global_batch_size=100", "train.log_every_steps=1",
            "checkpoint.every_steps=4", "tracking.progress=off", "tracking.plots=false"]
    full_disk_at(monkeypatch, 7, run_dir, metrics=True, tensorboard=True)
    capsys.readouterr()

    assert cli.train_main(args) == 1

    err = capsys.readouterr().err
    no_tracebacks(err)
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: cannot write {run_dir / 'metrics.jsonl'} (No space left on device)"), err
    assert finished == [1]  # W&B still finished, as failed
    [newest] = checkpoint.list_checkpoints(run_dir)[:1]
    assert newest.name == "step-00000004"  # no checkpoint after the failure
    checkpoint.load_checkpoint(newest)
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    assert not (run_dir / "summary.json").exists()

    # With room again, the run resumes from step 4 into one complete history.
    monkeypatch.undo()
    as_one_process(monkeypatch, wandb_mode="disabled")
    assert cli.train_main(args) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train_loss" in r] == list(range(1, 11))


@pytest.fixture
def read_only_dir(tmp_path) -> Iterator[Path]:
    """An empty directory nobody can create files in, root included (``chattr +i``)."""
    path = tmp_path / "run" / "tensorboard"
    path.mkdir(parents=True)
    if os.geteuid() != 0:
        path.chmod(0o555)
    elif subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("cannot make a directory read-only for root here (chattr +i)")
    try:
        yield path
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        path.chmod(0o755)


def test_a_read_only_tensorboard_directory_is_one_line(one_process_env, data, read_only_dir, capsys):
    run_dir = read_only_dir.parent
    capsys.readouterr()
    summary = train(data, run_dir, "train.epochs=1", "tracking.tensorboard=true")
    assert summary["steps"] == 10
    err = capsys.readouterr().err
    no_tracebacks(err)
    warnings = [line for line in err.splitlines() if line.startswith("tensorboard:")]
    assert len(warnings) == 1, err
    assert "could not start" in warnings[0] and ("Permission denied" in warnings[0] or "not permitted" in warnings[0])


def test_a_full_disk_under_tensorboard_is_one_line_and_training_finishes(one_process_env, data, tmp_path, capsys,
                                                                       monkeypatch):
    run_dir = tmp_path / "run"
    full_disk_at(monkeypatch, 5, run_dir, metrics=False, tensorboard=True)
    capsys.readouterr()
    summary = train(data, run_dir, "train.epochs=1", "tracking.tensorboard=true")
    assert summary["steps"] == 10
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train_loss" in r] == list(range(1, 11))
    err = capsys.readouterr().err
    no_tracebacks(err)
    warnings = [line for line in err.splitlines() if line.startswith("tensorboard:")]
    assert len(warnings) == 1 and "No space left on device" in warnings[0], err
