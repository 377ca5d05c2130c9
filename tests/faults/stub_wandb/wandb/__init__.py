"""A stand-in for wandb (put first on PYTHONPATH by tests/faults/test_stopping.py): a run whose
finish() takes STUB_WANDB_FINISH_S seconds and then writes STUB_WANDB_MARKER, so a test can see
whether the main process was allowed to finish W&B before the job ended."""

import os
import time
from pathlib import Path


class Settings:
    def __init__(self, **kwargs):
        pass


class Table:
    def __init__(self, **kwargs):
        pass


class Image:
    def __init__(self, *args, **kwargs):
        pass


class _Run:
    def __init__(self):
        self.summary = {}

    def log(self, data, step=None):
        pass

    def finish(self, exit_code=0):
        time.sleep(float(os.environ.get("STUB_WANDB_FINISH_S", "3")))
        Path(os.environ["STUB_WANDB_MARKER"]).write_text(f"finished with exit code {exit_code}\n")


def init(**kwargs):
    return _Run()


def teardown():
    pass
