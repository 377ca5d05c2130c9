"""Sum tensors across the processes of one machine through shared memory (CPU training).

Why this exists: with gloo, CPU processes on one machine send every gradient all-reduce
through TCP on the loopback device. For this model (0.8 MB of gradients per step) that was
two thirds of a 2-process step on a 2-core machine: 1.9-2.0 s per epoch against 0.6 s of
compute. Through shared memory the same sums take 0.85-0.9 s per epoch, and with 2 processes
give bitwise the same result as gloo (``a + b`` either way; with 3 or more, gloo's ring adds
in another order, so the last bits may differ). Measured side by side: docs/benchmarks.md. torch's gloo has no
shared-memory path in this version (gloo gained one upstream in 2025), so this is a small
one of our own, used only where it is safe (``unsupported_reason``).

This module knows nothing about ranks' process groups: ``mnistdist.distributed`` creates the
channel, shares its path with the other ranks, and plugs it into DDP as a comm hook.

Protocol, for ``world_size`` processes on one machine:

* one file in /dev/shm (or ``$MNISTDIST_SHM_DIR``), created (space reserved) by rank 0, mapped by every rank, and
  unlinked as soon as all have mapped it (or setup failed), so once training runs nothing is
  left behind even after SIGKILL;
* a control block: a random token (proves every rank mapped the same file), then one 64-byte
  line per rank holding (sequence number, pid);
* two data buffers, used by alternate calls, each with one slot per rank.

Call number k: copy my tensor into my slot of buffer k % 2, publish k in my line, wait until
every rank has published k, then add the slots *in rank order* into my tensor
(``((s0 + s1) + s2) + ...``). All ranks add the same bytes in the same order, so every rank
gets bitwise the same result (DDP keeps the replicas identical only because of that, and the
trainer's per-step NaN check relies on it).
Two buffers are enough: a rank publishes k + 1 only after it finished reading call k, so
nobody can overwrite buffer k % 2 (at call k + 2) while a slower rank still reads it.

Memory ordering: a reader that sees sequence number k must also see the data written before
it. x86-64 guarantees this: stores become visible in program order and loads are not
reordered with loads; a copy split over OpenMP threads ends in the parallel region's join
(locked atomics) before this thread stores k, and x86 visibility is transitive. Weaker
machines (ARM) would need fences we cannot issue from Python, so the channel is refused there
and gloo is used.

Liveness: each rank's pid is in the control block, so a waiting rank can tell a dead peer
(reported at once) from a stopped or slow one (reported after ``timeout_s``, counted per
all-reduce). All ranks are started by one launcher on one machine, so they share a pid
namespace.
"""

from __future__ import annotations

import mmap
import os
import platform
import secrets
import time
from pathlib import Path

import torch

SHM_DIR_ENV = "MNISTDIST_SHM_DIR"  # where the channel file goes; default /dev/shm (a tmpfs)
_LINE = 64  # bytes per control line (a cache line: ranks never write the same line)
_WORDS = _LINE // 8
_SPIN_S = 0.005  # busy-wait (yielding the CPU) this long before sleeping between checks
_CHECK_PEERS_EVERY_S = 0.25


class ShmPeerError(RuntimeError):
    """Another rank died, stopped or is too slow: the all-reduce cannot complete."""


def unsupported_reason(world_size: int, local_world_size: int, device_type: str) -> str | None:
    """Why the channel cannot be used for this job (None when it can)."""
    if world_size < 2:
        return "a single process has nothing to reduce"
    if device_type != "cpu":
        return f"training runs on {device_type}, not on CPU processes"
    if local_world_size != world_size:
        return f"the {world_size} processes are spread over several machines"
    if platform.system() != "Linux" or not shm_dir().is_dir():
        return f"{shm_dir()} is not available"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"its memory-ordering argument holds on x86-64 only, not on {platform.machine()}"
    return None


def shm_dir() -> Path:
    """The directory of channel files: ``$MNISTDIST_SHM_DIR``, else /dev/shm. Use a tmpfs
    (memory); a disk-backed directory also works, more slowly."""
    return Path(os.environ.get(SHM_DIR_ENV) or "/dev/shm")


def new_path() -> Path:
    return shm_dir() / f"mnistdist-{os.getpid()}-{secrets.token_hex(8)}"


def _layout(world_size: int, slot_bytes: int) -> tuple[int, int]:
    """(control block bytes, total bytes) of a channel file."""
    control = _LINE * (world_size + 1)
    return control, control + 2 * world_size * slot_bytes


def create_file(path: Path, world_size: int, slot_bytes: int) -> int:
    """Rank 0: create the channel file with its space reserved; return its token.

    The space is reserved up front (``posix_fallocate``) because writing into a mapping of a
    full tmpfs kills the process with SIGBUS instead of raising an error.
    """
    _, size = _layout(world_size, slot_bytes)
    token = secrets.randbits(62) + 1
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
        os.pwrite(fd, token.to_bytes(8, "little", signed=True), 0)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
    return token


