"""A stand-in for wandb (put first on PYTHONPATH by the tests that start runs with it).

* ``STUB_WANDB_FINISH_S``: ``run.finish()`` takes that many seconds (default 3) and then writes
  ``STUB_WANDB_MARKER``, so a test can see whether the main process was allowed to finish W&B
  before the job ended;
* ``STUB_WANDB_HANG=init|log|summary|image|finish``: that call never returns (``log`` hangs on
  its ``STUB_WANDB_HANG_AFTER``-th call, default 0: the first). On entering it, the stub writes
  ``hanging in <call>`` to ``STUB_WANDB_MARKER``, so a test knows when W&B is stuck.
"""

import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

_never = threading.Event()


def _hang_here(call):
    if os.environ.get("STUB_WANDB_HANG") == call:
        Path(os.environ["STUB_WANDB_MARKER"]).write_text(f"hanging in {call}\n")
        _never.wait()


class Settings:
    def __init__(self, **kwargs):
        pass


class Table:
    def __init__(self, **kwargs):
        pass


class Image:
    def __init__(self, *args, **kwargs):
        _hang_here("image")


class _Summary(dict):
    def __setitem__(self, key, value):
        _hang_here("summary")
        super().__setitem__(key, value)

    def update(self, *args, **kwargs):
        _hang_here("summary")
        super().update(*args, **kwargs)


class _Run:
    def __init__(self, kwargs):
        self.summary = _Summary()
        self.logged = 0
        self.offline = kwargs.get("mode") != "online"
        self.url = None if self.offline else f"https://wandb.example/stub/{kwargs.get('id')}"
        sync_dir = Path(kwargs.get("dir") or ".") / "wandb" / f"offline-run-stub-{kwargs.get('id')}"
        self.settings = SimpleNamespace(sync_dir=str(sync_dir))

    def log(self, data, step=None):
        if self.logged >= int(os.environ.get("STUB_WANDB_HANG_AFTER", "0")):
            _hang_here("log")
        self.logged += 1

    def finish(self, exit_code=0):
        _hang_here("finish")
        time.sleep(float(os.environ.get("STUB_WANDB_FINISH_S", "3")))
        Path(os.environ["STUB_WANDB_MARKER"]).write_text(f"finished with exit code {exit_code}\n")


def setup(settings=None):
    pass


def init(**kwargs):
    _hang_here("init")
    return _Run(kwargs)


def teardown():
    pass
