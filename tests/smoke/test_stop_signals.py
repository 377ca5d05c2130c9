"""Stop requests in the real training loop, in this process, on tiny synthetic MNIST: a Ctrl-C
mid-training is a clean, resumable stop; one during the final writes changes nothing."""

from __future__ import annotations

import os
import signal

import pytest

from mnistdist import checkpoint, training
from mnistdist.config import load_config
from mnistdist.signals import EXIT_INTERRUPTED, Interrupted
from tests.fault_train import injected
from tests.smoke.test_train_smoke import data, overrides  # noqa: F401 - fixtures


def test_ctrl_c_mid_training_stops_after_that_step_with_a_checkpoint(tmp_path, data, one_process_env):  # noqa: F811
    # Python's default_int_handler, or SIG_IGN when the suite runs in the background (`cmd &`
    # in a script: the shell starts it with SIGINT ignored).
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(Interrupted) as stopped, injected("step=7,action=INT"):
        training.run(load_config(None, overrides(data)), tmp_path / "run", resume="never")
    assert stopped.value.exit_code == EXIT_INTERRUPTED
    # The request is agreed at the next agreement (every 10 steps): stopped after step 10.
    assert "stopped by SIGINT after step 10" in str(stopped.value)
    assert checkpoint.list_checkpoints(tmp_path / "run")[0].name == "step-00000010"
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def test_ctrl_c_during_the_final_writes_does_not_fail_a_finished_run(tmp_path, data, one_process_env,  # noqa: F811
                                                                     monkeypatch):
    real_write_results = training.write_results

    def interrupted_write_results(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C as the run finishes
        return real_write_results(*args, **kwargs)

    monkeypatch.setattr(training, "write_results", interrupted_write_results)
    summary = training.run(load_config(None, overrides(data)), tmp_path / "run", resume="never")
    assert summary["steps"] == 40 and (tmp_path / "run" / "summary.json").is_file()


def test_a_run_directory_in_use_by_another_job_is_refused_naming_the_holder(tmp_path, data, one_process_env):  # noqa: F811
    import subprocess
    import sys

    from mnistdist.config import ConfigError

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # Another job holds the directory (the lock a training job takes at start).
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
         "f.write('pid 4242 on node7 since 2026-12-02 10:00:00'); f.flush(); print('held', flush=True); time.sleep(60)",
         str(run_dir / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=r"in use by another job \(pid 4242 on node7 since 2026-12-02 10:00:00\)"):
            training.run(load_config(None, overrides(data)), run_dir, resume="auto")
        assert not (run_dir / "config.yaml").exists()  # refused before anything was written
    finally:
        holder.kill()  # SIGKILL: the kernel releases its lock
        holder.wait()
    # ...and once the holder is gone, the directory is free again, and freed again after a run.
    training.run(load_config(None, overrides(data, "train.max_steps=3")), run_dir, resume="auto")
    training.run(load_config(None, overrides(data, "train.max_steps=5")), run_dir, resume="auto")
