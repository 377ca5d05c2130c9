"""``mnistdist sweep FILE --local`` on real MNIST: Ctrl-C stops the sweep with a checkpoint,
running it again resumes the interrupted run exactly and trains the rest, a third time skips
everything; ``mnistdist compare`` then reports what the runs' summaries say."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys

import pytest

from mnistdist.tools import sweep
from mnistdist.signals import EXIT_INTERRUPTED
from tests.conftest import REPO, assert_same_run, check, child_env, outcome, run_cmd
from tests.faults.test_faults import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SWEEP = """
name: small
overrides: {train.epochs: 1, train.max_steps: 150, checkpoint.every_steps: 50, dist.threads_per_process: 1,
            tracking.plots: false}
grid: {train.lr: [0.05, 0.2]}
seeds: [0, 1]
"""


def sweep_cmd(path, *args: str) -> list[str]:
    return [sys.executable, "-m", "mnistdist.cli", "sweep", str(path), *args]


def test_local_sweep_stops_on_ctrl_c_resumes_exactly_and_skips_finished_runs(tmp_path):
    path = tmp_path / "small.yaml"
    path.write_text(SWEEP)
    out = tmp_path / "out"
    runs = sweep.load_sweep(path, out).elements
    assert len(runs) == 4

    # Ctrl-C in the terminal (SIGINT to the whole foreground group) during the first run.
    proc = subprocess.Popen(sweep_cmd(path, "--out", str(out), "--local"), cwd=REPO, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for(runs[0].run_dir / "checkpoints" / "step-00000050", proc)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, stdout + stderr
    assert "Traceback" not in stderr
    assert f"sweep small: stopped by Ctrl-C during run 0 ({runs[0].name})" in stdout
    assert not runs[0].finished and not runs[1].run_dir.exists()
    stopped_at = int(stderr.split("stopped by SIGINT after step ")[1].split(";")[0])

    # Again: the interrupted run resumes, the others train.
    again = check(run_cmd(sweep_cmd(path, "--out", str(out), "--local"), timeout=400))
    assert f"resumed from {runs[0].run_dir}/checkpoints/step-{stopped_at:08d}" in again.stdout + again.stderr
    assert "sweep small: 4 trained, 0 skipped (finished before), 0 failed" in again.stdout
    assert all(r.finished for r in runs)

    # A third time: nothing to do.
    third = check(run_cmd(sweep_cmd(path, "--out", str(out), "--local"), timeout=120))
    assert "sweep small: 0 trained, 4 skipped (finished before), 0 failed" in third.stdout

    # The interrupted run ends bitwise equal to the same run uninterrupted.
    check(run_cmd(sweep_cmd(path, "--out", str(tmp_path / "golden"), "--run", "0"), timeout=300))
    assert_same_run(outcome(tmp_path / "golden" / runs[0].name), outcome(runs[0].run_dir))

    # compare: one group per learning rate, the seeds' statistics from their summaries.
    result = json.loads(check(run_cmd([sys.executable, "-m", "mnistdist.cli", "compare", str(out), "--json"])).stdout)
    assert [g["params"] for g in result["groups"]] == [{"train.lr": 0.05}, {"train.lr": 0.2}]
    for g, pair in zip(result["groups"], (runs[:2], runs[2:])):
        accs = [json.loads((r.run_dir / "summary.json").read_text())["final_test_acc"] for r in pair]
        assert g["final_test_acc"]["values"] == accs
        assert g["final_test_acc"]["mean"] == pytest.approx(statistics.fmean(accs))
        assert g["final_test_acc"]["std"] == pytest.approx(statistics.stdev(accs))
        assert g["seeds"] == [0, 1] and g["steps"]["values"] == [150, 150]
    assert (out / "compare.png").is_file()


def test_local_sweep_with_two_processes_per_run(tmp_path, synthetic_mnist):
    path = tmp_path / "two.yaml"
    path.write_text(f"overrides: {{data.root: {synthetic_mnist}, data.download: false, dist.device: cpu, "
                    "train.epochs: 1, train.global_batch_size: 50, tracking.plots: false}\n"
                    "grid: {train.lr: [0.05, 0.1]}\n")
    out = tmp_path / "out"
    result = check(run_cmd(sweep_cmd(path, "--out", str(out), "--local", "--processes", "2"), timeout=300))
    assert result.stdout.count("training on 2 process(es), cpu, backend gloo") == 2, result.stdout
    summaries = [json.loads((e.run_dir / "summary.json").read_text()) for e in sweep.load_sweep(path, out).elements]
    assert [s["world_size"] for s in summaries] == [2, 2] and [s["steps"] for s in summaries] == [20, 20]
