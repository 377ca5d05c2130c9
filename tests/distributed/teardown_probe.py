"""``train_dist.py`` that then says which of its threads outlived the run, for the tests.

    TEARDOWN_PROBE_DIR=DIR accelerate launch ... tests/distributed/teardown_probe.py [train_dist.py arguments]

Each rank trains exactly as ``train_dist.py`` does, then writes ``DIR/rank-N.json``: its exit
code and the names of the threads still running (``/proc/self/task/*/comm``, Linux). gloo's
worker threads (``pt_gloo_runloop``, ``gloo_tcp_loop``) left for interpreter exit can abort a
finished rank (docs/reliability.md, "A finished rank that aborts"), so none may be left.
"""

import json
import os
import sys
from pathlib import Path

from mnistdist.cli import train_main


def thread_names() -> list[str]:
    names = []
    for task in Path("/proc/self/task").iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:  # ended meanwhile
            pass
    return sorted(names)


if __name__ == "__main__":
    code = train_main(sys.argv[1:])
    out = Path(os.environ["TEARDOWN_PROBE_DIR"]) / f"rank-{os.environ.get('RANK', '0')}.json"
    out.write_text(json.dumps({"exit_code": code, "threads": thread_names()}))
    sys.exit(code)
