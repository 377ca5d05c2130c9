"""W&B can never stop or hold training: a W&B call after start-up that fails (``run.log``, a
``wandb.Table`` or ``wandb.Image``, ``run.summary.update``, ``run.finish``), or any W&B call
that never returns (``wandb.init`` too), is reported once on stderr, W&B is dropped for the rest
of the run, and training finishes with a complete metrics.jsonl and summary.json. The last line
of a run names its W&B run: the URL, or the offline directory and the ``wandb sync`` command.

The real training loop runs in this process on tiny synthetic MNIST with ``tracking.mode=offline``
(so the Tracker starts W&B); ``wandb.init`` returns a stand-in run that raises where we ask.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from mnistdist import tracking, training
from mnistdist.config import load_config
from tests.conftest import as_one_process

STEPS_PER_EPOCH, EPOCHS = 10, 1  # 1000 synthetic images in batches of 100


class Broken(ConnectionError):
    pass


class FakeSummary(dict):
    def __init__(self, fail: bool) -> None:
        super().__init__()
        self.fail = fail

    def update(self, *args: Any, **kwargs: Any) -> None:
        if self.fail:
            raise Broken("summary upload failed")
        super().update(*args, **kwargs)


class FakeRun:
    """What ``wandb.init`` returns; ``fail`` names the call that raises."""

    def __init__(self, fail: str, fail_after: int, sync_dir: str = "", url: str | None = None) -> None:
        self.fail, self.fail_after = fail, fail_after
        self.logged: list[int] = []
        self.calls_after_failure = 0
        self.failed = False
        self.summary = FakeSummary(fail == "summary")
        self.finished: int | None = None
        self.offline, self.url = url is None, url
        self.settings = type("Settings", (), {"sync_dir": sync_dir})()

    def log(self, data: dict[str, Any], step: int) -> None:
        if self.failed:
            self.calls_after_failure += 1
        if self.fail == "log" and len(self.logged) >= self.fail_after:
            self.failed = True
            raise Broken("wandb-core went away")
        self.logged.append(step)

    def finish(self, exit_code: int = 0) -> None:
        if self.fail == "finish":
            raise Broken("finish failed")
        self.finished = exit_code


def no_setup(settings: Any = None) -> None:
    """``wandb.setup`` without W&B's own process (only ``wandb.init`` is faked)."""


@pytest.fixture
def fake_wandb(monkeypatch):
    """A factory: ``fake_wandb(fail, fail_after)`` patches wandb and returns the runs it makes."""
    import wandb

    as_one_process(monkeypatch, wandb_mode=None)

    def patch(fail: str, fail_after: int = 0) -> list[FakeRun]:
        runs: list[FakeRun] = []

        def init(**kwargs: Any) -> FakeRun:
            assert kwargs["mode"] == "offline"
            runs.append(FakeRun(fail, fail_after, f"{kwargs['dir']}/wandb/offline-run-fake-{kwargs['id']}"))
            return runs[-1]

        def broken(*args: Any, **kwargs: Any) -> Any:
            raise Broken(f"wandb.{fail.capitalize()} failed")

        monkeypatch.setattr(wandb, "init", init)
        monkeypatch.setattr(wandb, "setup", no_setup)
        if fail in ("image", "table"):
            monkeypatch.setattr(wandb, fail.capitalize(), broken)
        return runs

    return patch


def overrides(data_root: Path) -> list[str]:
    return [f"data.root={data_root}", "data.download=false", "dist.device=cpu", "tracking.mode=offline",
            f"train.epochs={EPOCHS}", "train.global_batch_size=100", "train.log_every_steps=1", "tracking.plots=false"]


def plots_for(call: str) -> list[str]:
    """The plots where the call under test is theirs (``image``) or comes just before them
    (``summary``: no image call may follow a failed or given-up summary); else none."""
    return ["tracking.plots=true"] if call in ("summary", "image") else []


