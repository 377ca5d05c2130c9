"""The shared-memory all-reduce on its own: real processes, real /dev/shm, no process group."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from mnistdist import shm

pytestmark = pytest.mark.skipif(shm.unsupported_reason(2, 2, "cpu") is not None,
                                reason=f"shared-memory channel unsupported here: {shm.unsupported_reason(2, 2, 'cpu')}")

SLOT_BYTES = 2**20  # 1 MiB: the 300,001 floats below go through in two pieces, each large
# enough (262,144 elements) for torch to split its copy and additions over threads
SHAPES_AND_DTYPES = [((3,), torch.float32), ((300_001,), torch.float32), ((70, 30), torch.float64),
                     ((10, 10), torch.int64), ((2,), torch.float32)]
CALLS = 40  # several times around the two alternating buffers


def inputs(rank: int, call: int) -> torch.Tensor:
    shape, dtype = SHAPES_AND_DTYPES[call % len(SHAPES_AND_DTYPES)]
    g = torch.Generator().manual_seed(1000 * call + rank)
    if dtype == torch.int64:
        return torch.randint(0, 1000, shape, generator=g)
    x = torch.randn(shape, generator=g, dtype=dtype) * 10 ** (rank - 1)  # different scales: rounding shows
    x.view(-1)[:2] = -0.0  # -0.0 + -0.0 must stay -0.0, as in gloo's a + b
    return x


def expected_sum(world_size: int, call: int) -> torch.Tensor:
    """What gloo's a + b gives for 2 ranks, extended in rank order: ((x0 + x1) + x2) + ..."""
    total = inputs(0, call) + inputs(1, call)
    for r in range(2, world_size):
        total = total + inputs(r, call)
    return total


class SlowReader(shm.ShmChannel):
    """Rank 0 dawdles between seeing every rank's data and adding it up, on some calls: a
    faster rank then runs ahead into its next call. With one buffer instead of two it would
    overwrite its slot while rank 0 still reads it, and rank 0's sum would be wrong."""

    def _wait_for(self, other: int, seq: int) -> None:
        super()._wait_for(other, seq)
        if self.rank == 0 and seq % 3 == 0:
            time.sleep(0.03)


def worker(path: str, token: int, rank: int, world_size: int, job: str, out: mp.Queue, ready) -> None:
    torch.set_num_threads(2)
    cls = SlowReader if job == "sums" else shm.ShmChannel
    channel = cls(Path(path), rank, world_size, SLOT_BYTES, token, timeout_s=30.0 if job == "sums" else 2.0)
    ready.wait()  # workers start seconds apart (importing torch): time only what follows
    try:
        if job == "sums":
            for call in range(CALLS):
                x = inputs(rank, call)
                if rank == world_size - 1 and call % 7 == 0:
                    time.sleep(0.02)  # a late rank: the others must wait for it, not read stale data
                # as a list (exact for these dtypes): a queued tensor would need its sender alive
                out.put((rank, call, channel.all_reduce_sum_(x).tolist()))
        elif job == "exit" and rank == 1:
            os._exit(0)
        elif job == "stop" and rank == 1:
            os.kill(os.getpid(), signal.SIGSTOP)
        else:
            start = time.monotonic()
            try:
                channel.all_reduce_sum_(torch.ones(4))
                out.put((rank, "finished", time.monotonic() - start))
            except shm.ShmPeerError as e:
                out.put((rank, str(e), time.monotonic() - start))
    finally:
        channel.close()


def start(tmp_path: Path, world_size: int, job: str) -> tuple[list[mp.Process], mp.Queue, Path, object]:
    path = shm.new_path()
    token = shm.create_file(path, world_size, SLOT_BYTES)
    ctx = mp.get_context("spawn")
    out, ready = ctx.Queue(), ctx.Barrier(world_size)
    procs = [ctx.Process(target=worker, args=(str(path), token, r, world_size, job, out, ready))
             for r in range(world_size)]
    for p in procs:
        p.start()
    # The file is unlinked by finish(), after every worker mapped it. The caller keeps the
    # barrier alive until then: collecting it would delete its semaphore under the workers.
    return procs, out, path, ready


def finish(procs: list[mp.Process], path: Path) -> None:
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            os.kill(p.pid, signal.SIGKILL)
            p.join()
    path.unlink(missing_ok=True)


@pytest.mark.parametrize("world_size", [2, 3])
def test_every_rank_gets_the_rank_order_sum_bitwise(tmp_path, world_size):
    procs, out, path, _ready = start(tmp_path, world_size, "sums")
    try:
        results = [out.get(timeout=60) for _ in range(world_size * CALLS)]
    finally:
        finish(procs, path)
    assert all(p.exitcode == 0 for p in procs)
    for call in range(CALLS):
        expected = expected_sum(world_size, call)
        got = [torch.tensor(t, dtype=expected.dtype) for r, c, t in results if c == call]
        assert len(got) == world_size
        for t in got:  # bitwise (signs of zeros included): the same bytes on every rank
            assert torch.equal(t.view(-1).view(torch.uint8) if t.is_floating_point() else t,
                               expected.view(-1).view(torch.uint8) if t.is_floating_point() else expected), \
                f"call {call}"


def test_a_peer_that_exited_is_named_at_once(tmp_path):
    procs, out, path, _ready = start(tmp_path, 2, "exit")
    try:
        rank, message, waited = out.get(timeout=30)
    finally:
        finish(procs, path)
    assert rank == 0 and "rank 1" in message and "exited or was killed" in message, message
    assert waited < 2.0  # found by the pid check, long before the 2 s timeout


def test_a_stopped_peer_times_out_with_its_name(tmp_path):
    procs, out, path, _ready = start(tmp_path, 2, "stop")
    try:
        rank, message, waited = out.get(timeout=30)
    finally:
        os.kill(procs[1].pid, signal.SIGKILL)
        finish(procs, path)
    assert rank == 0 and "timed out" in message and "rank 1" in message and "stopped" in message, message
    assert 2.0 <= waited < 5.0


def test_a_foreign_file_is_refused(tmp_path):
    path = shm.new_path()
    token = shm.create_file(path, 2, SLOT_BYTES)
    try:
        with pytest.raises(shm.ShmPeerError, match="token mismatch"):
            shm.ShmChannel(path, 0, 2, SLOT_BYTES, token + 1, timeout_s=1.0)
        with pytest.raises(shm.ShmPeerError, match="bytes, expected"):
            shm.ShmChannel(path, 0, 3, SLOT_BYTES, token, timeout_s=1.0)
    finally:
        path.unlink()


def test_only_single_machine_cpu_jobs_use_it():
    assert shm.unsupported_reason(2, 2, "cpu") is None
    assert "single process" in shm.unsupported_reason(1, 1, "cpu")
    assert "several machines" in shm.unsupported_reason(4, 2, "cpu")
    assert "cuda" in shm.unsupported_reason(2, 2, "cuda")
