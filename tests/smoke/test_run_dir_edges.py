"""The run directory at its edges, through the command line (``cli.train_main``) in this process,
on tiny synthetic MNIST (20 steps per epoch, 2 epochs):

* a ``.lock`` that is a link is refused, and nothing is written through it;
* checkpoints that all fail to load stop the run (one line naming them, exit 2, nothing
  replaced); ``--resume never`` starts over, keeping them aside;
* a run directory deleted or replaced during the run stops it (one line, exit 1);
* a finished run stays finished: a rerun says so and writes nothing; more epochs need
  ``--allow-config-change``;
* summary.json describes the whole run, over a stop and a resume.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from mnistdist import checkpoint, cli, training
from mnistdist.metrics import EvalCounts
from mnistdist.rundir import read_metrics
from mnistdist.signals import EXIT_INTERRUPTED
from tests.fault_train import injected
from tests.smoke.test_train_smoke import data, overrides  # noqa: F401 - fixtures

LAST = 40


def train(run_dir: Path, data: Path, *extra: str, flags: tuple[str, ...] = ()) -> int:  # noqa: F811
    """``train_dist.py --run-dir RUN_DIR FLAGS`` on the synthetic data with ``extra`` overrides."""
    return cli.train_main(["--run-dir", str(run_dir), *flags, *overrides(data, *extra)])


def tree(root: Path) -> dict[str, tuple[int, str]]:
    """Every file under ``root`` but the lock (whose holder line each job rewrites): its
    modification time and a hash of its bytes."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def finished(one_process_env, data, tmp_path_factory) -> Path:  # noqa: F811
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert train(run_dir, data) == 0
    return run_dir


@pytest.fixture
def finished_copy(finished, tmp_path) -> Path:
    shutil.copytree(finished, tmp_path / "run", symlinks=True)
    return tmp_path / "run"


def test_a_lock_that_is_a_link_is_refused_in_one_line(one_process_env, data, tmp_path, capsys):  # noqa: F811
    run_dir, outside = tmp_path / "run", tmp_path / "precious.txt"
    run_dir.mkdir()
    outside.write_text("keep me\n")
    (run_dir / ".lock").symlink_to(outside)
    assert train(run_dir, data) == 2
    assert one_line(capsys.readouterr().err).startswith("error: ")
    assert outside.read_text() == "keep me\n"
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]


# --------------------------------------------------------------------------------------
# Checkpoints none of which loads


@pytest.fixture(scope="module")
def killed_once(one_process_env, data, tmp_path_factory) -> Path:  # noqa: F811
    """A run killed after step 25 with checkpoints at steps 10 and 20 (trained once per file)."""
    run_dir = tmp_path_factory.mktemp("killed") / "run"
    with pytest.raises(RuntimeError, match="injected fault after step 25"), injected("step=25,action=raise"):
        train(run_dir, data, "checkpoint.every_steps=10")
    return run_dir


@pytest.fixture
def all_damaged(killed_once, tmp_path) -> Path:
    """A copy of ``killed_once`` with one byte flipped in each checkpoint (an intact copy of
    each is kept in ``tmp_path / "intact"``)."""
    run_dir = shutil.copytree(killed_once, tmp_path / "run", symlinks=True)
    found = checkpoint.list_checkpoints(run_dir)
    assert [p.name for p in found] == ["step-00000020", "step-00000010"]
    for path in found:
        shutil.copytree(path, tmp_path / "intact" / path.name)
        flip_a_byte(path / "model.safetensors")
    return run_dir


def test_checkpoints_none_of_which_loads_stop_the_run_naming_them(all_damaged, data, capsys):  # noqa: F811
    before = tree(all_damaged)
    capsys.readouterr()
    assert train(all_damaged, data) == 2
    out, err = capsys.readouterr()
    line = one_line(err)
    assert line.startswith("error: ") and "step-00000020" in line and "step-00000010" in line
    assert "checksum mismatch" in line and "--resume never" in line
    assert "warning" not in out + err and "resumed" not in out
    assert tree(all_damaged) == before  # nothing replaced, nothing set aside


def test_resume_never_starts_over_keeping_the_damaged_checkpoints_aside(all_damaged, data, capsys):  # noqa: F811
    damaged = tree(all_damaged / "checkpoints")
    capsys.readouterr()
    assert train(all_damaged, data, flags=("--resume", "never")) == 0
    err = capsys.readouterr().err
    assert "checkpoints.old-1" in err
    assert tree(all_damaged / "checkpoints.old-1") == damaged  # kept as they were
    assert (all_damaged / "metrics.jsonl.old-1").is_file()  # the earlier start's history, kept aside too
    assert [r["step"] for r in read_metrics(all_damaged) if "train_loss" in r] == list(range(1, LAST + 1))
    assert json.loads((all_damaged / "summary.json").read_text())["steps"] == LAST


def test_resume_never_still_refuses_when_a_checkpoint_loads(all_damaged, data, capsys):  # noqa: F811
    older = all_damaged / "checkpoints" / "step-00000010"
    shutil.rmtree(older)
    shutil.copytree(all_damaged.parent / "intact" / older.name, older)
    before = tree(all_damaged)
    capsys.readouterr()
    assert train(all_damaged, data, flags=("--resume", "never")) == 2
    assert "already holds checkpoints" in one_line(capsys.readouterr().err)
    assert tree(all_damaged) == before