@pytest.mark.parametrize("fail,fail_after", [
    ("log", 4),         # mid-epoch, on a training line
    ("table", 0),       # building the confusion table of the first evaluation
    ("summary", 0),     # run.summary.update(...) after training
    ("image", 0),       # wandb.Image of the final plots
    ("finish", 0),      # run.finish at the very end
])
def test_a_failing_wandb_call_is_reported_once_and_training_finishes(fake_wandb, synthetic_mnist, tmp_path,
                                                                    capsys, fail, fail_after):
    runs = fake_wandb(fail, fail_after)
    run_dir = tmp_path / "run"

    summary = training.run(load_config(None, [*overrides(synthetic_mnist), *plots_for(fail)]), run_dir, resume="auto")

    assert summary["steps"] == STEPS_PER_EPOCH * EPOCHS
    assert json.loads((run_dir / "summary.json").read_text())["final_test_acc"] == summary["final_test_acc"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train_loss" in r] == list(range(1, STEPS_PER_EPOCH * EPOCHS + 1))
    assert [r["step"] for r in records if "test_acc" in r] == [STEPS_PER_EPOCH * e for e in range(1, EPOCHS + 1)]

    err = capsys.readouterr().err
    assert err.count("wandb:") == 1, err
    # On a line of its own, even with the progress bar drawn (\r redraws it in place).
    warnings = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("wandb:")]
    assert len(warnings) == 1, err
    assert "Broken" in warnings[0], warnings

    [run] = runs
    assert run.calls_after_failure == 0  # dropped for the rest of the run
    if fail == "log":
        assert run.logged == list(range(1, fail_after + 1))


def test_a_wandb_agent_run_uses_the_agents_run_id_then_keeps_its_own(fake_wandb, synthetic_mnist, tmp_path,
                                                                    monkeypatch):
    """`wandb agent` sets WANDB_RUN_ID for the run it starts; the sweep only sees a run with
    that id. A run directory that already has an id (a resumed run) keeps its own."""
    import wandb

    fake_wandb("none")
    ids: list[str] = []
    real_init = wandb.init

    def init(**kwargs: Any) -> FakeRun:
        ids.append(kwargs["id"])
        return real_init(**kwargs)

    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.setenv("WANDB_RUN_ID", "agent123")
    run_dir = tmp_path / "run"
    training.run(load_config(None, overrides(synthetic_mnist)), run_dir, resume="auto")
    assert ids == ["agent123"] and (run_dir / "wandb_run_id").read_text().strip() == "agent123"
    monkeypatch.setenv("WANDB_RUN_ID", "other456")
    training.run(load_config(None, [*overrides(synthetic_mnist), "train.epochs=2"]), run_dir, resume="auto",
                 allow_config_change=True)
    assert ids == ["agent123", "agent123"]


class HangingRun(FakeRun):
    """A run whose ``hang`` call never returns (until the test ends); ``calls`` counts the calls
    made to it."""

    def __init__(self, hang: str, release: threading.Event) -> None:
        super().__init__("none", 0)
        self.hang, self.release = hang, release
        self.calls = 0
        if hang == "summary":
            self.summary = HangingSummary(self)

    def stuck(self, call: str) -> None:
        self.calls += 1
        if self.hang == call:
            self.release.wait()

    def log(self, data: dict[str, Any], step: int) -> None:
        self.stuck("log" if len(self.logged) >= 4 else "")  # hangs on step 5, mid-epoch
        super().log(data, step)

    def finish(self, exit_code: int = 0) -> None:
        self.stuck("finish")
        super().finish(exit_code)


class HangingSummary(dict):
    def __init__(self, run: HangingRun) -> None:
        super().__init__()
        self.run = run

    def update(self, *args: Any, **kwargs: Any) -> None:
        self.run.stuck("summary")
        super().update(*args, **kwargs)


