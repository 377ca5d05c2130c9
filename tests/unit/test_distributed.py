"""Single-process behaviour of the distributed helpers, and the world-size guard."""

from __future__ import annotations

import pytest
import torch

import mnistdist.distributed as distributed
from mnistdist.config import DistConfig


def test_helpers_degrade_to_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    dist = distributed.Dist(DistConfig(device="cpu"))
    try:
        assert (dist.rank, dist.world_size, dist.is_main) == (0, 1, True)
        t = torch.tensor([1.0, 2.0])
        assert torch.equal(dist.all_reduce_sum(t), t)
        assert dist.any_flags([torch.tensor(True), False]) == [True, False]
        assert dist.broadcast_object({"a": 1}) == {"a": 1} and dist.gather_object(3) == [3]
        dist.barrier()
    finally:
        dist.close()


def test_a_worker_that_joined_the_wrong_group_fails_loudly(monkeypatch):
    """The accelerate trap: a worker that silently became its own rank 0 (world size 1) while
    the launcher started 2 must stop with a message, not train alone."""

    class LonelyAccelerator:
        num_processes = 1

        def __init__(self, **kwargs):
            pass

    monkeypatch.setattr(distributed, "Accelerator", LonelyAccelerator)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match=r"started 2 processes \(WORLD_SIZE\) but this one joined a group of 1"):
        distributed.Dist(DistConfig(device="cpu"))


def test_cuda_requested_without_cuda_is_a_config_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(distributed.ConfigError, match="dist.device: cuda was requested"):
        distributed.resolve_device(DistConfig(device="cuda"))
