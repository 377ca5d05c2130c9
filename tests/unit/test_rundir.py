"""The run directory's lock: never followed through a link, and still this job's while it runs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from mnistdist import rundir
from mnistdist.config import ConfigError


class OneProcess:
    """``Dist`` of a single process, as far as ``rundir.claim`` uses it."""

    world_size, rank, is_main = 1, 0, True

    def on_main(self, fn):
        return fn()


@pytest.mark.parametrize("target_exists", [True, False])
def test_a_lock_that_is_a_symlink_is_refused_and_its_target_left_alone(tmp_path, target_exists):
    run_dir, outside = tmp_path / "run", tmp_path / "precious.txt"
    run_dir.mkdir()
    if target_exists:
        outside.write_text("keep me\n")
    (run_dir / ".lock").symlink_to(outside)
    with pytest.raises(ConfigError) as refused:
        with rundir.claim(run_dir, OneProcess()):
            pytest.fail("claimed a run directory whose .lock is a link")
    message = str(refused.value)
    assert "\n" not in message and str(run_dir / ".lock") in message and "link" in message
    if target_exists:
        assert outside.read_text() == "keep me\n"  # not truncated, no holder line written into it
    else:
        assert not outside.exists()  # not created through the link either


def test_a_lock_with_another_name_elsewhere_is_refused(tmp_path):
    """A hard link to a file outside: writing the holder line would overwrite that file."""
    run_dir, outside = tmp_path / "run", tmp_path / "precious.txt"
    run_dir.mkdir()
    outside.write_text("keep me\n")
    os.link(outside, run_dir / ".lock")
    with pytest.raises(ConfigError, match=r"\.lock: .*other name"):
        with rundir.claim(run_dir, OneProcess()):
            pass
    assert outside.read_text() == "keep me\n"


def test_a_lock_that_is_a_directory_is_refused_in_one_line(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / ".lock").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"\.lock: not a regular file"):
        with rundir.claim(run_dir, OneProcess()):
            pass


def test_the_held_directory_checks_quietly_while_it_is_untouched(tmp_path):
    with rundir.claim(tmp_path / "run", OneProcess()) as run:
        run.check_held()
        assert (tmp_path / "run" / ".lock").read_text().startswith(f"pid {os.getpid()} on ")


@pytest.mark.parametrize("what", ["deleted", "recreated", "lock removed", "lock replaced"])
def test_a_run_directory_deleted_or_replaced_while_held_is_noticed(tmp_path, what):
    root = tmp_path / "run"
    with rundir.claim(root, OneProcess()) as run:
        if what in ("deleted", "recreated"):
            shutil.rmtree(root)
            if what == "recreated":
                root.mkdir()  # e.g. by another job given the same --run-dir: its lock is not ours
                (root / ".lock").write_text("pid 4242 on node7\n")
        else:
            (root / ".lock").unlink()
            if what == "lock replaced":
                (root / ".lock").write_text("pid 4242 on node7\n")
        with pytest.raises(rundir.RunDirLost) as lost:
            run.check_held()
    message = str(lost.value)
    assert "\n" not in message and str(root) in message and lost.value.exit_code not in (0, 2, 75, 130)


def test_a_run_directory_named_through_a_symlink_is_held_as_its_target(tmp_path):
    """--run-dir may be a link to the real directory (e.g. on scratch space): that is its identity."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with rundir.claim(tmp_path / "link", OneProcess()) as run:
        run.check_held()
    assert (tmp_path / "real" / ".lock").is_file()


def test_read_summary_tolerates_anything(tmp_path):
    run = rundir.RunDir(Path(tmp_path))
    assert rundir.read_summary(run) is None
    for text in ("", "not json", "[1, 2]", '{"steps": "40", "final_test_acc": 0.9}', '{"steps": 40}',
                 '{"steps": 40, "final_test_acc": true}', '{"steps": 40, "final_test_acc": NaN}'):
        run.summary.write_text(text)
        assert rundir.read_summary(run) is None, text
    run.summary.write_text('{"steps": 40, "final_test_acc": 0.5, "epochs": 2}')
    assert rundir.read_summary(run) == {"steps": 40, "final_test_acc": 0.5, "epochs": 2}
