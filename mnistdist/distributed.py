"""Everything that talks to accelerate / torch.distributed lives here.

Every helper also works with a single process (``python train_dist.py``), where reductions
are the identity and barriers return at once (in the spirit of detectron2's ``comm.py``).
"""

from __future__ import annotations

import contextlib
import os
import sys
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as torch_dist
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed

from mnistdist.config import ConfigError, DistConfig


def launched_world_size() -> int:
    """The number of processes the launcher started (``WORLD_SIZE``), 1 without a launcher.

    Known before any process group exists, so config validation can use it.
    """
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def is_main_process() -> bool:
    """Rank 0 (or no launcher): for output after the process group is gone."""
    return os.environ.get("RANK", "0") == "0"


def resolve_device(cfg: DistConfig) -> bool:
    """Return True when training runs on the CPU."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("dist.device: cuda was requested but CUDA is not available here; use auto or cpu")
    return cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())


class Dist:
    """The process group of one run, as seen from one rank."""

    def __init__(self, cfg: DistConfig) -> None:
        use_cpu = resolve_device(cfg)
        # Without cpu=True on a machine without CUDA, accelerate would make every worker its
        # own rank 0 (each one "world size 1"); the check below catches that too.
        # accelerate picks the backend itself (gloo on CPU, nccl on GPUs); we set the timeout.
        handler = InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.timeout_s))
        self.accelerator = Accelerator(
            cpu=use_cpu,
            mixed_precision=cfg.mixed_precision,
            kwargs_handlers=[handler],
        )
        expected = launched_world_size()
        if self.accelerator.num_processes != expected:
            raise RuntimeError(
                f"the launcher started {expected} processes (WORLD_SIZE) but this one joined a "
                f"group of {self.accelerator.num_processes}: on a machine without CUDA launch with "
                "--multi_gpu (or configs/accelerate/cpu.yaml) so the workers join one gloo group"
            )

    # -- who am I -----------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def is_local_main(self) -> bool:
        return self.accelerator.is_local_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def backend(self) -> str:
        return torch_dist.get_backend() if torch_dist.is_initialized() else "none"

    # -- model ---------------------------------------------------------------------------
    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
        """Wrap model (DDP, autocast) and optimizer. Data loaders are never passed here: we
        own the sampler, and accelerate would shard an already sharded loader again."""
        return self.accelerator.prepare(model, optimizer)

    def backward(self, loss: torch.Tensor) -> None:
        # Under DDP this is where gradients are averaged across ranks (bucketed all-reduces
        # overlapping the backward pass): the only per-step sync point of training.
        self.accelerator.backward(loss)

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.accelerator.unwrap_model(model)

    def autocast(self) -> contextlib.AbstractContextManager:
        return self.accelerator.autocast()

    # -- collectives (identity with one process) -------------------------------------------
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks; every rank gets the result on the tensor's device."""
        if self.world_size == 1:
            return tensor
        return self.accelerator.reduce(tensor.to(self.device), reduction="sum").to(tensor.device)

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world_size == 1:
            return obj
        holder = [obj]
        torch_dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch_dist.all_gather_object(out, obj)
        return out

    # -- side effects --------------------------------------------------------------------
    def print(self, *args: Any) -> None:
        """Print on the main process only."""
        if self.is_main:
            print(*args, flush=True)

    def seed(self, seed: int) -> None:
        """Same seed on every rank: identical initial weights everywhere."""
        set_seed(seed)

    def close(self) -> None:
        """Tear the process group down (safe to call twice)."""
        self.accelerator.end_training()
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def report_exception(exc: BaseException) -> None:
    """One line on stderr, prefixed with the rank when several run."""
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank is not None and launched_world_size() > 1 else ""
    print(f"{prefix}error: {exc}", file=sys.stderr, flush=True)
