"""Stop requests in the real training loop, in this process, on tiny synthetic MNIST: a Ctrl-C
mid-training is a clean, resumable stop; one during the final writes changes nothing."""

from __future__ import annotations

import os
import signal

import pytest

from mnistdist import checkpoint, training
from mnistdist.config import load_config
from mnistdist.signals import EXIT_INTERRUPTED, FaultInjector, Interrupted
from tests.smoke.test_train_smoke import data, one_process_env, overrides  # noqa: F401 - fixtures


def test_ctrl_c_mid_training_stops_after_that_step_with_a_checkpoint(tmp_path, data, one_process_env,  # noqa: F811
                                                                     monkeypatch):
    monkeypatch.setenv("MNISTDIST_FAULT", "step=7,action=INT")
    with pytest.raises(Interrupted) as stopped:
        training.run(load_config(None, overrides(data)), tmp_path / "run", resume="never")
    assert stopped.value.exit_code == EXIT_INTERRUPTED
    # The request is agreed at the next step boundary: stopped after step 8, checkpoint at 8.
    assert "stopped by SIGINT after step 8" in str(stopped.value)
    assert checkpoint.list_checkpoints(tmp_path / "run")[0].name == "step-00000008"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_ctrl_c_during_the_final_writes_does_not_fail_a_finished_run(tmp_path, data, one_process_env,  # noqa: F811
                                                                     monkeypatch):
    real_write_results = training.write_results

    def interrupted_write_results(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C as the run finishes
        return real_write_results(*args, **kwargs)

    monkeypatch.setattr(training, "write_results", interrupted_write_results)
    summary = training.run(load_config(None, overrides(data)), tmp_path / "run", resume="never")
    assert summary["steps"] == 40 and (tmp_path / "run" / "summary.json").is_file()


def test_fault_injector_is_the_step_itself_when_unset():
    def step(x, y, lr):
        return False

    assert FaultInjector(rank=0, env="").wrap(step, steps_done=0) is step
    assert FaultInjector(rank=1, env="step=3,rank=0,action=TERM").wrap(step, steps_done=0) is step
