"""The command lines' own behaviour (no training): --print-config, --help, sub-commands."""

from __future__ import annotations

import sys

import pytest
import yaml

from mnistdist import cli
from mnistdist.config import DATA_ROOT_ENV, Config, load_config
from tests.conftest import REPO

SEED = str(REPO / "configs" / "seed.yaml")


def test_print_config_prints_the_resolved_config_and_exits_0(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path))
    for name in ("WORLD_SIZE", "MASTER_PORT", "ACCELERATE_MIXED_PRECISION", "RANK"):
        monkeypatch.delenv(name, raising=False)
    assert cli.train_main(["--config", SEED, "--print-config", "train.lr=0.05"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    expected = load_config(SEED, ["train.lr=0.05"]).to_dict()
    assert printed == expected
    assert printed["train"]["lr"] == 0.05 and printed["data"]["root"] == str(tmp_path)  # override, environment
    assert printed["model"]["final_relu"] is True  # the file
    assert not (tmp_path / "runs").exists()


def test_print_config_of_a_bad_override_is_the_usual_one_line_error(capsys):
    assert cli.train_main(["--print-config", "train.lr=-1"]) == 2
    assert capsys.readouterr().err.strip() == "error: train.lr: must be > 0; got -1.0"


def test_help_lists_every_config_section_and_points_to_the_docs(capsys):
    with pytest.raises(SystemExit) as done:
        cli.train_main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for section in Config.__dataclass_fields__:
        assert f"\n  {section} " in out
    assert "mnistdist/config.py" in out and "--print-config" in out and "section.key=value" in out


def test_mnistdist_help_describes_each_command(capsys):
    assert pytest.raises(SystemExit, cli.main, ["--help"]).value.code == 0
    out = capsys.readouterr().out
    for command in cli.COMMANDS:
        line = next(line for line in out.splitlines() if line.strip().startswith(command + " "))
        assert len(line.split()) > 3  # a description, not just the name
    for argv, message in ((["bogus"], "invalid choice: 'bogus'"), ([], "required: COMMAND")):
        assert pytest.raises(SystemExit, cli.main, argv).value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err


def test_the_command_line_wandb_agent_builds_is_understood(capsys, monkeypatch):
    """`wandb agent` runs `program` with the sweep's parameters as --name=value (its ${args});
    with parameter names section.key that is our override syntax with two dashes. The
    arguments are built here by wandb's own code for the agent's command line."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    for name in ("WORLD_SIZE", "MASTER_PORT", "ACCELERATE_MIXED_PRECISION", "RANK"):
        monkeypatch.delenv(name, raising=False)
    params = {"train.lr": 0.05, "train.loss": "mse", "model.final_relu": False, "train.global_batch_size": 100,
              "train.weight_decay": 1e-05}
    agent_args = create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})["args"]
    assert agent_args[0] == "--train.lr=0.05"
    assert cli.train_main(["--config", SEED, *agent_args, "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    for key, value in params.items():
        section, name = key.split(".")
        assert printed[section][name] == value, key
    assert printed == load_config(SEED, [f"{k}={v}" for k, v in params.items()]).to_dict()


@pytest.mark.parametrize("args, message", [
    (["--train.lr", "0.05"], "error: --train.lr: give a value with '=', e.g. --train.lr=VALUE (or train.lr=VALUE)"),
    (["--train.lrr=0.05"], "error: train.lrr: unknown key; train has epochs"),
])
def test_dashed_overrides_errors_are_one_line(capsys, args, message):
    assert cli.train_main(["--print-config", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and "\n" not in err, err


def test_undash_leaves_flags_and_paths_alone():
    argv = ["--run-dir=/a/b.c", "--config", "x.yaml", "--train.lr=0.1", "train.epochs=2", "--resume=never"]
    assert cli.undash_overrides(argv) == ["--run-dir=/a/b.c", "--config", "x.yaml", "train.lr=0.1", "train.epochs=2",
                                          "--resume=never"]


def test_the_stop_line_says_stopped_once(capsys):
    import signal
    from pathlib import Path

    from mnistdist.signals import EXIT_INTERRUPTED, StopSignals

    signals = StopSignals()
    signals.received = signal.SIGINT
    stop = signals.stopped(10, Path("runs/a/checkpoints/step-00000010"))

    def main(args):
        raise stop

    # run_command ignores SIGTERM and SIGUSR1 after a stop: this process gets its handlers back after.
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        assert cli.run_command(cli._Parser(prog="t"), main, []) == EXIT_INTERRUPTED
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    line = capsys.readouterr().err.strip()
    assert line == ("stopped by SIGINT after step 10; checkpoint written to runs/a/checkpoints/step-00000010; "
                    "run again with the same --run-dir to resume")


CLOSED_PIPE_COMMANDS = {
    "mnistdist sweep --list": [sys.executable, "-m", "mnistdist.cli", "sweep", str(REPO / "configs" / "sweeps" / "lessons.yaml"), "--list"],
    "mnistdist --help": [sys.executable, "-m", "mnistdist.cli", "--help"],
    "mnistdist --version": [sys.executable, "-m", "mnistdist.cli", "--version"],
    "mnistdist compare --help": [sys.executable, "-m", "mnistdist.cli", "compare", "--help"],
    "train_dist.py --print-config": [sys.executable, str(REPO / "train_dist.py"), "--print-config"],
}


@pytest.mark.parametrize("command", CLOSED_PIPE_COMMANDS)
def test_output_into_a_closed_pipe_ends_quietly(command, tmp_path):
    """``mnistdist ... | head``: once head has gone, the command exits as a Unix tool does (SIGPIPE's
    code), without a BrokenPipeError traceback."""
    import os
    import subprocess

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone before the first write
    try:
        result = subprocess.run(CLOSED_PIPE_COMMANDS[command], stdout=write_end, stderr=subprocess.PIPE, text=True,
                                cwd=REPO)
    finally:
        os.close(write_end)
    assert result.stderr == ""
    if "--help" in command:  # argparse itself drops a help text that cannot be written, and exits 0
        assert result.returncode in (0, cli.EXIT_CLOSED_PIPE)
    else:
        assert result.returncode == cli.EXIT_CLOSED_PIPE == 141


EXIT_PROBE = """
import atexit, os, sys
from mnistdist.cli import exit_process

class Finalized:  # collected only by interpreter finalization (a global of __main__)
    def __del__(self, write=os.write):
        write(2, b"finalized")

finalized = Finalized()
atexit.register(lambda: print(" atexit", end=""))
print("block-buffered output", end="")  # stdout is a pipe and PYTHONUNBUFFERED is unset
exit_process(75)
"""


@pytest.mark.slow
@pytest.mark.parametrize("world_size", ["1", "2"])
def test_exit_process_keeps_the_code_the_output_and_atexit(world_size, tmp_path):
    """A launched rank ends without interpreter finalization (docs/reliability.md, "A finished
    rank that aborts"), yet like any exit: its code, its buffered output, its atexit handlers.
    One process alone exits as usual."""
    import subprocess

    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "WORLD_SIZE": world_size, "RANK": "0"}
    result = subprocess.run([sys.executable, "-c", EXIT_PROBE], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 75 and result.stdout == "block-buffered output atexit", result
    assert ("finalized" in result.stderr) == (world_size == "1"), result.stderr
