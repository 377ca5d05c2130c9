"""requirements-lock.txt: every dependency pinned with hashes, and the environment the tests run
in is the locked one (the bitwise results depend on these versions)."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import REPO

LOCK = REPO / "requirements-lock.txt"


def lock_entries() -> list[tuple[Requirement, list[str]]]:
    """(requirement, its sha256 hashes) per entry; continuation lines joined."""
    text = LOCK.read_text()
    entries = []
    for block in re.split(r"\n(?=[A-Za-z0-9])", re.sub(r"\s*#.*", "", text)):
        block = block.replace("\\\n", " ").strip()
        if not block:
            continue
        spec, *hashes = block.split("--hash=")
        entries.append((Requirement(spec.strip()), [h.strip() for h in hashes]))
    return entries


def project() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def test_every_entry_is_pinned_with_hashes():
    entries = lock_entries()
    assert len(entries) > 50
    for req, hashes in entries:
        (spec,) = req.specifier
        assert spec.operator == "==", req
        assert hashes and all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in hashes), req


def test_every_dependency_is_locked_within_its_bounds():
    proj = project()
    wanted = [Requirement(r) for r in proj["dependencies"] + proj["optional-dependencies"]["test"]]
    locked: dict[str, list[Requirement]] = {}
    for req, _ in lock_entries():
        locked.setdefault(canonicalize_name(req.name), []).append(req)
    for want in wanted:
        pins = locked.get(canonicalize_name(want.name))
        assert pins, f"{want.name} is in pyproject.toml but not in {LOCK.name}: run make lock"
        for pin in pins:
            assert want.specifier.contains(next(iter(pin.specifier)).version, prereleases=True), (want, pin)


def test_scipy_is_a_dependency():
    assert any(Requirement(r).name == "scipy" for r in project()["dependencies"])


def test_torch_pins_match_the_makefile():
    pins = re.search(r"^LOCK_PINS = (.*)$", (REPO / "Makefile").read_text(), re.M).group(1).split()
    locked = {canonicalize_name(r.name): str(r.specifier) for r, _ in lock_entries()}
    for pin in pins:
        req = Requirement(pin)
        assert locked[canonicalize_name(req.name)] == str(req.specifier), pin


def test_make_install_installs_from_the_lock():
    makefile = (REPO / "Makefile").read_text()
    assert "pip install --require-hashes -r $(LOCK)" in makefile
    assert "pip install --no-deps -e ." in makefile


def test_this_environment_is_the_locked_one():
    """What `make install` built; a venv installed another way fails here, naming the package."""
    wrong = []
    for req, _ in lock_entries():
        if req.marker is not None and not Marker(str(req.marker)).evaluate():
            continue
        want = next(iter(req.specifier)).version
        try:
            have = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            have = None
        if have != want:
            wrong.append(f"{req.name} {have} (lock: {want})")
    assert not wrong, f"not the locked environment (make install): {', '.join(wrong)}"
