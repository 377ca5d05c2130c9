"""Single-process behaviour of the distributed helpers, and the world-size guard."""

from __future__ import annotations

import pytest
import torch

import mnistdist.distributed as distributed
from mnistdist import ranks
from mnistdist.config import DistConfig


def test_helpers_degrade_to_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    dist = distributed.Dist(DistConfig(device="cpu"))
    try:
        assert (dist.rank, dist.world_size, dist.is_main) == (0, 1, True)
        t = torch.tensor([1.0, 2.0])
        assert torch.equal(dist.all_reduce_sum(t), t)
        assert dist.any_flags([torch.tensor(True), False]) == [True, False]
        assert dist.on_main(lambda: {"a": 1}) == {"a": 1} and dist.gather_object(3) == [3]
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
    monkeypatch.setattr(distributed, "start_process_group", lambda backend, timeout_s: None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match=r"started 2 processes \(WORLD_SIZE\) but this one joined a group of 1"):
        distributed.Dist(DistConfig(device="cpu"))


def test_cuda_requested_without_cuda_is_a_config_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(distributed.ConfigError, match="dist.device: cuda was requested"):
        distributed.resolve_device(DistConfig(device="cuda"))


@pytest.mark.parametrize(
    "cuda,mps,world_size,expected",
    [(True, True, 1, "cuda"), (True, False, 4, "cuda"), (False, True, 1, "mps"),
     (False, True, 2, "cpu"),  # no multi-process MPS backend: CPU processes (gloo)
     (False, False, 1, "cpu")],
)
def test_auto_picks_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, world_size, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(distributed, "mps_available", lambda: mps)
    assert distributed.resolve_device(DistConfig(device="auto"), world_size) == expected


def test_explicit_devices_that_cannot_work_are_config_errors(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(distributed, "mps_available", lambda: False)
    with pytest.raises(distributed.ConfigError, match="dist.device: mps was requested"):
        distributed.resolve_device(DistConfig(device="mps"))
    monkeypatch.setattr(distributed, "mps_available", lambda: True)
    assert distributed.resolve_device(DistConfig(device="mps")) == "mps"
    with pytest.raises(distributed.ConfigError, match="mps runs one process only"):
        distributed.resolve_device(DistConfig(device="mps"), world_size=2)
    assert distributed.resolve_device(DistConfig(device="cpu"), world_size=8) == "cpu"


@pytest.mark.parametrize(
    "config,launcher,expected,warns",
    [("auto", None, "no", False), ("auto", "no", "no", False), ("auto", "bf16", "bf16", False),
     ("auto", "fp16", "no", True),  # not supported: said once, full precision
     ("no", "bf16", "no", True), ("bf16", "no", "bf16", False),  # "no" is accelerate's default: no warning
     ("bf16", "bf16", "bf16", False), ("bf16", None, "bf16", False)],
)
def test_mixed_precision_follows_the_launcher_unless_set(monkeypatch, capsys, config, launcher, expected, warns):
    monkeypatch.delenv("RANK", raising=False)
    if launcher is None:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    else:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)
    assert distributed.resolve_mixed_precision(DistConfig(mixed_precision=config)) == expected
    err = capsys.readouterr().err
    assert err.count("warning:") == (1 if warns else 0), err


def test_threads_follow_the_launcher_unless_set(monkeypatch, capsys):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    distributed.apply_threads(DistConfig(threads_per_process=0))
    assert calls == [] and capsys.readouterr().err == ""
    distributed.apply_threads(DistConfig(threads_per_process=2))
    assert calls == [2]
    assert "dist.threads_per_process=2 wins over the launcher's OMP_NUM_THREADS=1" in capsys.readouterr().err


def test_a_launch_that_started_fewer_processes_than_asked_is_refused(monkeypatch):
    for name in ("WORLD_SIZE", "MASTER_PORT", "ACCELERATE_MIXED_PRECISION"):
        monkeypatch.delenv(name, raising=False)
    ranks.check_launch()  # python train_dist.py
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    ranks.check_launch()  # accelerate launch train_dist.py: one process asked, one started
    monkeypatch.setenv("MASTER_PORT", "29500")  # accelerate launch --num_processes 2 (no --multi_gpu)
    with pytest.raises(distributed.ConfigError, match="accelerate launch started 1 process although more"):
        ranks.check_launch()
    monkeypatch.setenv("WORLD_SIZE", "2")  # a real multi-process launch
    ranks.check_launch()
