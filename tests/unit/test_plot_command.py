"""``mnistdist plot`` on metrics.jsonl files that training never writes: one line, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mnistdist import cli

CONFUSION = [[100 if i == j else 0 for j in range(10)] for i in range(10)]


def metrics(run_dir: Path, *records: dict) -> Path:
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


TRAIN = {"step": 1, "train_loss": 0.5, "lr": 0.1}
EVAL = {"step": 2, "epoch": 1, "test_loss": 0.3, "test_acc": 0.9, "confusion": CONFUSION}


@pytest.mark.parametrize("records, message", [
    ([{**TRAIN, "train_loss": "nan"}, EVAL],
     "the record of step 1: train_loss: must be a finite number (or null); got 'nan'"),
    ([TRAIN, {**EVAL, "test_acc": "high"}],
     "the record of step 2: test_acc: must be a finite number (or null); got 'high'"),
    ([TRAIN, {**EVAL, "test_loss": True}],
     "the record of step 2: test_loss: must be a finite number (or null); got True"),
    ([{**TRAIN, "step": "one"}, EVAL], "the record of step 'one': step: must be a finite number"),
    ([TRAIN, {**EVAL, "epoch": 10 ** 400}], "epoch: must be a finite number (or null); got 1000"),
    ([TRAIN, {**EVAL, "confusion": [["a"] * 10] + CONFUSION[1:]}],
     "the record of step 2: confusion: must be 10x10 counts (whole numbers >= 0)"),
])
def test_bad_values_in_metrics_are_one_line(tmp_path, capsys, records, message):
    run = metrics(tmp_path / "run", *records)
    assert cli.main(["plot", str(run), "--no-evaluate"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {run / 'metrics.jsonl'}: ") and message in err and "\n" not in err, err
    assert not (run / "plots").exists()


def test_null_values_are_plotted_as_gaps(tmp_path, capsys):
    run = metrics(tmp_path / "run", {**TRAIN, "train_loss": None}, {**TRAIN, "step": 2}, EVAL)
    assert cli.main(["plot", str(run), "--no-evaluate"]) == 0
    assert sorted(p.name for p in (run / "plots").iterdir()) == ["accuracy.png", "confusion.png", "loss.png"]
