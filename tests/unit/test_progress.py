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
    progress = Progress(mode, enabled=False, epochs=2, last_step=20)
    with progress:
        progress.start_epoch(0, steps=10)
        for step in range(1, 11):
            progress.step()
            progress.log({"epoch": 1, "step": step, "train_loss": 0.5, "lr": 0.1, "samples_per_s": 1000.0})
        progress.epoch_end(0, 0.5, None, 1000.0, 1.0)  # counts are not even looked at
    assert capsys.readouterr() == ("", "")
