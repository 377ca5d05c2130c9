"""tracking.progress -> bar, lines or off (mnistdist.progress.resolve), and the Progress object
of a process that is not the main one. Pure and fast: no training."""

from __future__ import annotations

import io

import pytest

from mnistdist.progress import Progress, finished_line, precision_name, resolve, start_line


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
            progress.update()
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
        progress.update()
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
    progress.update()
    progress.log({"epoch": 1, "step": 1, "train_loss": 0.5, "lr": 0.1})
    now[0] = 104.0  # a step not yet logged is not counted
    assert progress.trained_s == 3.0
    progress.epoch_end({"epoch": 1, "step": 1, "train_loss_epoch": 0.5, "test_loss": 0.4, "test_acc": 0.9,
                        "test_correct": 9, "test_total": 10})
    now[0] = 150.0  # evaluation and the epoch's checkpoint
    assert progress.trained_s == progress.train_time_s == 3.0
    progress.start_epoch(1, steps=2)
    now[0] = 152.0
    progress.update()
    progress.log({"epoch": 2, "step": 2, "train_loss": 0.5, "lr": 0.1})
    assert progress.trained_s == 5.0
START = {"world_size": 7, "device": "cpu", "backend": "gloo", "dtype": "float32", "precision": "float32",
         "threads_per_process": 1, "global_batch_size": 700, "per_process_batch_size": 100, "steps_per_epoch": 86,
         "training_images": 60000, "validation_images": 0, "repeated_images_per_epoch": 4}


def test_precision_names_what_computes():
    assert precision_name("float32", "no") == "float32" and precision_name("float64", "no") == "float64"
    assert precision_name("float32", "bf16") == "bf16-mixed"


def test_start_line_names_precision_threads_and_the_repeated_images():
    line = start_line(START, "runs/a")
    assert line == ("training on 7 process(es), cpu, backend gloo; precision float32, 1 thread(s) per process; "
                    "global batch 700 = 7 x 100; 86 steps/epoch over 60000 images; 4 image(s) repeated per epoch "
                    "to share 60000 among 7 processes: not exactly the 1-process result; run dir runs/a")
    bf16 = start_line({**START, "world_size": 1, "precision": "bf16-mixed", "per_process_batch_size": 700,
                       "repeated_images_per_epoch": 0, "validation_images": 5000, "training_images": 55000}, "r")
    assert "; precision bf16-mixed (float32 weights), 1 thread(s) per process;" in bf16
    assert "86 steps/epoch over 55000 images (5000 held out for validation); run dir r" in bf16
    assert "repeated" not in bf16


def test_finished_line_names_the_models_and_their_test_accuracy():
    summary = {"steps": 3000, "model": "runs/a/model.safetensors", "final_test_acc": 0.9825, "test_correct": 9825,
               "test_total": 10000, "best_model": "runs/a/model.safetensors", "best_test_acc": 0.9825}
    assert finished_line(summary) == "finished after 3000 steps: runs/a/model.safetensors test_acc 98.25% (9825/10000)"
    summary.update({"best_model": "runs/a/best.safetensors", "best_epoch": 8, "best_step": 2400,
                    "best_val_acc": 0.9846, "best_test_acc": 0.9831, "best_test_correct": 9831})
    assert finished_line(summary) == (
        "finished after 3000 steps: runs/a/model.safetensors test_acc 98.25% (9825/10000); best by val_acc: "
        "best.safetensors (epoch 8, step 2400, val_acc 98.46%) test_acc 98.31% (9831/10000)")


def test_epoch_end_prints_the_validation_result_when_there_is_one(capsys, monkeypatch):
    now = [100.0]
    monkeypatch.setattr("mnistdist.progress.time.perf_counter", lambda: now[0])
    progress = Progress("off", enabled=True, epochs=2, last_step=10, global_batch_size=10)
    progress.start_epoch(0, steps=1)
    now[0] = 101.0
    progress.update()
    progress.log({"epoch": 1, "step": 5, "train_loss": 0.5, "lr": 0.1})
    progress.epoch_end({"epoch": 1, "step": 5, "train_loss_epoch": 0.5, "val_loss": 0.25, "val_acc": 0.96,
                        "val_correct": 96, "val_total": 100})
    out = capsys.readouterr().out
    assert "val_loss 0.2500  val_acc 96.00% (96/100)" in out and "test" not in out
