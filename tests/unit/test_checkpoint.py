"""Checkpoint files: atomic commit, verification, pruning, RNG round trip, no pickle."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from mnistdist import checkpoint
from mnistdist.checkpoint import CheckpointError, Snapshot
from tests.conftest import REPO


def make_snapshot(step: int) -> Snapshot:
    torch.manual_seed(step)
    model = {"w": torch.randn(4, 3), "b": torch.zeros(4)}
    optimizer = {"state": {0: {"momentum_buffer": torch.randn(4, 3)}, 1: {"momentum_buffer": None}},
                 "param_groups": [{"lr": 0.1, "momentum": 0.9, "params": [0, 1]}]}
    ranks = [{"rng": checkpoint.rng_state(), "loss": {"window_sum": 1.5, "window_steps": 3, "epoch_sum": 2.5}}
             for _ in range(2)]
    return Snapshot(step=step, epoch=1, batch_in_epoch=7, world_size=2, global_batch_size=200,
                    model=model, optimizer=optimizer, ranks=ranks, tracking={"wandb_run_id": "abc"},
                    config={"train": {"lr": 0.1}})


def test_save_load_round_trip(tmp_path):
    snap = make_snapshot(12)
    path = checkpoint.save_checkpoint(tmp_path, snap, keep_last=2)
    assert path == tmp_path / "checkpoints" / "step-00000012"
    back = checkpoint.load_checkpoint(path)
    assert (back.step, back.epoch, back.batch_in_epoch, back.world_size, back.global_batch_size) == (12, 1, 7, 2, 200)
    assert all(torch.equal(back.model[k], snap.model[k]) for k in snap.model)
    assert torch.equal(back.optimizer["state"][0]["momentum_buffer"], snap.optimizer["state"][0]["momentum_buffer"])
    assert back.optimizer["state"][1]["momentum_buffer"] is None
    assert back.optimizer["param_groups"] == snap.optimizer["param_groups"]
    assert back.ranks[1]["loss"] == snap.ranks[1]["loss"]
    assert back.tracking == {"wandb_run_id": "abc"}
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_rng_state_round_trip(tmp_path):
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    path = checkpoint.save_checkpoint(tmp_path, _with_current_rng(1), 0)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    checkpoint.set_rng_state(checkpoint.load_checkpoint(path).ranks[0]["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1] and np.random.rand() == expected[2]


def _with_current_rng(step: int) -> Snapshot:
    state = checkpoint.rng_state()
    snap = make_snapshot(step)
    snap.ranks[0]["rng"] = state
    checkpoint.set_rng_state(state)
    return snap


def test_prune_keeps_newest_only_after_new_is_complete(tmp_path):
    for step in (10, 20, 30, 40):
        checkpoint.save_checkpoint(tmp_path, make_snapshot(step), keep_last=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-00000040", "step-00000030"]


def damage(path, name, how):
    file = path / name
    data = bytearray(file.read_bytes())
    if how == "truncate":
        file.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "flip":
        data[len(data) // 2] ^= 0xFF
        file.write_bytes(bytes(data))
    elif how == "delete":
        file.unlink()


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "ranks.safetensors", "state.json"])
@pytest.mark.parametrize("how", ["truncate", "flip", "delete"])
def test_damage_is_detected_and_names_the_file(tmp_path, name, how):
    path = checkpoint.save_checkpoint(tmp_path, make_snapshot(5), keep_last=0)
    damage(path, name, how)
    with pytest.raises(CheckpointError) as info:
        checkpoint.load_checkpoint(path)
    assert str(path / name) in str(info.value)


def test_missing_manifest_means_not_a_checkpoint(tmp_path):
    path = checkpoint.save_checkpoint(tmp_path, make_snapshot(5), keep_last=0)
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="manifest.json: missing"):
        checkpoint.verify(path)


def test_find_latest_valid_skips_damaged_and_says_so(tmp_path):
    checkpoint.save_checkpoint(tmp_path, make_snapshot(10), keep_last=0)
    newest = checkpoint.save_checkpoint(tmp_path, make_snapshot(20), keep_last=0)
    damage(newest, "model.safetensors", "truncate")
    said = []
    assert checkpoint.find_latest_valid(tmp_path, warn=said.append).name == "step-00000010"
    assert len(said) == 1 and "skipping damaged checkpoint" in said[0] and "step-00000020" in said[0]


def test_sigkill_during_save_leaves_previous_checkpoint_valid(tmp_path):
    """A real SIGKILL between writing the data files and the manifest (the commit marker)."""
    checkpoint.save_checkpoint(tmp_path, make_snapshot(10), keep_last=1)
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        from mnistdist import checkpoint
        from tests.unit.test_checkpoint import make_snapshot
        real = checkpoint._write_json
        def write_json(path, data):
            if path.name == "manifest.json":
                os.kill(os.getpid(), signal.SIGKILL)
            real(path, data)
        checkpoint._write_json = write_json
        checkpoint.save_checkpoint({str(tmp_path)!r}, make_snapshot(20), keep_last=1)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO)
    assert result.returncode == -9
    assert list((tmp_path / "checkpoints").glob(".tmp-step-00000020-*"))  # the half-written save
    found = checkpoint.find_latest_valid(tmp_path)
    assert found.name == "step-00000010"
    assert checkpoint.load_checkpoint(found).step == 10
    # The next successful save cleans the leftover up.
    checkpoint.save_checkpoint(tmp_path, make_snapshot(30), keep_last=1)
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def pickle_bomb(marker) -> bytes:
    import pickle

    class Bomb:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    return pickle.dumps({"model": Bomb()})


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "ranks.safetensors", "state.json"])
def test_pickle_bomb_with_matching_manifest_is_never_executed(tmp_path, name):
    path = checkpoint.save_checkpoint(tmp_path, make_snapshot(5), keep_last=0)
    marker = tmp_path / "pwned"
    (path / name).write_bytes(pickle_bomb(marker))
    # The attacker also fixes the manifest, so the checksums pass.
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"][name] = {"bytes": (path / name).stat().st_size, "sha256": checkpoint._sha256(path / name)}
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="unreadable checkpoint content"):
        checkpoint.load_checkpoint(path)
    assert not marker.exists()
