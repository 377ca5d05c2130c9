"""metrics.jsonl stays one clean history: after any sequence of kills, reruns and resumes in the
same run directory, every training step and every evaluation appears once, with the numbers of
an uninterrupted run, and every line is one JSON object.

* a run killed before its first checkpoint, rerun: a fresh start, so the old file is kept aside
  as ``metrics.jsonl.old-<N>`` and a new history begins;
* a run killed after a checkpoint, resumed: the lines past the checkpoint are dropped;
* a half-written last line (a kill while writing): dropped with a warning, never glued to the
  next record.

The real training loop runs in this process on tiny synthetic MNIST; a "kill" is the fault
``injected("step=K,action=raise")`` of tests/fault_train.py (training raises after step K) and, for a
half-written line, text appended to metrics.jsonl afterwards.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mnistdist import training
from mnistdist.config import load_config
from tests.fault_train import injected
from tests.synthetic_mnist import write_synthetic_mnist

STEPS_PER_EPOCH, EPOCHS = 10, 2  # 1000 synthetic images in batches of 100
LAST = STEPS_PER_EPOCH * EPOCHS
HALF_LINES = ("cut", "no-newline")


def half_line(kind: str, step: int) -> str:
    """The training line of ``step`` as a kill leaves it: cut in the middle, or all but its newline."""
    line = json.dumps({"epoch": 1 + (step - 1) // STEPS_PER_EPOCH, "step": step, "train_loss": 0.5, "lr": 0.1,
                       "samples_per_s": 1.0})
    return line[: len(line) // 2] if kind == "cut" else line


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_synthetic_mnist(tmp_path_factory.mktemp("data"), num_train=1000, num_test=200)


def train(data: Path, run_dir: Path, *extra: str, fault_after: int | None = None) -> dict | None:
    """One run in ``run_dir`` (resume auto); with ``fault_after`` it is killed after that step."""
    cfg = load_config(None, [f"data.root={data}", "data.download=false", "dist.device=cpu",
                             "tracking.mode=disabled", f"train.epochs={EPOCHS}", "train.global_batch_size=100",
                             "train.log_every_steps=1", "tracking.plots=false", *extra])
    if fault_after is None:
        return training.run(cfg, run_dir, resume="auto")
    with pytest.raises(RuntimeError, match=f"injected fault after step {fault_after}"):
        with injected(f"step={fault_after},action=raise"):
            training.run(cfg, run_dir, resume="auto")
    return None


def history(run_dir: Path, name: str = "metrics.jsonl") -> dict[str, list[tuple]]:
    """Training lines and evaluation lines, read strictly: every line must be one JSON object."""
    records = [json.loads(line) for line in (run_dir / name).read_text().splitlines()]
    assert all(isinstance(r, dict) for r in records)
    return {
        "train": [(r["step"], r["train_loss"]) for r in records if "train_loss" in r],
        "evals": [(r["epoch"], r["step"], r["test_correct"], r["test_loss"]) for r in records if "test_acc" in r],
    }


def checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))


@pytest.fixture(scope="module")
def golden(one_process_env, data, tmp_path_factory) -> dict[str, list[tuple]]:
    run_dir = tmp_path_factory.mktemp("golden") / "run"
    train(data, run_dir)
    h = history(run_dir)
    assert [s for s, _ in h["train"]] == list(range(1, LAST + 1))
    assert [(e, s) for e, s, _, _ in h["evals"]] == [(1, STEPS_PER_EPOCH), (2, LAST)]
    return h


def assert_one_clean_history(run_dir: Path, golden: dict[str, list[tuple]]) -> None:
    h = history(run_dir)
    steps = [s for s, _ in h["train"]]
    assert len(steps) == len(set(steps)), f"a training step appears twice: {steps}"
    assert h == golden


def test_rerun_after_a_kill_before_the_first_checkpoint_starts_a_new_history(one_process_env, data, golden, tmp_path, capsys):
    run_dir = tmp_path / "run"
    train(data, run_dir, fault_after=4)
    assert not checkpoints(run_dir)  # nothing to resume from
    assert [s for s, _ in history(run_dir)["train"]] == [1, 2, 3]  # raised before step 4's line
    capsys.readouterr()

    train(data, run_dir)

    assert_one_clean_history(run_dir, golden)
    # The old history is kept aside, untouched, and the log says where.
    assert [s for s, _ in history(run_dir, "metrics.jsonl.old-1")["train"]] == [1, 2, 3]
    assert "metrics.jsonl.old-1" in capsys.readouterr().err


def test_half_written_last_line_before_the_first_checkpoint(one_process_env, data, golden, tmp_path):
    half = "no-newline"  # a whole record but its newline: it parses, and today the rerun's first record is glued to it
    run_dir = tmp_path / "run"
    train(data, run_dir, fault_after=4)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(half_line(half, 4))

    train(data, run_dir)

    assert_one_clean_history(run_dir, golden)
    assert (run_dir / "metrics.jsonl.old-1").read_text().endswith("\n" + half_line(half, 4))  # kept as it was


@pytest.mark.parametrize("half", HALF_LINES)
def test_half_written_last_line_is_dropped_on_resume_with_a_warning(one_process_env, data, golden, tmp_path, capsys, half):
    run_dir = tmp_path / "run"
    train(data, run_dir, fault_after=STEPS_PER_EPOCH + 4)  # killed 4 steps after the epoch-end checkpoint
    assert checkpoints(run_dir) == [f"step-{STEPS_PER_EPOCH:08d}"]
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(half_line(half, STEPS_PER_EPOCH + 4))
    capsys.readouterr()

    train(data, run_dir)

    out = capsys.readouterr()
    assert f"resumed from {run_dir / 'checkpoints' / f'step-{STEPS_PER_EPOCH:08d}'}" in out.out
    assert "warning:" in out.err and "half-written" in out.err, out.err  # dropped, and said so
    assert_one_clean_history(run_dir, golden)
    assert not list(run_dir.glob("metrics.jsonl.old-*"))  # a resume continues the same history


def test_every_kind_of_interruption_in_a_row(one_process_env, data, golden, tmp_path):
    """Killed before the first checkpoint; rerun, killed after one; a half-written line; resumed;
    killed again mid-epoch; resumed to the end: still one history, equal to the uninterrupted one."""
    run_dir = tmp_path / "run"
    train(data, run_dir, fault_after=3)
    train(data, run_dir, fault_after=STEPS_PER_EPOCH + 2)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(half_line("cut", STEPS_PER_EPOCH + 2))
    train(data, run_dir, fault_after=STEPS_PER_EPOCH + 7)
    train(data, run_dir)

    assert_one_clean_history(run_dir, golden)
    assert [s for s, _ in history(run_dir, "metrics.jsonl.old-1")["train"]] == [1, 2]
    assert not (run_dir / "metrics.jsonl.old-2").exists()


def test_metrics_log_never_glues_a_record_to_a_half_written_line(tmp_path):
    """Belt and braces for any path that skips rundir.start: the log starts a new line."""
    from mnistdist.tracking import MetricsLog

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "tr')
    log = MetricsLog(path, enabled=True)
    log.log({"step": 2, "train_loss": 0.5})
    log.close()
    assert path.read_text().splitlines()[-1] == '{"step": 2, "train_loss": 0.5}'
