"""Everything that talks to accelerate / torch.distributed lives here.

Every helper also works with a single process (``python train_dist.py``), where reductions
are the identity and barriers return at once (in the spirit of detectron2's ``comm.py``).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import platform
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as torch_dist
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed

from mnistdist.config import ConfigError, DistConfig, version_string
from mnistdist.ranks import launched_world_size, warn_main
from mnistdist.signals import RankFailure, TrainingStopped

T = TypeVar("T")
COLLECTIVE_ERROR_WORDS = ("Gloo", "gloo", "NCCL", "Connection reset", "Connection closed", "timed out", "Timed out",
                          "Broken pipe", "Socket Timeout")
"""Words in the RuntimeError of a failed or timed-out collective (a peer died, hung or left)."""


class Heartbeat:
    """Liveness of every rank, for naming the culprit when a collective fails: a daemon thread
    touches ``DIR/rank-N`` every ``interval_s`` while its process runs (also inside a
    collective), so after a collective timeout the ranks whose file is stale are the ones that
    hung, were stopped or died. ``DIR`` is in the run directory, which every node shares anyway."""

    def __init__(self, directory: Path, rank: int, world_size: int, interval_s: float = 1.0) -> None:
        self.directory, self.rank, self.world_size, self.interval_s = directory, rank, world_size, interval_s
        self.stopped = threading.Event()
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"rank-{rank}").touch()
        threading.Thread(target=self._beat, daemon=True, name="mnistdist-heartbeat").start()

    def _beat(self) -> None:
        while not self.stopped.wait(self.interval_s):
            with contextlib.suppress(OSError):  # a full or read-only disk must not kill the rank
                os.utime(self.directory / f"rank-{self.rank}")

    def culprit(self, timeout_s: float) -> str:
        """Which other ranks stopped beating (for a few intervals at least), in words."""
        older_than_s, now, silent = max(3 * self.interval_s, min(timeout_s / 2, 10.0)), time.time(), []
        for r in range(self.world_size):
            try:
                age = now - (self.directory / f"rank-{r}").stat().st_mtime
            except OSError:
                age = float("inf")
            if r != self.rank and age > older_than_s:
                silent.append(f"rank {r}" if age == float("inf") else f"rank {r} (silent for {age:.0f} s)")
        if silent:
            return f"{', '.join(silent)} stopped responding (hung, stopped or killed)"
        return "another rank exited or raised (see its own error above)"


def _first_line(exc: BaseException, limit: int) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:limit]}" if lines else type(exc).__name__


def mps_available() -> bool:
    """Whether Apple's MPS device is usable here."""
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def resolve_device(cfg: DistConfig, world_size: int = 1) -> str:
    """The device type to train on: ``dist.device``, or for ``auto`` the best one here (CUDA,
    then MPS for a single process, then the CPU); a ConfigError for a choice that cannot work."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("dist.device: cuda was requested but CUDA is not available here; use auto or cpu")
    if cfg.device == "mps" and not mps_available():
        raise ConfigError("dist.device: mps was requested but Apple's MPS is not available here; use auto or cpu")
    if cfg.device == "mps" and world_size > 1:
        raise ConfigError("dist.device: mps runs one process only (there is no multi-process MPS backend); "
                          "launch one process, or use dist.device=cpu")
    if cfg.device != "auto":
        return cfg.device
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if mps_available() and world_size == 1 else "cpu"


def resolve_mixed_precision(cfg: DistConfig) -> str:
    """``dist.mixed_precision``, where ``auto`` follows the launcher (ACCELERATE_MIXED_PRECISION),
    else ``no``; an explicit value wins, with one warning when the launcher asked otherwise."""
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "").strip().lower()
    if cfg.mixed_precision == "auto":
        if launcher in ("", "no", "bf16"):
            return launcher or "no"
        warn_main(f"the launcher asked for --mixed_precision {launcher}, which mnistdist does not support "
                  "(bf16 or no); training in full precision")
        return "no"
    if launcher not in ("", "no") and launcher != cfg.mixed_precision:
        warn_main(f"dist.mixed_precision={cfg.mixed_precision} wins over the launcher's --mixed_precision {launcher}")
    return cfg.mixed_precision


def apply_threads(cfg: DistConfig) -> None:
    """``dist.threads_per_process``: 0 leaves torch with what the launcher set (OMP_NUM_THREADS);
    an explicit value wins, with one warning when the launcher said otherwise."""
    if cfg.threads_per_process == 0:
        return
    launcher = os.environ.get("OMP_NUM_THREADS", "").strip()
    if launcher.isdigit() and int(launcher) != cfg.threads_per_process:
        warn_main(f"dist.threads_per_process={cfg.threads_per_process} wins over the launcher's "
                  f"OMP_NUM_THREADS={launcher}")
    torch.set_num_threads(cfg.threads_per_process)


class StartupFailure(RankFailure):
    """The process group did not come up: a peer did not start, or cannot be reached."""


def start_process_group(backend: str, timeout_s: float) -> None:
    """Join the launcher's process group (``env://``), or raise a ``StartupFailure`` naming the
    rendezvous when that does not happen within ``timeout_s``.

    A generation restarted by torchrun's agent may share the agent's store, which still holds
    the previous generation's keys (pytorch/pytorch issue 135712): it keys its group under its
    restart count, so its workers do not dial the dead ones.

    ``torch._dynamo`` is imported first: imported while a group exists (DDP and the optimizer
    import it), it keeps references to that group which are never released, so
    ``destroy_process_group`` could not join gloo's threads (docs/reliability.md)."""
    import torch._dynamo  # noqa: F401  (before the group: see the docstring)

    env = os.environ
    timeout = timedelta(seconds=timeout_s)
    restart = env.get("TORCHELASTIC_RESTART_COUNT", "0")
    try:
        if env.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and restart != "0":
            store = torch_dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False, timeout=timeout)
            torch_dist.init_process_group(backend, store=torch_dist.PrefixStore(f"mnistdist/restart-{restart}", store),
                                          rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]), timeout=timeout)
        else:
            torch_dist.init_process_group(backend, timeout=timeout)
    except (torch_dist.DistError, RuntimeError, ValueError, KeyError) as e:
        raise StartupFailure(
            f"the process group of {env.get('WORLD_SIZE')} processes did not come up within "
            f"dist.timeout_s={timeout_s:g} (rendezvous {env.get('MASTER_ADDR', '?')}:{env.get('MASTER_PORT', '?')}): "
            f"a process did not start or cannot be reached; {_first_line(e, 300)}") from None


