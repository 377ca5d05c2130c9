"""How ``python -m mnistdist.launch`` reads its workers' exit codes (pure; no process started)."""

from __future__ import annotations

import signal

import pytest

from mnistdist.launch import outcome

TERM, INT, USR1, KILL = -signal.SIGTERM, -signal.SIGINT, -signal.SIGUSR1, -signal.SIGKILL


@pytest.mark.parametrize("codes, stop, expected", [
    ([75, 75], None, 75),  # the ranks agreed to stop and wrote a checkpoint
    ([75, TERM], None, 75),  # one caught by the agent's tear-down on its way out
    ([130, 130], signal.SIGINT, 130),
    ([75, 75], signal.SIGINT, 130),  # Ctrl-C at the launcher: said as such
    ([TERM, TERM], signal.SIGTERM, 75),  # a stop that reached the workers before their handlers
    ([USR1, TERM], signal.SIGUSR1, 75),
    ([TERM, TERM], None, None),  # nobody asked to stop: a failure
    ([75, 1], None, None),  # one rank failed
    ([KILL, TERM], signal.SIGTERM, None),  # a killed worker is a failure even during a stop
    ([2, 2, 2], None, 2),  # every rank refused the same input
    ([2, TERM], None, 2),
    ([2, 1], None, None),
    ([], None, None),
])
def test_outcome(codes, stop, expected):
    assert outcome(codes, stop) == expected