# --------------------------------------------------------------------------------------
# A run directory deleted while the run uses it


@pytest.mark.parametrize("recreated", [False, True])
def test_a_run_directory_deleted_during_the_run_stops_it(one_process_env, data, tmp_path, capsys, recreated):  # noqa: F811
    run_dir = tmp_path / "run"
    build_step = training.build_step

    def deleting_build_step(*args, **kwargs):
        step = build_step(*args, **kwargs)

        def deleting_step(x, y, lr, number):
            stop = step(x, y, lr, number)
            if number == 5:  # someone removes the run directory (and perhaps starts using the name again)
                shutil.rmtree(run_dir)
                if recreated:
                    run_dir.mkdir()
            return stop

        return deleting_step

    training.build_step = deleting_build_step
    try:  # (TensorBoard off: its writer would report the missing directory in a line of its own)
        code = train(run_dir, data, "tracking.tensorboard=false")
    finally:
        training.build_step = build_step
    assert code == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith("error: ") and str(run_dir) in line
    # Nothing of the run was written into the directory that now has its name.
    assert (sorted(p.name for p in run_dir.iterdir()) == [] if recreated else not run_dir.exists())


# --------------------------------------------------------------------------------------
# A finished run


def test_a_finished_run_stays_finished(finished_copy, data, capsys, monkeypatch):  # noqa: F811
    before = tree(finished_copy)
    summary = json.loads((finished_copy / "summary.json").read_text())

    def no_tracking(*args, **kwargs):
        raise AssertionError("a finished run started tracking (W&B, TensorBoard, metrics.jsonl)")

    monkeypatch.setattr(training, "start_tracking", no_tracking)
    capsys.readouterr()
    assert train(finished_copy, data) == 0
    out, err = capsys.readouterr()
    line = one_line(out)
    assert line.startswith(f"already finished: {finished_copy}") and f"step {LAST}" in line
    assert f"{100 * summary['final_test_acc']:.2f}%" in line and str(finished_copy / "model.safetensors") in line
    assert err == ""
    assert tree(finished_copy) == before


def test_a_run_finished_at_max_steps_stays_finished_and_continues_without_it(one_process_env, data, tmp_path,  # noqa: F811
                                                                            capsys):
    run_dir = tmp_path / "run"
    assert train(run_dir, data, "train.max_steps=13") == 0
    before = tree(run_dir)
    capsys.readouterr()
    assert train(run_dir, data, "train.max_steps=13") == 0
    assert one_line(capsys.readouterr().out).startswith("already finished: ")
    assert tree(run_dir) == before
    assert train(run_dir, data) == 0  # more steps of the same trajectory: it continues
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == LAST


def test_more_epochs_for_a_finished_run_need_allow_config_change(finished_copy, data, capsys):  # noqa: F811
    before = tree(finished_copy)
    capsys.readouterr()
    assert train(finished_copy, data, "train.epochs=3") == 2
    line = one_line(capsys.readouterr().err)
    assert "train.epochs 2 -> 3" in line and "--allow-config-change" in line
    assert tree(finished_copy) == before
    assert train(finished_copy, data, "train.epochs=3", flags=("--allow-config-change",)) == 0
    summary = json.loads((finished_copy / "summary.json").read_text())
    assert summary["steps"] == 60 and summary["epochs"] == 3


# --------------------------------------------------------------------------------------
# summary.json of a stopped and resumed run


def scored(accuracy_of_every_evaluation: float):
    """``training.evaluate`` whose counts are replaced by a confusion matrix of accuracy 1 (every
    image right) or 0 (every image taken for the next class): numbers a real run could log."""
    evaluate = training.evaluate

    def fake(*args, **kwargs):
        counts = evaluate(*args, **kwargs)
        confusion = torch.diag(counts.confusion.sum(dim=1))
        if accuracy_of_every_evaluation == 0.0:
            confusion = confusion.roll(1, dims=1)
        return EvalCounts(confusion, counts.loss_sum)

    return fake


def test_the_training_time_of_a_stopped_and_resumed_run_covers_the_whole_run(one_process_env, data, tmp_path,  # noqa: F811
                                                                      monkeypatch):
    run_dir = tmp_path / "run"
    monkeypatch.setattr(training, "evaluate", scored(1.0))  # the first job's evaluation (epoch 1) is the best
    with injected("step=27,action=INT"):
        assert train(run_dir, data) == EXIT_INTERRUPTED  # stopped after step 30, mid-epoch 2
    monkeypatch.setattr(training, "evaluate", scored(0.0))
    assert train(run_dir, data) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    evals = [r for r in read_metrics(run_dir) if "test_acc" in r]
    assert [(r["step"], r["test_acc"]) for r in evals] == [(20, 1.0), (40, 0.0)]
    # Without a validation set nothing is chosen: the best model is the final one (the first
    # job's better test result does not count; tests/smoke/test_validation.py resumes a best).
    assert summary["best_test_acc"] == summary["final_test_acc"] == 0.0
    # The training time of both jobs: at least the first epoch (first job) and the second's rest.
    assert summary["train_time_s"] >= sum(r["epoch_time_s"] for r in evals) > 0
    assert summary["train_time_s"] > evals[1]["epoch_time_s"]
