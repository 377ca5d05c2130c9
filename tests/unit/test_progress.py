"""tracking.progress -> bar, lines or off (mnistdist.progress.resolve), and the Progress object
of a process that is not the main one. Pure and fast: no training."""

from __future__ import annotations

import io

import pytest

from mnistdist.progress import Progress, resolve


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("mode", "terminal", "tqdm_disable", "expected"), [
    ("auto", True, None, "bar"),
    ("auto", False, None, "lines"),
    ("auto", True, "1", "off"),
    ("auto", False, "1", "off"),
    ("auto", True, "0", "bar"),       # 0, false, no, off and empty mean "not set"
    ("auto", True, "false", "bar"),
    ("auto", True, "", "bar"),
    ("bar", False, None, "bar"),      # asked for: a bar even into a file
    ("bar", True, "true", "off"),
    ("lines", True, None, "lines"),
    ("lines", False, "1", "lines"),   # explicit lines are not tqdm's: TQDM_DISABLE leaves them
    ("off", True, None, "off"),
])
def test_resolve(mode, terminal, tqdm_disable, expected):
    stderr = Terminal() if terminal else io.StringIO()
    environ = {} if tqdm_disable is None else {"TQDM_DISABLE": tqdm_disable}
    assert resolve(mode, stderr, environ) == expected


@pytest.mark.parametrize("mode", ["auto", "bar", "lines", "off"])
def test_only_the_main_process_writes(mode, capsys):
    progress = Progress(mode, enabled=False, epochs=2, last_step=20, global_batch_size=100)
    with progress:
        progress.start_epoch(0, steps=10)
        for step in range(1, 11):
            progress.step()
            progress.log({"epoch": 1, "step": step, "train_loss": 0.5, "lr": 0.1})
        progress.epoch_end({"epoch": 1, "step": 10})  # the evaluation is not even looked at
    assert capsys.readouterr() == ("", "")


def test_throughput_counts_the_steps_since_the_last_record_and_training_time_only(monkeypatch):
    """samples/s of a training record: the steps since the previous record (or the epoch's start);
    of an epoch: all its steps over the time to its last record, so what follows (evaluation,
    checkpoints) is not training time."""
    now = [100.0]
    monkeypatch.setattr("mnistdist.progress.time.perf_counter", lambda: now[0])
    progress = Progress("off", enabled=True, epochs=1, last_step=6, global_batch_size=50)
    progress.start_epoch(0, steps=6)
    for step, at in ((1, 101.0), (2, 102.0), (3, 102.0), (4, 103.0), (5, 104.0), (6, 105.0)):
        now[0] = at
        progress.step()
        if step in (2, 6):
            record = progress.log({"epoch": 1, "step": step, "train_loss": 0.5, "lr": 0.1})
            assert record["samples_per_s"] == (50 * 2 / 2.0 if step == 2 else 50 * 4 / 3.0)
    now[0] = 200.0  # evaluating, then the epoch record
    record = progress.epoch_end({"epoch": 1, "step": 6, "train_loss_epoch": 0.5, "test_loss": 0.4, "test_acc": 0.9,
                                 "test_correct": 9, "test_total": 10})
    assert record["epoch_time_s"] == 5.0 and record["samples_per_s"] == 50 * 6 / 5.0
    assert progress.train_time_s == 5.0


def test_trained_s_counts_the_epoch_in_progress_up_to_its_latest_record(monkeypatch):
    """What a checkpoint carries on to the next job: ended epochs, and the current one's training
    so far (a mid-epoch stop); never the time after an epoch's last record twice."""
    now = [100.0]
    monkeypatch.setattr("mnistdist.progress.time.perf_counter", lambda: now[0])
    progress = Progress("off", enabled=False, epochs=2, last_step=4, global_batch_size=50)
    assert progress.trained_s == 0.0
    progress.start_epoch(0, steps=2)
    now[0] = 103.0
    progress.step()
    progress.log({"epoch": 1, "step": 1, "train_loss": 0.5, "lr": 0.1})
    now[0] = 104.0  # a step not yet logged is not counted
    assert progress.trained_s == 3.0
    progress.epoch_end({"epoch": 1, "step": 1, "train_loss_epoch": 0.5, "test_loss": 0.4, "test_acc": 0.9,
                        "test_correct": 9, "test_total": 10})
    now[0] = 150.0  # evaluation and the epoch's checkpoint
    assert progress.trained_s == progress.train_time_s == 3.0
    progress.start_epoch(1, steps=2)
    now[0] = 152.0
    progress.step()
    progress.log({"epoch": 2, "step": 2, "train_loss": 0.5, "lr": 0.1})
    assert progress.trained_s == 5.0
