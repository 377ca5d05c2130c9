"""Resume never silently changes the experiment (in-process runs on tiny synthetic MNIST)."""

from __future__ import annotations

import shutil

import pytest
import yaml

from mnistdist import training
from mnistdist.config import ConfigError, load_config
from mnistdist.rundir import read_metrics
from mnistdist.schedule import lr_at
from tests.smoke.test_train_smoke import data, overrides  # noqa: F401 - fixtures


@pytest.fixture(scope="module")
def stopped_once(tmp_path_factory, data, one_process_env):  # noqa: F811
    """A run stopped at step 13 of 40 (train.max_steps), with its checkpoint: trained once per file."""
    run_dir = tmp_path_factory.mktemp("stopped") / "run"
    training.run(load_config(None, overrides(data, "train.max_steps=13")), run_dir, resume="never")
    return run_dir


@pytest.fixture
def stopped_run(stopped_once, tmp_path):
    """A copy of the stopped run for one test to resume (or to be refused)."""
    return shutil.copytree(stopped_once, tmp_path / "run", symlinks=True)


def resume(run_dir, data, *extra, allow=False):  # noqa: F811
    return training.run(load_config(None, overrides(data, *extra)), run_dir, resume="auto", allow_config_change=allow)


@pytest.mark.parametrize("change", ["train.lr=0.05", "train.loss=mse", "model.dtype=float64", "train.weight_decay=0",
                                    "train.seed=3", "train.epochs=3", "data.normalize_std=0.5",
                                    "data.validation_size=100"])
def test_a_change_of_the_trajectory_is_refused_naming_what_differs(stopped_run, data, change):  # noqa: F811
    key = change.split("=")[0]
    with pytest.raises(ConfigError, match=rf"written with other values of keys that change training: {key} ") as refused:
        resume(stopped_run, data, change)
    assert "--allow-config-change" in str(refused.value) and "another --run-dir" in str(refused.value)
    # Refused before anything was written: the run dir still describes the stopped run.
    assert yaml.safe_load((stopped_run / "config.yaml").read_text())["train"]["max_steps"] == 13


def test_keys_that_do_not_change_the_trajectory_just_apply(stopped_run, data):  # noqa: F811
    summary = resume(stopped_run, data, "train.log_every_steps=5", "checkpoint.every_steps=7", "tracking.project=other")
    assert summary["steps"] == 40
    saved = yaml.safe_load((stopped_run / "config.yaml").read_text())
    assert saved["train"]["log_every_steps"] == 5 and saved["tracking"]["project"] == "other"
    assert not [r for r in read_metrics(stopped_run) if "config_changes" in r]


def test_allowed_changes_really_apply_and_are_recorded(stopped_run, data, monkeypatch):  # noqa: F811
    optimizers = []  # the optimizer's settings after the resume, before the first step
    build_step = training.build_step

    def recording_build_step(cfg, dist, model, optimizer, *args, **kwargs):
        optimizers.append({k: v for k, v in optimizer.param_groups[0].items() if k != "params"})
        return build_step(cfg, dist, model, optimizer, *args, **kwargs)

    monkeypatch.setattr(training, "build_step", recording_build_step)
    summary = resume(stopped_run, data, "train.momentum=0.5", "train.weight_decay=0", "train.lr=0.05", allow=True)
    assert summary["steps"] == 40
    changes = [r for r in read_metrics(stopped_run) if "config_changes" in r]
    assert changes == [{"step": 13, "config_changes": {"train.lr": [0.1, 0.05], "train.momentum": [0.9, 0.5],
                                                       "train.weight_decay": [0.0005, 0.0]}}]
    saved = yaml.safe_load((stopped_run / "config.yaml").read_text())
    assert saved["train"]["momentum"] == 0.5 and saved["train"]["lr"] == 0.05
    # The optimizer ran with the new values, not the checkpoint's, and every step's lr is the new schedule's.
    assert (optimizers[0]["momentum"], optimizers[0]["weight_decay"]) == (0.5, 0.0)
    t = load_config(None, overrides(data, "train.lr=0.05")).train
    logged = [(r["step"], r["lr"]) for r in read_metrics(stopped_run) if "lr" in r and r["step"] > 13]
    assert logged and all(lr == lr_at(step - 1, 40, 0.05, t.lr_schedule, t.warmup_steps) for step, lr in logged)
