"""W&B: one run per job, offline files that hold the same numbers as metrics.jsonl, bounded
waits when W&B is unreachable, the API key never written anywhere, and disabled mode."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil

import pytest
import torch
from safetensors.torch import load_file

from mnistdist.config import TrackingConfig
from mnistdist.rundir import read_metrics
from mnistdist.tracking import resolve_mode
from mnistdist import checkpoint
from mnistdist.signals import EXIT_PREEMPTED
from tests.conftest import FAULT_TRAIN, REPO, check, child_env, launch_cmd, run_cmd, train_cmd
from tests.tracking.wandb_reader import summarize

SENTINEL = "mnistdistSENTINELkey0123456789abcdef01234567"
SHORT = ["train.epochs=1", "train.max_steps=60", "train.log_every_steps=10", "tracking.plots=false"]


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def wandb_file(run: Path) -> Path:
    [f] = run.glob("run-*.wandb")
    return f


def last_line(result, run: Path) -> None:
    """The run's output names its offline W&B run and the exact command that uploads it, once."""
    expected = f"W&B offline run in {run}; upload it with: wandb sync {run}"
    assert (result.stdout + result.stderr).count("W&B offline run in") == 1, result.stdout[-3000:]
    assert expected in result.stdout.splitlines(), result.stdout[-3000:]


def test_two_process_offline_run_matches_metrics_jsonl(tmp_path):
    run_dir = tmp_path / "run"
    result = check(run_cmd(launch_cmd(2, "train.epochs=1", "train.log_every_steps=25", "--run-dir", str(run_dir),
                                      "tracking.tags=ci,offline"),
                           env=child_env(WANDB_MODE="offline"), cwd=tmp_path))
    runs = offline_runs(run_dir)
    assert len(runs) == 1, runs  # exactly one W&B run for two processes
    assert not (tmp_path / "wandb").exists()  # and no stray one from rank 1 in the working dir
    last_line(result, runs[0])  # from the main process only
    data = summarize(wandb_file(runs[0]))
    assert data["run_id"] == (run_dir / "wandb_run_id").read_text().strip()

    # The logged config is the resolved config.
    import yaml

    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert {k: v for k, v in data["config"].items() if not k.startswith("_")} == resolved

    # History: the same steps and the same values as metrics.jsonl.
    records = read_metrics(run_dir)
    by_step: dict[int, dict] = {}
    for r in records:
        by_step.setdefault(r["step"], {}).update(r)
    history: dict[int, dict] = {}
    for row in data["history"]:
        history.setdefault(row["_step"], {}).update(row)
    assert sorted(history) == sorted(by_step)
    for step, expected in by_step.items():
        for key, value in expected.items():
            if key in ("step", "per_class_acc", "confusion"):
                continue
            assert history[step][key] == value, (step, key)
        if "per_class_acc" in expected:
            assert [history[step][f"test_acc_class/{c}"] for c in range(10)] == expected["per_class_acc"]
            assert "confusion_matrix/_type" in history[step]
    last_eval = [r for r in records if "test_acc" in r][-1]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert data["summary"]["final_test_acc"] == last_eval["test_acc"] == summary["final_test_acc"]
    assert data["summary"]["best_test_acc"] == summary["best_test_acc"]
    assert "train_time_s" in data["summary"]


def test_unreachable_online_wandb_does_not_hold_the_job(tmp_path):
    run_dir = tmp_path / "run"
    env = child_env(WANDB_BASE_URL="http://127.0.0.1:9", WANDB_API_KEY=SENTINEL)
    env.pop("WANDB_MODE")
    start = time.monotonic()
    result = run_cmd(train_cmd(*SHORT, "tracking.mode=online", "tracking.init_timeout_s=5", "--run-dir", str(run_dir)),
                     env=env, timeout=180)
    elapsed = time.monotonic() - start
    check(result)
    assert elapsed < 120, f"took {elapsed:.0f} s"
    output = result.stdout + result.stderr
    assert output.count("cannot reach W&B") == 1  # said once
    [run] = offline_runs(run_dir)
    last_line(result, run)
    data = summarize(wandb_file(run))
    assert data["summary"]["final_test_acc"] == json.loads((run_dir / "summary.json").read_text())["final_test_acc"]
    # The API key is nowhere: not in the run directory (W&B files included), not in the output.
    assert SENTINEL not in output
    for f in run_dir.rglob("*"):
        if f.is_file():
            assert SENTINEL.encode() not in f.read_bytes(), f


def test_auto_mode_with_a_key_but_no_network_falls_back_and_hides_the_key(tmp_path):
    env = child_env(WANDB_BASE_URL="http://127.0.0.1:9", WANDB_API_KEY=SENTINEL)
    env.pop("WANDB_MODE")
    run_dir = tmp_path / "run"
    result = check(run_cmd(train_cmd(*SHORT, "tracking.init_timeout_s=3", "--run-dir", str(run_dir)), env=env))
    assert len(offline_runs(run_dir)) == 1
    assert SENTINEL not in result.stdout + result.stderr
    assert all(SENTINEL.encode() not in f.read_bytes() for f in run_dir.rglob("*") if f.is_file())