@pytest.fixture
def hanging_wandb(monkeypatch):
    """``hanging_wandb(call)``: wandb whose ``call`` never returns while the test runs; returns the
    runs it makes. The bounds are short: a call is given up after 0.3 s, a start after 0.5 s
    (init_timeout_s 0.2 + 0.3), finishing after 1 s (finish_timeout_s)."""
    import wandb

    as_one_process(monkeypatch, wandb_mode=None)
    monkeypatch.setattr(tracking, "CALL_TIMEOUT_S", 0.3, raising=False)
    monkeypatch.setattr(tracking, "INIT_MARGIN_S", 0.3, raising=False)
    release = threading.Event()
    runs: list[HangingRun] = []

    def patch(call: str) -> list[HangingRun]:
        def init(**kwargs: Any) -> HangingRun:
            if call == "init":
                release.wait()
            runs.append(HangingRun(call, release))
            return runs[-1]

        def stuck(*args: Any, **kwargs: Any) -> None:
            release.wait()

        monkeypatch.setattr(wandb, "init", init)
        monkeypatch.setattr(wandb, "setup", no_setup)
        if call in ("table", "image"):
            monkeypatch.setattr(wandb, call.capitalize(), stuck)
        return runs

    yield patch
    calls = [run.calls for run in runs]
    release.set()  # the stuck calls return: W&B, given up, must make no call after them
    for thread in threading.enumerate():
        if thread.name.startswith("mnistdist-wandb"):
            thread.join()
    # (A stuck wandb.init returns a run when released: it gets no call either.)
    assert [run.calls for run in runs] == calls + [0] * (len(runs) - len(calls))


@pytest.mark.parametrize("call", ["init", "log", "table", "summary", "image", "finish"])
def test_a_hanging_wandb_call_is_given_up_once_and_training_finishes(hanging_wandb, synthetic_mnist, tmp_path,
                                                                     capsys, call):
    runs = hanging_wandb(call)
    run_dir = tmp_path / "run"

    summary = training.run(load_config(None, [*overrides(synthetic_mnist), "tracking.init_timeout_s=0.2",
                                              "tracking.finish_timeout_s=1", *plots_for(call)]), run_dir, resume="auto")

    assert summary["steps"] == STEPS_PER_EPOCH * EPOCHS
    assert json.loads((run_dir / "summary.json").read_text())["final_test_acc"] == summary["final_test_acc"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train_loss" in r] == list(range(1, STEPS_PER_EPOCH * EPOCHS + 1))
    err = capsys.readouterr().err
    warnings = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("wandb:")]
    assert len(warnings) == 1 and err.count("wandb:") == 1, err
    assert "W&B is off for the rest of this run" in warnings[0], warnings
    if call == "init":
        assert runs == []
    else:
        [run] = runs
        if call == "log":
            assert run.logged == [1, 2, 3, 4]  # step 5 never returned; nothing was queued after it
        assert run.finished is None  # a stuck run is given up, never finished


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_the_last_line_names_the_wandb_run(monkeypatch, synthetic_mnist, tmp_path, capsys, mode):
    """Offline: the run's own directory and the exact `wandb sync` command; online: its URL.
    Once, at the end; W&B's own console output stays off."""
    import wandb

    as_one_process(monkeypatch, wandb_mode=None)
    made: list[dict[str, Any]] = []

    def init(**kwargs: Any) -> FakeRun:
        made.append(kwargs)
        sync_dir = f"{kwargs['dir']}/wandb/offline-run-20260101_000000-{kwargs['id']}"
        url = f"https://wandb.ai/me/mnistdist/runs/{kwargs['id']}" if kwargs["mode"] == "online" else None
        return FakeRun("none", 0, sync_dir=sync_dir, url=url)

    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.setattr(wandb, "setup", no_setup)
    run_dir = tmp_path / "run"
    training.run(load_config(None, [*overrides(synthetic_mnist), f"tracking.mode={mode}"]), run_dir, resume="auto")

    [kwargs] = made
    assert kwargs["settings"].silent and kwargs["settings"].console == "off"
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("W&B")]
    assert len(lines) == 1 and out.rstrip().endswith(lines[0]), out
    if mode == "online":
        assert lines[0] == f"W&B run: https://wandb.ai/me/mnistdist/runs/{run_id}"
    else:
        sync_dir = run_dir / "wandb" / f"offline-run-20260101_000000-{run_id}"
        assert lines[0] == f"W&B offline run in {sync_dir}; upload it with: wandb sync {sync_dir}"
