"""``train_dist.py`` that then says how the rank ended, for the tests.

    TEARDOWN_PROBE_DIR=DIR accelerate launch ... tests/distributed/teardown_probe.py [train_dist.py arguments]

Each rank trains exactly as ``train_dist.py`` does and ends as it does (``exit_process``).
Before the end it writes ``DIR/rank-N.json``: its exit code and the names of the threads still
running (``/proc/self/task/*/comm``, Linux). gloo's worker threads (``pt_gloo_runloop``,
``gloo_tcp_loop``) left for interpreter exit can abort a finished rank (docs/reliability.md,
"A finished rank that aborts"), so none may be left. At the end, an atexit handler writes
``DIR/rank-N.atexit`` (as at any exit), and an object of this module that is collected during
interpreter finalization writes ``DIR/rank-N.finalized``: a launched rank must not get there.
"""

import atexit
import json
import os
import sys
from pathlib import Path

from mnistdist.cli import exit_process, train_main


def thread_names() -> list[str]:
    names = []
    for task in Path("/proc/self/task").iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:  # ended meanwhile
            pass
    return sorted(names)


class _Finalized:
    """Writes its file when collected: the interpreter clears this module's globals (and so
    collects it) during finalization."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __del__(self, open_file=os.open, close=os.close, flags=os.O_CREAT | os.O_WRONLY) -> None:
        close(open_file(self.path, flags))


if __name__ == "__main__":
    out = Path(os.environ["TEARDOWN_PROBE_DIR"]) / f"rank-{os.environ.get('RANK', '0')}"
    finalized = _Finalized(out.with_suffix(".finalized"))
    atexit.register(out.with_suffix(".atexit").touch)
    code = train_main(sys.argv[1:])
    out.with_suffix(".json").write_text(json.dumps({"exit_code": code, "threads": thread_names()}))
    exit_process(code)
