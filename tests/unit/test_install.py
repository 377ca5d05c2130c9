"""A non-editable install works outside the checkout: the wheel carries the configs, a shipped
config is named from any directory, ``--version`` has no commit to name.

Slow (builds a wheel and a virtual environment, ~1 min): the venv installs only mnistdist
(``--no-deps``) and borrows every dependency from the running environment through a .pth
file, so nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import mnistdist
from tests.conftest import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel of this checkout, built from a copy of it."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"  # a copy, so the build writes nothing into the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "mnistdist", src / "mnistdist", ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheels), str(src)], check=True, capture_output=True)
    return next(wheels.glob("mnistdist-*.whl"))


@pytest.fixture(scope="module")
def installed(wheel: Path) -> Path:
    """A venv holding only the wheel (its dependencies borrowed); returns its bin/ directory."""
    venv = wheel.parent.parent / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = subprocess.run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # The running environment's packages (torch, ...), after the venv's own: a plain path
    # line, so an editable mnistdist there (a .pth import hook) stays inactive.
    borrowed = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(purelib, "borrowed.pth").write_text("".join(f"{p}\n" for p in sorted(borrowed)))
    # Without PYTHONPATH: a checkout on it (its mnistdist.egg-info) would look installed to pip.
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps",
                    "--no-index", "-q", str(wheel)], check=True, capture_output=True, env=without_checkout())
    return venv / "bin"


def run_installed(bin_dir: Path, *args: str, cwd: Path, program: str = "mnistdist") -> subprocess.CompletedProcess:
    """``program`` of the venv run in ``cwd``, without the checkout on PYTHONPATH."""
    return subprocess.run([str(bin_dir / program), *args], cwd=cwd, env=without_checkout(), capture_output=True,
                          text=True)


def without_checkout() -> dict[str, str]:
    """This environment without PYTHONPATH (which may name a checkout) and the data root."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MNISTDIST_DATA_ROOT")}


def test_the_wheel_carries_every_config(wheel):
    shipped = {"mnistdist/" + p.relative_to(REPO / "mnistdist").as_posix()
               for p in (REPO / "mnistdist" / "configs").rglob("*.yaml")}
    assert {"mnistdist/configs/default.yaml", "mnistdist/configs/accelerate/cpu.yaml",
            "mnistdist/configs/sweeps/lessons.yaml"} <= shipped
    assert shipped <= set(zipfile.ZipFile(wheel).namelist())


def test_installed_package_runs_from_another_directory(installed, tmp_path):
    result = run_installed(installed, "-c", "import mnistdist, importlib.metadata as m; "
                           "print(mnistdist.__file__); print(m.version('mnistdist'))", cwd=tmp_path, program="python")
    assert result.returncode == 0, result.stderr
    site = result.stdout.split()
    assert not Path(site[0]).is_relative_to(REPO), "the test must run the installed copy"
    assert site[1] == mnistdist.__version__
    configs = Path(site[0]).parent / "configs"
    for name in ("default.yaml", "seed.yaml", "mse.yaml", "seed_no_final_relu.yaml", "accelerate/cpu.yaml",
                 "sweeps/lessons.yaml"):
        assert (configs / name).is_file(), name


@pytest.mark.parametrize("config", ["seed", "configs/seed.yaml", "seed.yaml"])
def test_installed_train_takes_a_shipped_config(installed, tmp_path, config):
    result = run_installed(installed, "train", "--config", config, "--print-config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "final_relu: true" in result.stdout and "lr: 0.01" in result.stdout


def test_installed_train_default_config_and_help(installed, tmp_path):
    result = run_installed(installed, "train", "--print-config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "nesterov: true" in result.stdout  # the shipped default.yaml
    help_text = run_installed(installed, "train", "--help", cwd=tmp_path).stdout
    assert "configs/default.yaml" not in help_text and "seed" in help_text


def test_installed_unknown_config_is_one_line(installed, tmp_path):
    result = run_installed(installed, "train", "--config", "nope", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: nope: config file not found; shipped configs: "
                                     "default, mse, seed, seed_no_final_relu")


@pytest.mark.parametrize("sweep", ["lessons", "configs/sweeps/lessons.yaml"])
def test_installed_sweep_takes_a_shipped_sweep(installed, tmp_path, sweep):
    result = run_installed(installed, "sweep", sweep, "--list", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "seed_no_final_relu-seed4" in result.stdout


def test_installed_version_names_no_commit(installed, tmp_path):
    result = run_installed(installed, "--version", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"mnistdist {mnistdist.__version__}"
