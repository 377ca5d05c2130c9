"""``train_dist.py`` whose rank 0 starts ``LATE_RANK0_S`` seconds after the others, for the tests.

    LATE_RANK0_S=2.5 accelerate launch ... tests/distributed/late_rank0_probe.py [train_dist.py arguments]

An error that every rank has alike is said by rank 0 alone. On a busy machine rank 0 can reach
it last; this makes that certain, so a test can show that rank 0 still says it although the
other ranks have refused the input long before (docs/reliability.md, "An error said once, by rank 0").
"""

import os
import sys
import time

from mnistdist.cli import exit_process, train_main

if __name__ == "__main__":
    if os.environ.get("RANK", "0") == "0":
        time.sleep(float(os.environ["LATE_RANK0_S"]))
    exit_process(train_main(sys.argv[1:]))