def test_disabled_mode_writes_no_wandb_dir_and_trains_identically(tmp_path):
    outcomes = {}
    for mode in ("disabled", "offline"):
        run_dir = tmp_path / mode
        check(run_cmd(train_cmd(*SHORT, f"tracking.mode={mode}", "--run-dir", str(run_dir)),
                      env={k: v for k, v in child_env().items() if k != "WANDB_MODE"}, cwd=tmp_path))
        outcomes[mode] = run_dir
    assert not (outcomes["disabled"] / "wandb").exists() and not (tmp_path / "wandb").exists()
    assert (outcomes["offline"] / "wandb").is_dir()
    a = load_file(str(outcomes["disabled"] / "model.safetensors"))
    b = load_file(str(outcomes["offline"] / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda r: {k: v for k, v in r.items() if k not in ("samples_per_s", "epoch_time_s")}  # noqa: E731
    assert [strip(r) for r in read_metrics(outcomes["disabled"])] == [strip(r) for r in read_metrics(outcomes["offline"])]


def test_resumed_job_continues_the_same_wandb_run(tmp_path):
    run_dir = tmp_path / "run"
    env = child_env(WANDB_MODE="offline", MNISTDIST_FAULT="step=30,action=TERM")
    first = run_cmd(train_cmd(*SHORT, "--run-dir", str(run_dir), script=FAULT_TRAIN), env=env)
    assert first.returncode == 75, first.stderr
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    (run_dir / "wandb_run_id").unlink()  # the checkpoint alone must carry the id
    check(run_cmd(train_cmd(*SHORT, "--run-dir", str(run_dir)), env=child_env(WANDB_MODE="offline")))
    runs = offline_runs(run_dir)
    assert len(runs) == 2
    ids = {summarize(wandb_file(r))["run_id"] for r in runs}
    assert ids == {run_id}
    steps = [row["_step"] for r in runs for row in summarize(wandb_file(r))["history"]]
    assert steps == sorted(steps) and steps[-1] == 60  # steps keep increasing across the resume


@pytest.mark.parametrize(
    "env,cfg_mode,key,expected",
    [
        ({}, "auto", False, "offline"),
        ({}, "auto", True, "online"),
        ({"WANDB_MODE": "disabled"}, "online", True, "disabled"),
        ({"WANDB_MODE": "offline"}, "auto", True, "offline"),
        ({}, "disabled", True, "disabled"),
        ({}, "online", False, "online"),
    ],
)
def test_mode_resolution(monkeypatch, tmp_path, env, cfg_mode, key, expected):
    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if key:
        monkeypatch.setenv("WANDB_API_KEY", "x")
    assert resolve_mode(TrackingConfig(mode=cfg_mode)) == expected


def test_a_stuck_wandb_holds_neither_training_nor_a_stop_nor_the_exit(tmp_path):
    """W&B's own process stopped (SIGSTOP: every W&B call that waits for it hangs, and so does
    wandb's exit hook): training goes on, and SIGTERM still gives a checkpoint and exit 75, with
    one line about W&B, within tracking.finish_timeout_s and a few seconds."""
    run_dir = tmp_path / "run"
    cmd = train_cmd("train.epochs=2", "checkpoint.every_steps=50", "tracking.init_timeout_s=5",
                    "tracking.finish_timeout_s=5", "--run-dir", str(run_dir))
    # Output into files, not pipes: the stopped W&B process holds its copies of them open.
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr_file:
        proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(WANDB_MODE="offline"), stdout=subprocess.DEVNULL,
                                stderr=stderr_file, start_new_session=True)
    stopped: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 120
        while not any(f.stat().st_size for f in run_dir.glob("wandb/offline-run-*/run-*.wandb")):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        stopped = [p for p in psutil.Process(proc.pid).children(recursive=True) if "wandb" in p.name()]
        assert stopped, "no wandb-core process"
        for p in stopped:
            p.suspend()
        newest = checkpoint.load_latest(run_dir, warn=lambda _: None)
        after = newest.step if newest else 0
        while (newest := checkpoint.load_latest(run_dir, warn=lambda _: None)) is None or newest.step <= after:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)  # training goes on past a checkpoint written with W&B stuck
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        proc.wait(timeout=90)
        took = time.monotonic() - signalled
        stderr = log.read_text()
    finally:
        for p in stopped:
            try:
                p.resume()
                p.kill()
            except psutil.Error:
                pass
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == EXIT_PREEMPTED, stderr[-3000:]
    assert took < 5 + 20, f"exited {took:.0f} s after SIGTERM"
    assert "Traceback" not in stderr
    warnings = [line for line in stderr.splitlines() if line.startswith("wandb:")]
    assert len(warnings) == 1 and "W&B is off for the rest of this run" in warnings[0], stderr[-3000:]
    steps = [int(line.split("after step ")[1].split(";")[0]) for line in stderr.splitlines() if "stopped by SIG" in line]
    assert len(steps) == 1 and checkpoint.list_checkpoints(run_dir)[0].name == f"step-{steps[0]:08d}"


def test_a_hanging_wandb_init_is_given_up_after_init_timeout_s(tmp_path):
    """wandb.init that never returns (a stand-in wandb): training does not wait for it, and the
    run says once that W&B did not start within tracking.init_timeout_s (+5 s)."""
    run_dir, marker = tmp_path / "run", tmp_path / "wandb-stub"
    env = child_env(WANDB_MODE="offline", STUB_WANDB_HANG="init", STUB_WANDB_MARKER=str(marker),
                    PYTHONPATH=os.pathsep.join([str(REPO / "tests" / "faults" / "stub_wandb"), str(REPO)]))
    result = check(run_cmd(train_cmd(*SHORT, "tracking.init_timeout_s=5", "--run-dir", str(run_dir)), env=env,
                           timeout=180))
    assert marker.read_text() == "hanging in init\n"
    warnings = [line for line in result.stderr.splitlines() if line.startswith("wandb:")]
    assert len(warnings) == 1 and "did not start within 10 s" in warnings[0], result.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 60
    assert "W&B" not in result.stdout  # no W&B run to name