class ShmChannel:
    """One rank's end of a channel; ``all_reduce_sum_`` must be called by every rank, in the
    same order, like any collective."""

    def __init__(self, path: Path, rank: int, world_size: int, slot_bytes: int, token: int,
                 timeout_s: float) -> None:
        if slot_bytes <= 0 or slot_bytes % 64:
            raise ValueError(f"slot_bytes must be a positive multiple of 64; got {slot_bytes}")
        if world_size < 2:
            raise ValueError(f"a channel joins at least 2 ranks; got world_size {world_size}")
        self.rank, self.world_size, self.slot_bytes, self.timeout_s = rank, world_size, slot_bytes, timeout_s
        control, size = _layout(world_size, slot_bytes)
        fd = os.open(path, os.O_RDWR)
        try:
            if os.fstat(fd).st_size != size:
                raise ShmPeerError(f"{path}: {os.fstat(fd).st_size} bytes, expected {size}")
            self._mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._ctrl = memoryview(self._mm)[:control].cast("q")
        if self._ctrl[0] != token:
            self.close()
            raise ShmPeerError(f"{path} is not this job's channel (token mismatch): another machine?")
        self._data = torch.frombuffer(self._mm, dtype=torch.uint8, offset=control,
                                      count=2 * world_size * slot_bytes).view(2, world_size, slot_bytes)
        self._seq, self._call_start = 0, 0.0
        self._ctrl[self._line(rank) + 1] = os.getpid()

    @staticmethod
    def _line(rank: int) -> int:
        return _WORDS * (rank + 1)

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Replace ``tensor`` (CPU, contiguous) by its sum over all ranks; return it."""
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            raise ValueError("the shared-memory all-reduce takes contiguous CPU tensors")
        if self._data is None:
            raise ShmPeerError("the shared-memory channel is closed")
        flat = tensor.view(-1)
        per_call = self.slot_bytes // flat.element_size()
        self._call_start = time.monotonic()  # timeout_s counts per all-reduce, not per wait
        for start in range(0, flat.numel(), per_call):  # tensors larger than a slot: in pieces
            self._reduce_piece(flat[start:start + per_call])
        return tensor

    def _reduce_piece(self, piece: torch.Tensor) -> None:
        self._seq += 1
        slots = self._data[self._seq % 2, :, :piece.numel() * piece.element_size()].view(piece.dtype)
        slots[self.rank].copy_(piece)
        self._ctrl[self._line(self.rank)] = self._seq  # publish: the copy above is visible first
        for other in range(self.world_size):
            if other != self.rank:
                self._wait_for(other, self._seq)
        # Rank order, the same on every rank. (Not torch.sum(dim=0): it starts from +0.0, so
        # -0.0 + -0.0 would come out as +0.0, unlike gloo's a + b.)
        torch.add(slots[0], slots[1], out=piece)
        for other in range(2, self.world_size):
            piece.add_(slots[other])

    def _wait_for(self, other: int, seq: int) -> None:
        """Wait until rank ``other`` published ``seq``: spin briefly (its arrival is usually
        a matter of microseconds), then sleep in short steps; check its pid now and then so
        a dead or stopped peer is reported instead of waited for."""
        line, ctrl = self._line(other), self._ctrl
        if ctrl[line] >= seq:
            return
        start = time.monotonic()
        next_check = start + _CHECK_PEERS_EVERY_S
        while ctrl[line] < seq:
            now = time.monotonic()
            if now - start < _SPIN_S:
                os.sched_yield()  # lets a rank that shares this core run
                continue
            time.sleep(min(0.001, (now - start) / 20))
            if now >= next_check:
                next_check = now + _CHECK_PEERS_EVERY_S
                self._check_peer(other, seq, now - self._call_start)

    def _check_peer(self, other: int, seq: int, waited_s: float) -> None:
        pid = self._ctrl[self._line(other) + 1]
        state = _process_state(pid) if pid else "not joined yet"  # it writes its pid on opening
        where = f"all-reduce #{seq} (rank {other} is at #{self._ctrl[self._line(other)]})"
        if state in (None, "Z", "X"):
            raise ShmPeerError(f"rank {other} (pid {pid}) exited or was killed during {where}")
        if waited_s > self.timeout_s:
            how = "is stopped (SIGSTOP)" if state in ("T", "t") else "did not arrive"
            raise ShmPeerError(f"timed out after {waited_s:.0f} s in {where}: rank {other} (pid {pid}) {how}")

    def close(self) -> None:
        """Unmap (safe to call twice). Tensors returned earlier are not views of the mapping."""
        self._data = None
        if self._ctrl is not None:
            self._ctrl.release()
            self._ctrl = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass  # a view still exists somewhere; the mapping goes with the process
            self._mm = None


def _process_state(pid: int) -> str | None:
    """The state letter of ``pid`` (R, S, T, Z, ...) from /proc, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]  # the name in parentheses may contain spaces