class Dist:
    """The process group of one run, as seen from one rank."""

    def __init__(self, cfg: DistConfig) -> None:
        self.cfg = cfg
        expected = launched_world_size()
        device = resolve_device(cfg, expected)
        self.mixed_precision = resolve_mixed_precision(cfg)
        apply_threads(cfg)
        if expected > 1:  # our own bounded start; accelerate then uses this group
            start_process_group("nccl" if device == "cuda" else "gloo", cfg.timeout_s)
        # cpu=True: without it, on a machine without CUDA, accelerate would make every worker
        # its own rank 0 of "world size 1"; the check below catches that too.
        handler = InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.timeout_s))
        acc = self.accelerator = Accelerator(cpu=device == "cpu", mixed_precision=self.mixed_precision,
                                             kwargs_handlers=[handler])
        if acc.num_processes != expected:
            raise RuntimeError(
                f"the launcher started {expected} processes (WORLD_SIZE) but this one joined a "
                f"group of {acc.num_processes}: on a machine without CUDA launch with "
                "--multi_gpu (or configs/accelerate/cpu.yaml) so the workers join one gloo group")
        self.rank: int = acc.process_index
        self.world_size: int = acc.num_processes
        self.is_main: bool = acc.is_main_process
        self.is_local_main: bool = acc.is_local_main_process
        self.device: torch.device = acc.device

    def describe(self) -> dict[str, Any]:
        """What this run actually runs on, for the run record (world size, processes per host,
        device, backend, the mixed precision accelerate runs, CPU threads). Collective."""
        hosts = self.gather_object(socket.gethostname())
        return {
            "world_size": self.world_size,
            "hosts": {host: hosts.count(host) for host in dict.fromkeys(hosts)},
            "device": self.device.type,
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None,
            "backend": torch_dist.get_backend() if torch_dist.is_initialized() else "none",
            "mixed_precision": str(self.accelerator.mixed_precision),
            "threads_per_process": torch.get_num_threads(),
        }

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
        """Wrap model (DDP, autocast) and optimizer. Data loaders are never passed here: we
        own the sampler, and accelerate would shard an already sharded loader again."""
        return self.accelerator.prepare(model, optimizer)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward pass; under DDP the gradients are averaged over the ranks here (bucketed
        all-reduces overlapping the backward pass): the only per-step sync point of training."""
        self.accelerator.backward(loss)

    @staticmethod
    def raw_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """The torch optimizer inside accelerate's wrapper (for CUDA-graph capture)."""
        return getattr(optimizer, "optimizer", optimizer)

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model inside DDP / compile wrappers."""
        return self.accelerator.unwrap_model(model)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The mixed-precision context of the run."""
        return self.accelerator.autocast()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks; every rank gets the result on the tensor's device."""
        if self.world_size == 1:
            return tensor
        return self.accelerator.reduce(tensor.to(self.device), reduction="sum").to(tensor.device)

    def any_flags(self, flags: list[torch.Tensor | bool]) -> list[bool]:
        """For each flag: is it set on any rank? One all-reduce for all of them; this is the
        agreement that makes every rank stop at the same step."""
        local = torch.stack([torch.as_tensor(f, device=self.device).float().reshape(()) for f in flags])
        return [bool(v) for v in self.all_reduce_sum(local).tolist()]

    def barrier(self) -> None:
        """Wait for every rank."""
        self.accelerator.wait_for_everyone()

    def gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch_dist.all_gather_object(out, obj)
        return out

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the main process only; every rank returns its result, or raises its
        exception. Sync point: a failure decided on rank 0 (a bad checkpoint, a full disk) is
        raised on every rank together, instead of leaving the others waiting in the next
        collective until the timeout; it is marked ``agreed``, as a stop the ranks agreed on."""
        result: Any = None
        error: Exception | None = None
        if self.is_main:
            try:
                result = fn()
            except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
                error = e
        if self.world_size > 1:
            try:
                pickle.dumps(error)
            except Exception:  # noqa: BLE001 - an exception that cannot travel: send its text
                error = RuntimeError(f"{type(error).__name__}: {error}")
            holder = [(result, error)]
            torch_dist.broadcast_object_list(holder, src=0)
            result, error = holder[0]
        if error is not None:
            if self.world_size > 1:  # one decision, raised on every rank: said once (ranks.report_exception)
                with contextlib.suppress(AttributeError):  # an exception type that takes no attributes
                    error.agreed = True  # type: ignore[attr-defined]
            raise error
        return result

    @contextlib.contextmanager
    def diagnose_failures(self, heartbeat_dir: Path, where: Callable[[], str]) -> Iterator[None]:
        """Inside: a failed collective (a peer died, hung or left) is raised as ``RankFailure``
        naming the rank(s) that stopped beating, and ``where()`` it happened."""
        if self.world_size == 1:
            yield
            return
        heartbeat = Heartbeat(heartbeat_dir, self.rank, self.world_size)
        try:
            yield
        except TrainingStopped:
            raise
        except Exception as e:
            if not (isinstance(e, torch_dist.DistError)
                    or isinstance(e, RuntimeError) and any(w in str(e) for w in COLLECTIVE_ERROR_WORDS)):
                raise  # a bug, not a peer that left
            raise RankFailure(f"a collective operation failed {where()} (dist.timeout_s={self.cfg.timeout_s:g}): "
                              f"{heartbeat.culprit(self.cfg.timeout_s)}; {_first_line(e, 200)}") from e
        finally:
            heartbeat.stopped.set()

    def print(self, *args: Any) -> None:
        """Print on the main process only."""
        if self.is_main:
            print(*args, flush=True)

    def seed(self, seed: int) -> None:
        """Same seed on every rank: identical initial weights everywhere."""
        set_seed(seed)

    def close(self) -> None:
        """Tear the process group down (safe to call twice; accelerate destroys it): gloo's
        threads are joined here, while the interpreter is fully alive. Left to interpreter exit
        they can abort a finished rank (SIGABRT; ``start_process_group``, docs/reliability.md)."""
        self.accelerator.end_training()


def software_versions() -> dict[str, str | None]:
    """The versions a run depends on: mnistdist (with its git commit when run from a checkout),
    Python, torch (and the CUDA it was built for), accelerate, numpy."""
    import accelerate
    import numpy

    return {"mnistdist": version_string(), "python": platform.python_version(), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "accelerate": accelerate.__version__, "numpy": numpy.__version__}
