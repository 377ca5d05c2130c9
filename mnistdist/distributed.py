"""Everything that talks to accelerate / torch.distributed lives here.

Every helper also works with a single process (``python train_dist.py``), where reductions
are the identity and barriers return at once (in the spirit of detectron2's ``comm.py``).
"""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
import pickle
from typing import Any, TypeVar

import torch
import torch.distributed as torch_dist
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed

from mnistdist.config import ConfigError, DistConfig, version_string
from mnistdist.signals import RankFailure, TrainingStopped

T = TypeVar("T")


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


def describe_collective_failure(exc: BaseException, heartbeat: Heartbeat, where: str, timeout_s: float) -> str:
    """One line: where it failed and which rank(s) look responsible."""
    silent = heartbeat.silent_ranks(older_than_s=max(3 * heartbeat.interval_s, min(timeout_s / 2, 10.0)))
    if silent:
        who = ", ".join(f"rank {r} (silent for {age:.0f} s)" if age != float("inf") else f"rank {r}"
                        for r, age in sorted(silent.items()))
        culprit = f"{who} stopped responding (hung, stopped or killed)"
    else:
        culprit = "another rank exited or raised (see its own error above)"
    first_line = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    return (f"a collective operation failed {where} (dist.timeout_s={timeout_s:g}): {culprit}; "
            f"{type(exc).__name__}: {first_line}")


def is_collective_failure(exc: BaseException) -> bool:
    """A failed or timed-out collective (a peer died, hung or left), as opposed to a bug."""
    if isinstance(exc, torch_dist.DistError):
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


def check_launch() -> None:
    """Stop with a ConfigError when a launcher started one process although more were asked for.

    ``accelerate launch --num_processes N`` without ``--multi_gpu`` (no accelerate config, or
    ``--cpu``) runs a single process on a machine without GPUs (accelerate issue 2741), which
    would then train alone. Its trace: accelerate's variables and a rendezvous address
    (MASTER_PORT, set because N > 1), but no WORLD_SIZE, which every multi-process launcher sets.
    """
    env = os.environ
    if "ACCELERATE_MIXED_PRECISION" in env and "MASTER_PORT" in env and "WORLD_SIZE" not in env:
        raise ConfigError(
            "accelerate launch started 1 process although more were asked for (without --multi_gpu it "
            "runs one on a machine without GPUs); use: accelerate launch --config_file "
            "configs/accelerate/cpu.yaml --num_processes N train_dist.py (CPU), or --multi_gpu (GPUs)")


def is_main_process() -> bool:
    """Rank 0 (or no launcher): for output after the process group is gone."""
    return os.environ.get("RANK", "0") == "0"


def mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def resolve_device(cfg: DistConfig, world_size: int = 1) -> str:
    """The device type to train on: ``dist.device``, or for ``auto`` the best one here (CUDA,
    then Apple's MPS for a single process, then the CPU). ConfigError when an explicit choice
    cannot work here."""
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
    if mps_available() and world_size == 1:
        return "mps"
    return "cpu"


def resolve_mixed_precision(cfg: DistConfig) -> str:
    """``dist.mixed_precision``, where ``auto`` follows the launcher (``accelerate launch
    --mixed_precision`` sets ACCELERATE_MIXED_PRECISION), else ``no``. An explicit value wins;
    when the launcher asked for something else than its default ``no``, one warning says so."""
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
    """Join the launcher's process group (``env://``); a ``StartupFailure`` naming the rendezvous
    when that does not happen within ``timeout_s`` (every wait in it is bounded by the timeout).

    A new generation of workers after a restart by torchrun's agent can share the agent's store
    (``TORCHELASTIC_USE_AGENT_STORE``; the static rendezvous always does), which still holds the
    previous generation's keys: its workers would dial the dead workers' addresses and hang
    (pytorch/pytorch issue 135712). Such a generation keys its group under its restart count.
    """
    env = os.environ
    timeout = timedelta(seconds=timeout_s)
    restart = env.get("TORCHELASTIC_RESTART_COUNT", "0")
    where = f"{env.get('MASTER_ADDR', '?')}:{env.get('MASTER_PORT', '?')}"
    try:
        if env.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and restart != "0":
            agent_store = torch_dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False,
                                              timeout=timeout)
            torch_dist.init_process_group(backend, store=torch_dist.PrefixStore(f"mnistdist/restart-{restart}", agent_store),
                                          rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]), timeout=timeout)
        else:
            torch_dist.init_process_group(backend, timeout=timeout)
    except (torch_dist.DistError, RuntimeError, ValueError, KeyError) as e:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise StartupFailure(
            f"the process group of {env.get('WORLD_SIZE')} processes did not come up within "
            f"dist.timeout_s={timeout_s:g} (rendezvous {where}): a process did not start or cannot be "
            f"reached; {type(e).__name__}: {first_line}") from None


