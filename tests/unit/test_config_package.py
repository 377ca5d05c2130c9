"""The configs ship inside the package: a config is named by path or by its shipped name, from
any directory; ``mnistdist --version`` says which code runs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import mnistdist
from mnistdist import cli
from mnistdist.config import (
    CONFIG_DIR,
    DEFAULT_CONFIG,
    ConfigError,
    load_config,
    resolve_config_path,
    shipped_configs,
    version_string,
)
from tests.conftest import REPO


def test_configs_live_in_the_package():
    assert CONFIG_DIR == (REPO / "mnistdist" / "configs").resolve()
    assert DEFAULT_CONFIG == CONFIG_DIR / "default.yaml"
    for name in ("default.yaml", "seed.yaml", "mse.yaml", "seed_no_final_relu.yaml",
                 "accelerate/cpu.yaml", "sweeps/lessons.yaml"):
        assert (CONFIG_DIR / name).is_file(), name


def test_the_checkout_keeps_configs_paths():
    # README, the Slurm templates and the tests name configs/...: a link to the package's copy.
    assert (REPO / "configs").is_symlink()
    assert (REPO / "configs").resolve() == CONFIG_DIR
    assert (REPO / "configs" / "accelerate" / "cpu.yaml").is_file()


def test_shipped_configs_lists_names():
    names = shipped_configs()
    assert {"default", "seed", "mse", "seed_no_final_relu"} <= set(names)
    assert "sweeps/lessons" in shipped_configs("sweeps")


@pytest.mark.parametrize("name", ["seed", "seed.yaml", "configs/seed.yaml"])
def test_a_shipped_config_by_name_from_any_directory(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    assert resolve_config_path(name) == CONFIG_DIR / "seed.yaml"
    assert load_config(name).model.final_relu is True


def test_a_variant_by_name_finds_its_base(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config("mse").train.loss == "mse"


@pytest.mark.parametrize("name", ["lessons", "lessons.yaml", "sweeps/lessons", "configs/sweeps/lessons.yaml"])
def test_a_shipped_sweep_by_name(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    assert resolve_config_path(name, "sweep file", under="sweeps") == CONFIG_DIR / "sweeps" / "lessons.yaml"


def test_an_existing_file_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "seed.yaml").write_text("train:\n  lr: 0.5\n")
    assert resolve_config_path("seed.yaml") == Path("seed.yaml")
    assert load_config("seed.yaml").train.lr == 0.5
    assert load_config("seed").train.lr == 0.01  # no file named "seed" here: the shipped one


def test_an_unknown_name_lists_the_shipped_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config("sead")
    text = str(info.value)
    assert text.startswith("sead: config file not found; shipped configs: default, ")
    assert "\n" not in text


def test_a_missing_path_is_not_found():
    with pytest.raises(ConfigError, match=r"^/nonexistent/c.yaml: config file not found"):
        load_config("/nonexistent/c.yaml")


def test_train_help_names_no_checkout_path(capsys):
    parser = cli._Parser(prog="train_dist.py")
    cli.add_train_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "configs/default.yaml" not in out
    assert "seed" in out and "default" in out


def git_commit() -> str | None:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        return None
    out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


def test_version_string_names_the_version_and_the_commit_of_a_checkout():
    text = version_string()
    assert text.startswith(f"mnistdist {mnistdist.__version__}")
    commit = git_commit()
    if commit is None:
        pytest.skip("not a git checkout")
    assert f"(git {commit[:12]}" in text


def test_mnistdist_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == version_string()


@pytest.mark.parametrize("argv", [["--version"], ["--version", "train.lr=-1"]])
def test_train_dist_version_through_the_train_parser(capsys, argv):
    assert cli.train_main(argv) == 0  # before the config is read: a bad override does not matter
    assert capsys.readouterr().out.strip() == version_string()
    assert cli.main(["train", *argv]) == 0
    assert capsys.readouterr().out.strip() == version_string()


def test_version_is_one_source():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert sys.modules["mnistdist"].__version__ == mnistdist.__version__
