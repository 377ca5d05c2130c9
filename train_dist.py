"""Train the MNIST MLP on one or many processes.

    python train_dist.py [--config FILE] [--run-dir DIR] [section.key=value ...]
    accelerate launch --config_file configs/accelerate/cpu.yaml train_dist.py ...

Parsing, config loading and error handling live in mnistdist.cli; training in mnistdist.training.
"""

import sys

from mnistdist.cli import exit_process, train_main

if __name__ == "__main__":
    exit_process(train_main(sys.argv[1:]))