class Dist:
    """The process group of one run, as seen from one rank."""

    def __init__(self, cfg: DistConfig) -> None:
        self.cfg = cfg
        device = resolve_device(cfg, launched_world_size())
        self.mixed_precision = resolve_mixed_precision(cfg)
        apply_threads(cfg)
        # Without cpu=True on a machine without CUDA, accelerate would make every worker its
        # own rank 0 (each one "world size 1"); the check below catches that too.
        # accelerate picks the backend itself (gloo on CPU, nccl on GPUs); we set the timeout.
        if launched_world_size() > 1:  # accelerate then uses this group
            start_process_group("nccl" if device == "cuda" else "gloo", cfg.timeout_s)
        handler = InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.timeout_s))
        self.accelerator = Accelerator(
            cpu=device == "cpu",
            mixed_precision=self.mixed_precision,
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

    def describe(self) -> dict[str, Any]:
        """What this run actually runs on, for the run record: the world size, the processes per
        host, the device (and the GPU's name), the backend, the mixed precision accelerate runs
        (``no`` or ``bf16``, whatever the config said) and torch's CPU threads per process.
        Collective: gathers every rank's host name."""
        hosts = self.gather_object(socket.gethostname())
        return {
            "world_size": self.world_size,
            "hosts": {host: hosts.count(host) for host in dict.fromkeys(hosts)},
            "device": self.device.type,
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None,
            "backend": self.backend,
            "mixed_precision": str(self.accelerator.mixed_precision),
            "threads_per_process": torch.get_num_threads(),
        }

    # -- model ---------------------------------------------------------------------------
    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
        """Wrap model (DDP, autocast) and optimizer. Data loaders are never passed here: we
        own the sampler, and accelerate would shard an already sharded loader again."""
        return self.accelerator.prepare(model, optimizer)

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

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the main process only; every rank returns its result, or raises its
        exception. Sync point: a failure decided on rank 0 (a bad checkpoint, a full disk) is
        raised on every rank together, instead of leaving the others waiting in the next
        collective until the timeout."""
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
            result, error = self.broadcast_object((result, error))
        if error is not None:
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
            if not is_collective_failure(e):
                raise
            raise RankFailure(describe_collective_failure(e, heartbeat, where(), self.cfg.timeout_s)) from e
        finally:
            heartbeat.stop()

    # -- side effects --------------------------------------------------------------------
    def print(self, *args: Any) -> None:
        """Print on the main process only."""
        if self.is_main:
            print(*args, flush=True)

    def seed(self, seed: int) -> None:
        """Same seed on every rank: identical initial weights everywhere."""
        set_seed(seed)

    def close(self) -> None:
        """Tear the process group down (safe to call twice).

        The prepared model (DDP) and optimizer are released first, while the interpreter is
        fully alive: a DDP model that is only collected at interpreter exit tears gloo's worker
        threads down during finalization, which can abort a finished rank with "terminate called
        without an active exception" (SIGABRT; seen once in ~100 two-process launches of the
        test suite; pytorch/pytorch PR 179291 describes the mechanism)."""
        self.accelerator.end_training()
        self.accelerator.free_memory()  # drops accelerate's references to the model and optimizer
        gc.collect()  # DDP's reducer sits in reference cycles: collect it now, not at exit
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def software_versions() -> dict[str, str | None]:
    """The versions a run depends on: mnistdist (with its git commit when run from a checkout),
    Python, torch (and the CUDA it was built for), accelerate, numpy."""
    import accelerate
    import numpy

    return {"mnistdist": version_string(), "python": platform.python_version(), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "accelerate": accelerate.__version__, "numpy": numpy.__version__}


def warn_main(message: str) -> None:
    """A warning on stderr from the main process only (before or after the group exists)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"warning: {message}", file=sys.stderr, flush=True)


def report_exception(exc: BaseException, label: str = "error") -> None:
    """``label: message`` on stderr, prefixed with the rank when several run.

    An error every rank has alike (a bad config or checkpoint: the ranks read the same ones) is
    said once, by rank 0, without a prefix; a data error by each node's local rank 0 (the data
    is on that node's disk)."""
    from mnistdist.checkpoint import CheckpointError
    from mnistdist.data import DataError

    once = "job" if isinstance(exc, (ConfigError, CheckpointError)) else "node" if isinstance(exc, DataError) else None
    rank, local_rank = os.environ.get("RANK"), os.environ.get("LOCAL_RANK", "0")
    several = rank is not None and launched_world_size() > 1
    if once == "job" and several:
        if rank != "0":
            return
        several = False
    if once == "node" and several and local_rank != "0":
        return
    prefix = f"[rank {rank}] " if several else ""
    print(f"{prefix}{label}: {exc}", file=sys.stderr, flush=True)
