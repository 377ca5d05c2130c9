"""A job never hangs and never lies: dead, raising and stalled ranks, bad data, unwritable
output, simultaneous jobs. CPU, gloo, 2 processes through `python -m mnistdist.launch`."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from mnistdist import checkpoint
from mnistdist.data import MNIST_FILES, raw_dir
from tests.conftest import (FAULT_TRAIN, REPO, as_one_process, child_env, data_root, launch_cmd, run_cmd, train_cmd,
                            train_in_process)

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]

TIMEOUT_S = 10  # dist.timeout_s for these runs


def wrapped(num_processes: int, *args: str, script: Path | None = None) -> list[str]:
    cmd = launch_cmd(num_processes, *args, script=script)
    return [sys.executable, "-m", "mnistdist.launch", *cmd[2:]]


def leftover_processes(marker: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if marker in " ".join(p.info["cmdline"] or []):
                found.append(p)
        except psutil.Error:
            pass
    return found


def wait_for(path: Path, proc: subprocess.Popen, limit_s: float = 180) -> float:
    deadline = time.monotonic() + limit_s
    while not path.exists():
        assert proc.poll() is None, f"run ended before {path.name} appeared: {proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)
    return time.monotonic()


@pytest.mark.parametrize("action", ["KILL", "raise", "STOP"])
def test_a_failing_rank_ends_the_whole_job_quickly_and_is_named(tmp_path, action):
    run_dir = tmp_path / "run"
    env = child_env(MNISTDIST_FAULT=f"step=60,rank=1,action={action}")
    proc = subprocess.Popen(
        wrapped(2, "train.epochs=1", "checkpoint.every_steps=50", f"dist.timeout_s={TIMEOUT_S}",
                "--run-dir", str(run_dir), script=FAULT_TRAIN),
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # The fault fires 10 steps after the step-50 checkpoint appears (a few ms per step).
    seen = wait_for(run_dir / "checkpoints" / "step-00000050", proc)
    _, stderr = proc.communicate(timeout=TIMEOUT_S + 60)
    took = time.monotonic() - seen
    assert proc.returncode not in (0, 75), stderr[-3000:]
    assert took <= TIMEOUT_S + 15, f"job took {took:.1f} s after the fault to exit"
    if action == "STOP":
        assert "rank 1 (silent for" in stderr and "stopped responding" in stderr
    else:
        expected = "rank 1 (exit -9, SIGKILL)" if action == "KILL" else "rank 1 (exit 1)"
        assert f"first rank to exit: {expected}" in stderr, stderr[-3000:]
    assert not leftover_processes(str(run_dir)), "orphan processes remain"
    newest = checkpoint.load_latest(run_dir)
    assert newest is not None and newest.step == 50
    assert not (run_dir / "model.safetensors").exists() and not (run_dir / "summary.json").exists()


def staged_data(tmp_path: Path) -> Path:
    raw = raw_dir(tmp_path / "data")
    raw.mkdir(parents=True)
    for name in MNIST_FILES:
        (raw / name).symlink_to(raw_dir(data_root()) / name)
    return tmp_path / "data"


def damage_labels(root: Path, damage: str) -> Path:
    """Damage the test labels file of ``root`` as ``damage`` says; returns its path."""
    target = raw_dir(root) / "t10k-labels-idx1-ubyte"
    good = bytearray(target.read_bytes())
    target.unlink()
    if damage == "truncated":
        target.write_bytes(bytes(good[:5000]))
    elif damage == "magic":
        good[2] = 0x09
        target.write_bytes(bytes(good))
    elif damage == "label":
        good[-1] = 11
        target.write_bytes(bytes(good))
    return target


@pytest.mark.parametrize("damage", ["missing", "truncated", "magic", "label"])
def test_bad_data_is_named_before_training(tmp_path, damage, capfd, monkeypatch):
    """Every kind of damage, through the command line in this process (one process, exit 2):
    the check is the same on every rank (see the launched case below)."""
    root = staged_data(tmp_path)
    target = damage_labels(root, damage)
    as_one_process(monkeypatch).setenv("MNISTDIST_DATA_ROOT", str(root))
    code, out, err = train_in_process(capfd, "data.download=false", "--run-dir", str(tmp_path / "run"))
    assert code == 2, err
    assert str(target) in err and "Traceback" not in err
    assert "training on" not in out
    if damage == "missing":
        assert f"{target}: missing" in err


def test_bad_data_is_named_before_training_on_every_rank(tmp_path):
    """Two ranks through the launcher: the job ends (no rank left waiting) naming the file."""
    root = staged_data(tmp_path)
    target = damage_labels(root, "label")
    result = run_cmd(wrapped(2, "data.download=false", "--run-dir", str(tmp_path / "run")),
                     env=child_env(MNISTDIST_DATA_ROOT=str(root)), timeout=120)
    assert result.returncode != 0
    assert str(target) in result.stderr
    assert "training on" not in result.stdout


def test_unwritable_run_dir_fails_before_training(tmp_path, capfd, monkeypatch):
    root = data_root()  # before as_one_process, which unsets $MNISTDIST_DATA_ROOT
    with monkeypatch.context() as mp:
        as_one_process(mp).setenv("MNISTDIST_DATA_ROOT", str(root))
        code, out, err = train_in_process(capfd, "--run-dir", "/sys/mnistdist-test/run")
    assert code == 2, err
    assert "--run-dir /sys/mnistdist-test/run: cannot write there" in err
    assert "training on" not in out
    result = run_cmd(wrapped(2, "--run-dir", "/sys/mnistdist-test/run"), timeout=120)
    assert result.returncode != 0
    assert "--run-dir /sys/mnistdist-test/run: cannot write there" in result.stderr
    assert "training on" not in result.stdout
    # Root ignores permission bits, so a full disk is simulated with a file-size limit.
    result = subprocess.run(train_cmd("--run-dir", str(tmp_path / "run")), cwd=REPO, env=child_env(),
                            capture_output=True, text=True, timeout=120,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384)))
    assert result.returncode == 2 and "cannot write there (File too large)" in result.stderr


def test_disk_full_at_a_save_keeps_the_previous_checkpoint_and_fails(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(wrapped(2, "train.epochs=1", "checkpoint.every_steps=20", "--run-dir", str(run_dir)),
                            cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(run_dir / "checkpoints" / "step-00000020", proc)
    for worker in psutil.Process(proc.pid).children(recursive=True):  # the disk is now "full"
        resource.prlimit(worker.pid, resource.RLIMIT_FSIZE, (65536, 65536))
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode not in (0, 75)
    assert "cannot write checkpoint in" in stderr and "File too large" in stderr
    newest = checkpoint.load_latest(run_dir)
    assert newest is not None and newest.step >= 20
    assert not (run_dir / "summary.json").exists()  # never a false success
    assert not leftover_processes(str(run_dir))


def test_two_jobs_started_together_do_not_collide(tmp_path):
    env = child_env(WANDB_MODE="offline")
    procs = [subprocess.Popen(wrapped(2, "train.max_steps=30"), cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    run_dirs = sorted((tmp_path / "runs").iterdir())
    assert len(run_dirs) == 2
    ids = {(d / "wandb_run_id").read_text().strip() for d in run_dirs}
    assert len(ids) == 2
    for d in run_dirs:
        assert len(list((d / "wandb").glob("offline-run-*"))) == 1
        assert json.loads((d / "summary.json").read_text())["steps"] == 30


@pytest.mark.parametrize(
    "content,message",
    [("train: {lr: [\n", "not valid YAML"), ("- 1\n- 2\n", "top level must be a mapping"),
     ("train:\n  - lr\n", "train: must be a mapping")],
)
def test_bad_config_files_exit_2_in_one_line(tmp_path, content, message, capfd, monkeypatch):
    f = tmp_path / "c.yaml"
    f.write_text(content)
    as_one_process(monkeypatch).setenv("MNISTDIST_DATA_ROOT", str(tmp_path))
    code, out, err = train_in_process(capfd, "--config", str(f))
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err
    assert "Traceback" not in err


def test_unknown_flag_and_missing_resume_path_exit_2(tmp_path, capfd, monkeypatch):
    as_one_process(monkeypatch).setenv("MNISTDIST_DATA_ROOT", str(tmp_path))
    for args, message in ((["--nope"], "unrecognized arguments: --nope"),
                          (["--resume", str(tmp_path / "x")], "no such checkpoint directory")):
        code, _, err = train_in_process(capfd, *args)
        assert code == 2 and message in err
        assert len(err.strip().splitlines()) == 1
