"""The command lines' own behaviour (no training): --print-config, --help, sub-commands."""

from __future__ import annotations

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
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("train", "evaluate", "predict", "plot"):
        line = next(line for line in out.splitlines() if line.strip().startswith(command + " "))
        assert len(line.split()) > 3  # a description, not just the name
    assert cli.main(["bogus"]) == 2
    assert "error: unknown command 'bogus'" in capsys.readouterr().err
