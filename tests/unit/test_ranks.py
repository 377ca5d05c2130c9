"""Who says an error when several ranks have it (``mnistdist.ranks.report_exception``), and that
a rank leaving it to another rank of its own launcher does not exit first (the launcher would
stop that rank before it has said it: test_config_error_under_the_launchers_is_one_line)."""

from __future__ import annotations

import pytest

from mnistdist import ranks
from mnistdist.checkpoint import CheckpointError
from mnistdist.config import ConfigError
from mnistdist.data import DataError
from mnistdist.rundir import RunDirLost


def report(monkeypatch, capsys, exc: BaseException, rank: int | None, local_rank: int | None,
           world_size: int = 4) -> tuple[str, list[float]]:
    """What the rank prints for ``exc`` (in a launch of ``world_size`` ranks, 2 per launcher),
    and the waits it made."""
    for name, value in (("RANK", rank), ("LOCAL_RANK", local_rank), ("WORLD_SIZE", world_size)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, str(value))
    waits: list[float] = []
    monkeypatch.setattr(ranks, "sleep", waits.append)  # the launcher never stops us here
    ranks.report_exception(exc)
    return capsys.readouterr().err, waits


@pytest.mark.parametrize(("exc", "rank", "local_rank", "said", "waits"), [
    # alike on every rank: rank 0 says it, plainly; its own launcher's ranks wait for it
    (ConfigError("bad"), 0, 0, "error: bad\n", 0),
    (ConfigError("bad"), 1, 1, "[rank 1] error: bad\n", 1),  # rank 0 never ended it: said after the wait
    (CheckpointError("bad"), 1, 1, "[rank 1] error: bad\n", 1),
    (ConfigError("bad"), 2, 0, "", 0),  # another launcher (node): its exit cannot stop rank 0
    (ConfigError("bad"), 3, 1, "", 0),
    # agreed by the ranks (a stop): rank 0 says it, with its rank
    (RunDirLost("gone"), 0, 0, "[rank 0] error: gone\n", 0),
    (RunDirLost("gone"), 1, 1, "[rank 1] error: gone\n", 1),
    # the data is on each node's disk: its first rank says it
    (DataError("no data"), 2, 0, "[rank 2] error: no data\n", 0),
    (DataError("no data"), 3, 1, "[rank 3] error: no data\n", 1),
    # anything else: each rank says its own at once
    (ValueError("mine"), 3, 1, "[rank 3] error: mine\n", 0),
])
def test_an_error_is_said_once_by_one_rank_and_the_others_wait_for_it(
        monkeypatch, capsys, exc, rank, local_rank, said, waits):
    printed, made = report(monkeypatch, capsys, exc, rank, local_rank)
    assert printed == said and made == [ranks.SPEAKER_WAIT_S] * waits


def test_one_process_says_its_error_plainly(monkeypatch, capsys):
    assert report(monkeypatch, capsys, ConfigError("bad"), None, None, world_size=1) == ("error: bad\n", [])
    assert report(monkeypatch, capsys, RunDirLost("gone"), 0, 0, world_size=1) == ("error: gone\n", [])


def test_a_rank_without_a_launcher_does_not_wait(monkeypatch, capsys):
    """No LOCAL_RANK: not started by an agent that stops its ranks together."""
    assert report(monkeypatch, capsys, ConfigError("bad"), 1, None) == ("", [])


def test_ctrl_c_while_waiting_leaves_quietly(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")

    def interrupted(seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(ranks, "sleep", interrupted)
    ranks.report_exception(ConfigError("bad"))
    assert capsys.readouterr().err == ""
