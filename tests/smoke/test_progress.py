"""What training prints while it runs (``tracking.progress``), on a tiny synthetic MNIST.

In process (``training.run``, output captured with capsys) for each mode, and once as
``python train_dist.py`` with stdout and stderr into one pipe, as in a Slurm log: every line
short, no ``\\r``, and the lines with ``test_acc`` are the epoch summaries and the finished line. 1000 training images
in batches of 100 (10 steps per epoch), 2 epochs, a training line every 3 steps.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mnistdist import training
from mnistdist.config import load_config
from mnistdist.launch import child_env
from tests.conftest import LAUNCHER_VARIABLES, REPO, as_one_process
from tests.synthetic_mnist import write_synthetic_mnist

EPOCHS, STEPS_PER_EPOCH, LOG_EVERY = 2, 10, 3
LAST_STEP = EPOCHS * STEPS_PER_EPOCH
MAX_LINE = 300  # characters, for any line of a log that is not a terminal

STEP_LINE = re.compile(rf"epoch (\d+)/{EPOCHS}  step (\d+)/{LAST_STEP}  train_loss (\d+\.\d{{4}})  "
                       r"lr [0-9.e+-]+  [\d,]+ samples/s")
EPOCH_LINE = re.compile(rf"epoch (\d+)/{EPOCHS}  train_loss \d+\.\d{{4}}  test_loss \d+\.\d{{4}}  "
                        r"test_acc \d+\.\d\d% \(\d+/200\)  [\d,]+ samples/s  \d+\.\d s")
FINISHED_LINE = re.compile(rf"finished after {LAST_STEP} steps: .*model\.safetensors test_acc \d+\.\d\d% \(\d+/200\)")
# The steps with a training line: every LOG_EVERY-th and each epoch's last.
LOGGED_STEPS = sorted({s for s in range(1, LAST_STEP + 1) if s % LOG_EVERY == 0 or s % STEPS_PER_EPOCH == 0})


def overrides(data_root: Path, progress: str) -> list[str]:
    return [f"data.root={data_root}", "data.download=false", "dist.device=cpu", "tracking.mode=disabled",
            f"train.epochs={EPOCHS}", "train.global_batch_size=100", f"train.log_every_steps={LOG_EVERY}",
            "tracking.plots=false", f"tracking.progress={progress}"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_synthetic_mnist(tmp_path_factory.mktemp("data"), num_train=1000, num_test=200)


@pytest.fixture
def env(monkeypatch):
    """The environment of ``python train_dist.py``: no launcher, W&B off, TQDM_DISABLE unset."""
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    return as_one_process(monkeypatch)


def train(data: Path, run_dir: Path, progress: str, capsys) -> tuple[str, str]:
    """Train in this process; (stdout, stderr) of the run."""
    capsys.readouterr()
    summary = training.run(load_config(None, overrides(data, progress)), run_dir, resume="never")
    assert summary["steps"] == LAST_STEP
    return capsys.readouterr()


def kinds(out: str) -> list[tuple]:
    """Each stdout line as ("step", epoch, step), ("epoch", epoch), ("finished",) or ("other",)."""
    found = []
    for line in out.splitlines():
        if m := STEP_LINE.fullmatch(line):
            found.append(("step", int(m[1]), int(m[2])))
        elif m := EPOCH_LINE.fullmatch(line):
            found.append(("epoch", int(m[1])))
        elif FINISHED_LINE.fullmatch(line):
            found.append(("finished",))
        else:
            found.append(("other",))
    return found


def expected_lines_mode() -> list[tuple]:
    lines: list[tuple] = []
    for step in LOGGED_STEPS:
        epoch = (step - 1) // STEPS_PER_EPOCH + 1
        lines.append(("step", epoch, step))
        if step % STEPS_PER_EPOCH == 0:
            lines.append(("epoch", epoch))
    return [*lines, ("finished",)]


def assert_readable(text: str) -> None:
    """A log fit for a file: no carriage return, every line under MAX_LINE characters."""
    assert "\r" not in text, f"carriage return in the output:\n{text[:2000]!r}"
    long = [line for line in text.split("\n") if len(line) >= MAX_LINE]  # what `grep` calls lines
    assert not long, f"{len(long)} line(s) of {MAX_LINE}+ characters, the first: {long[0][:400]!r}"


def test_lines_mode_prints_a_line_every_log_every_steps_and_the_epoch_summaries(env, data, tmp_path, capsys):
    out, err = train(data, tmp_path / "run", "lines", capsys)
    assert_readable(out + err)
    assert out.splitlines()[0].startswith("training on 1 process(es)")
    assert [k for k in kinds(out) if k != ("other",)] == expected_lines_mode(), out
    # The printed losses are metrics.jsonl's training lines.
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [(r["step"], f"{r['train_loss']:.4f}") for r in records if "train_loss" in r]
    printed = [(int(m[2]), m[3]) for line in out.splitlines() if (m := STEP_LINE.fullmatch(line))]
    assert printed == logged
    assert "it/s" not in err  # no tqdm bar on stderr either


def test_auto_without_a_terminal_prints_lines(env, data, tmp_path, capsys):
    assert not sys.stderr.isatty()  # captured
    out, err = train(data, tmp_path / "run", "auto", capsys)
    assert_readable(out + err)
    assert [k for k in kinds(out) if k != ("other",)] == expected_lines_mode(), out


def test_off_keeps_the_start_and_epoch_summary_lines_only(env, data, tmp_path, capsys):
    out, err = train(data, tmp_path / "run", "off", capsys)
    assert_readable(out + err)
    assert kinds(out) == [("other",), ("epoch", 1), ("epoch", 2), ("finished",)], out
    assert out.splitlines()[0].startswith("training on 1 process(es)")
    assert err == ""


def test_bar_mode_draws_a_tqdm_bar_and_TQDM_DISABLE_turns_it_off(env, data, tmp_path, capsys):
    out, err = train(data, tmp_path / "bar", "bar", capsys)
    assert "\r" in err and f"epoch 1/{EPOCHS}" in err, err  # tqdm's bar, even into a pipe: asked for
    assert kinds(out) == [("other",), ("epoch", 1), ("epoch", 2), ("finished",)], out  # no step lines besides the bar

    env.setenv("TQDM_DISABLE", "1")
    out, err = train(data, tmp_path / "bar_disabled", "bar", capsys)
    assert_readable(out + err)
    assert kinds(out) == [("other",), ("epoch", 1), ("epoch", 2), ("finished",)], out
    assert err == ""


def test_auto_on_a_terminal_is_a_bar_unless_TQDM_DISABLE(env, data, tmp_path, capsys):
    env.setattr(sys.stderr, "isatty", lambda: True)  # the captured stderr, posing as a terminal
    out, err = train(data, tmp_path / "tty", "auto", capsys)
    assert "\r" in err and f"epoch 1/{EPOCHS}" in err, err
    assert kinds(out) == [("other",), ("epoch", 1), ("epoch", 2), ("finished",)], out

    env.setenv("TQDM_DISABLE", "1")
    out, err = train(data, tmp_path / "tty_disabled", "auto", capsys)
    assert_readable(out + err)
    assert kinds(out) == [("other",), ("epoch", 1), ("epoch", 2), ("finished",)], out
    assert err == ""


@pytest.mark.slow  # a real `python train_dist.py` process (~5 s, most of it import torch)
def test_train_dist_into_a_pipe_writes_a_readable_log(data, tmp_path):
    """``python train_dist.py > log 2>&1``, as under Slurm: the default (auto) gives lines."""
    env = child_env()
    for name in (*LAUNCHER_VARIABLES, "TQDM_DISABLE"):
        env.pop(name, None)
    args = overrides(data, "auto")[:-1]  # tracking.progress left at its default
    result = subprocess.run([sys.executable, str(REPO / "train_dist.py"), "--run-dir", str(tmp_path / "run"), *args],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    log = result.stdout.decode()  # bytes: text mode would turn each \r into a line break
    assert result.returncode == 0, log[-4000:]
    assert_readable(log)
    # `grep test_acc log`: exactly the epoch summary lines, one per epoch, and the finished run's.
    grepped = [line for line in log.split("\n") if "test_acc" in line]
    expected = [*(("epoch", e) for e in range(1, EPOCHS + 1)), ("finished",)]
    assert [kinds(line)[0] for line in grepped] == expected, grepped
    assert [k for k in kinds(log) if k != ("other",)] == expected_lines_mode(), log
