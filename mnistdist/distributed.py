"""Everything that talks to accelerate / torch.distributed lives here.

Every helper also works with a single process (``python train_dist.py``), where reductions
are the identity and barriers return at once (in the spirit of detectron2's ``comm.py``).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from pathlib import Path
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as torch_dist
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed

from mnistdist import shm
from mnistdist.config import ConfigError, DistConfig


class Heartbeat:
    """Liveness of every rank, for naming the culprit when a collective fails.

    A daemon thread touches ``DIR/rank-N`` every ``interval_s``. It keeps beating while its
    rank waits inside a collective, but stops when the process is stopped (SIGSTOP), killed or
    gone, so after a collective timeout the ranks whose file is stale are the ones that hung.
    ``DIR`` is in the run directory, which every node must share anyway (checkpoints).
    """

    def __init__(self, directory: Path, rank: int, world_size: int, interval_s: float = 1.0) -> None:
        self.directory, self.rank, self.world_size, self.interval_s = directory, rank, world_size, interval_s
        self._stop = threading.Event()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._path = self.directory / f"rank-{rank}"
        self._path.touch()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="mnistdist-heartbeat")
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                os.utime(self._path)
            except OSError:
                pass  # a full or read-only disk must not kill the heartbeat thread's rank

    def silent_ranks(self, older_than_s: float) -> dict[int, float]:
        """Ranks (other than this one) whose last beat is older than ``older_than_s``: age in s."""
        now, silent = time.time(), {}
        for r in range(self.world_size):
            try:
                age = now - (self.directory / f"rank-{r}").stat().st_mtime
            except OSError:
                age = float("inf")
            if r != self.rank and age > older_than_s:
                silent[r] = age
        return silent

    def stop(self) -> None:
        self._stop.set()


def is_collective_failure(exc: BaseException) -> bool:
    """A failed or timed-out collective (a peer died, hung or left), as opposed to a bug."""
    if isinstance(exc, (torch_dist.DistError, shm.ShmPeerError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        word in text for word in ("Gloo", "gloo", "NCCL", "Connection reset", "Connection closed", "timed out",
                                  "Timed out", "Broken pipe", "Socket Timeout")
    )


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
        self.cfg = cfg
        self._shm: shm.ShmChannel | None = None
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
        model, optimizer = self.accelerator.prepare(model, optimizer)
        if isinstance(model, torch.nn.parallel.DistributedDataParallel) and self.cfg.cpu_allreduce == "shm":
            self._shm = self._open_shm_channel(model)
            if self._shm is not None:
                model.register_comm_hook(self._shm, _shm_allreduce_hook)
        return model, optimizer

    @property
    def gradient_reduction(self) -> str:
        """How gradients are averaged across ranks, for the log: "none" (one process),
        "shared memory", or the process group's backend ("gloo", "nccl")."""
        if self.world_size == 1:
            return "none"
        return "shared memory" if self._shm is not None else self.backend

    def _open_shm_channel(self, model: torch.nn.Module) -> shm.ShmChannel | None:
        """The shared-memory channel of this job, or None (gloo then) where it cannot work.
        Collective: every rank calls it, and all of them get a channel or none does."""
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        why_not = shm.unsupported_reason(self.world_size, local_world_size, self.device.type)
        if why_not:
            return None  # e.g. several machines: gloo is the right tool there, no warning
        # A slot holds any DDP bucket (at most all gradients) and any small reduction.
        slot_bytes = -(-sum(p.numel() * p.element_size() for p in model.parameters()) // 64) * 64
        created: tuple[str, int] | str = ""
        if self.is_main:
            path = shm.new_path()
            try:
                created = (str(path), shm.create_file(path, self.world_size, slot_bytes))
            except OSError as e:
                created = f"cannot create {path}: {e}"
        channel = None
        try:
            created = self.broadcast_object(created)
            error = created if isinstance(created, str) else None
            if error is None:
                try:
                    channel = shm.ShmChannel(Path(created[0]), self.rank, self.world_size, slot_bytes,
                                             created[1], self.cfg.timeout_s)
                except Exception as e:  # noqa: BLE001 - every rank must reach the gather below
                    error = f"rank {self.rank}: {type(e).__name__}: {e}"
            errors = [e for e in self.gather_object(error) if e]  # also: everyone has mapped it now
        finally:
            # Unlinked once every rank mapped it, or when setup failed anywhere: no stale file.
            if self.is_main and not isinstance(created, str):
                Path(created[0]).unlink(missing_ok=True)
        if errors:
            if channel is not None:
                channel.close()
            warn_main(f"dist.cpu_allreduce=shm unavailable ({errors[0]}); averaging gradients with gloo")
            return None
        return channel

    def backward(self, loss: torch.Tensor) -> None:
        # Under DDP this is where gradients are averaged across ranks (bucketed all-reduces
        # overlapping the backward pass): the only per-step sync point of training.
        self.accelerator.backward(loss)

    @staticmethod
    def raw_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """The torch optimizer inside accelerate's wrapper (for CUDA-graph capture)."""
        return getattr(optimizer, "optimizer", optimizer)

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.accelerator.unwrap_model(model)

    def autocast(self) -> contextlib.AbstractContextManager:
        return self.accelerator.autocast()

    # -- collectives (identity with one process) -------------------------------------------
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks; every rank gets the result on the tensor's device."""
        if self.world_size == 1:
            return tensor
        if self._shm is not None and tensor.device.type == "cpu":
            return self._shm.all_reduce_sum_(tensor.clone().contiguous())
        return self.accelerator.reduce(tensor.to(self.device), reduction="sum").to(tensor.device)

    def any_flags(self, flags: list[torch.Tensor | bool]) -> list[bool]:
        """For each flag: is it set on any rank? One all-reduce for all of them; this is the
        agreement that makes every rank stop at the same step."""
        local = torch.stack([torch.as_tensor(f, device=self.device).float().reshape(()) for f in flags])
        return [bool(v) for v in self.all_reduce_sum(local).tolist()]

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
        if self._shm is not None:
            self._shm.close()
            self._shm = None
        self.accelerator.end_training()
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def _shm_allreduce_hook(channel, bucket):  # type: ignore[no-untyped-def]
    """DDP comm hook: average one gradient bucket (``torch.distributed.GradBucket``) through
    shared memory; returns a completed ``Future[Tensor]``. Like DDP's default hook it divides
    by the world size first and then sums (with 2 processes: bitwise gloo's result).

    (No annotations: DDP compares them with its own classes, and this module's postponed
    annotations are strings.)"""
    buffer = bucket.buffer()
    buffer.div_(channel.world_size)
    channel.all_reduce_sum_(buffer)
    done: torch.futures.Future = torch.futures.Future()
    done.set_result(buffer)
    return done


def warn_main(message: str) -> None:
    """A warning on stderr from the main process only (before or after the group exists)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"warning: {message}", file=sys.stderr, flush=True)


def report_exception(exc: BaseException, label: str = "error") -> None:
    """``label: message`` on stderr, prefixed with the rank when several run."""
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank is not None and launched_world_size() > 1 else ""
    print(f"{prefix}{label}: {exc}", file=sys.stderr, flush=True)
