"""Checkpoint files: atomic commit, verification, pruning, restoring, no pickle, the first format."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mnistdist import checkpoint
from mnistdist.checkpoint import CheckpointError, Snapshot
from mnistdist.config import ConfigError
from mnistdist.rundir import RunDir
from tests.conftest import REPO


FORMAT_1 = Path(__file__).parent / "checkpoint-format-1" / "step-00000005"
"""A checkpoint written by the first format's code (with RNG states) from the model of make_snapshot."""


def make_snapshot(step: int) -> Snapshot:
    torch.manual_seed(step)
    model = {"w": torch.randn(4, 3), "b": torch.zeros(4)}
    optimizer = {0: {"momentum_buffer": torch.randn(4, 3)}, 1: {"momentum_buffer": torch.randn(4)}}
    losses = [{"window_sum": 1.5, "window_steps": 3, "epoch_sum": 2.5}, {"window_sum": 0.5, "window_steps": 3, "epoch_sum": 1.5}]
    return Snapshot(step=step, epoch=1, batch_in_epoch=7, world_size=2, global_batch_size=200,
                    model=model, optimizer=optimizer, losses=losses, tracking={"wandb_run_id": "abc"},
                    config={"train": {"lr": 0.1}})


def test_save_load_round_trip(tmp_path):
    snap = make_snapshot(12)
    path = checkpoint.save_checkpoint(tmp_path, snap, keep_last=2)
    assert path == tmp_path / "checkpoints" / "step-00000012"
    back = checkpoint.load_checkpoint(path)
    assert (back.step, back.epoch, back.batch_in_epoch, back.world_size, back.global_batch_size) == (12, 1, 7, 2, 200)
    assert all(torch.equal(back.model[k], snap.model[k]) for k in snap.model)
    assert back.optimizer.keys() == {0, 1}
    assert all(torch.equal(back.optimizer[i]["momentum_buffer"], snap.optimizer[i]["momentum_buffer"]) for i in (0, 1))
    assert back.losses == snap.losses
    assert back.tracking == {"wandb_run_id": "abc"}
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "model.safetensors", "optimizer.safetensors",
                                                      "state.json"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_a_checkpoint_of_the_first_format_still_loads_and_restores(tmp_path):
    """Written by the code before RNG states were dropped: ranks.safetensors (listed in its
    manifest and verified) and the RNG fields of state.json are not read."""
    snap = checkpoint.load_checkpoint(FORMAT_1)
    assert (snap.step, snap.epoch, snap.batch_in_epoch, snap.world_size) == (5, 1, 7, 1)
    assert (snap.best, snap.train_time_s) == (None, 0.0)  # no best model; time counted from here on
    assert snap.losses == [{"window_sum": 1.5, "window_steps": 3, "epoch_sum": 2.5}] and snap.tracking["wandb_run_id"] == "abc"
    model = WB()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.5)
    checkpoint.restore(snap, model, optimizer)
    assert torch.equal(model.w.detach(), make_snapshot(5).model["w"])
    assert torch.equal(optimizer.state[model.b]["momentum_buffer"], snap.optimizer[1]["momentum_buffer"])
    assert optimizer.param_groups[0]["lr"] == 0.3 and optimizer.param_groups[0]["momentum"] == 0.5  # the config's
    copy_of = tmp_path / "step-00000005"
    shutil.copytree(FORMAT_1, copy_of)
    (copy_of / "ranks.safetensors").write_bytes(b"damaged")
    with pytest.raises(CheckpointError, match="ranks.safetensors"):  # still verified
        checkpoint.load_checkpoint(copy_of)


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


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "state.json"])
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
        checkpoint.load_checkpoint(path)


def test_load_latest_skips_damaged_and_says_so(tmp_path):
    checkpoint.save_checkpoint(tmp_path, make_snapshot(10), keep_last=0)
    newest = checkpoint.save_checkpoint(tmp_path, make_snapshot(20), keep_last=0)
    damage(newest, "model.safetensors", "truncate")
    said = []
    assert checkpoint.load_latest(tmp_path, warn=said.append).path.name == "step-00000010"
    assert len(said) == 1 and "skipping damaged checkpoint" in said[0] and "step-00000020" in said[0]


def test_sigkill_during_save_leaves_previous_checkpoint_valid(tmp_path):
    """A real SIGKILL between writing the data files and the manifest (the commit marker)."""
    checkpoint.save_checkpoint(tmp_path, make_snapshot(10), keep_last=1)
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        from mnistdist import checkpoint
        from tests.unit.test_checkpoint import make_snapshot
        real = checkpoint._write
        def write(path, data):
            if path.name == "manifest.json":
                os.kill(os.getpid(), signal.SIGKILL)
            real(path, data)
        checkpoint._write = write
        checkpoint.save_checkpoint({str(tmp_path)!r}, make_snapshot(20), keep_last=1)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO)
    assert result.returncode == -9
    assert list((tmp_path / "checkpoints").glob(".tmp-step-00000020-*"))  # the half-written save
    found = checkpoint.load_latest(tmp_path)
    assert found.path.name == "step-00000010" and found.step == 10
    # The next successful save cleans the leftover up.
    checkpoint.save_checkpoint(tmp_path, make_snapshot(30), keep_last=1)
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def pickle_bomb(marker) -> bytes:
    import pickle

    class Bomb:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    return pickle.dumps({"model": Bomb()})


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "state.json"])
def test_pickle_bomb_with_matching_manifest_is_never_executed(tmp_path, name):
    path = checkpoint.save_checkpoint(tmp_path, make_snapshot(5), keep_last=0)
    marker = tmp_path / "pwned"
    (path / name).write_bytes(pickle_bomb(marker))
    # The attacker also fixes the manifest, so the checksums pass.
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"][name] = {"bytes": (path / name).stat().st_size, "sha256": hashlib.sha256((path / name).read_bytes()).hexdigest()}
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="unreadable checkpoint content"):
        checkpoint.load_checkpoint(path)
    assert not marker.exists()


# --------------------------------------------------------------------------------------
# Issue 13, item 8: every malformed checkpoint is a clean CheckpointError naming the file, and
# auto-resume skips it. The attacker (or the bug) also fixes the manifest, so only the
# content's schema can catch these.


def rewrite(path, name, data: bytes) -> None:
    """Replace ``path/name`` with ``data`` and make the manifest match it."""
    (path / name).write_bytes(data)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256((path / name).read_bytes()).hexdigest()}
    (path / "manifest.json").write_text(json.dumps(manifest))


def edit_state(path, change) -> None:
    state = json.loads((path / "state.json").read_text())
    changed = change(state)  # None: changed in place
    state = state if changed is None else changed
    rewrite(path, "state.json", json.dumps(state).encode())


def _set(keys, value):
    def change(state):
        target = state
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
    return change


def _delete(keys):
    def change(state):
        target = state
        for key in keys[:-1]:
            target = target[key]
        del target[keys[-1]]
    return change


DEEP = b"[" * 100_000 + b"]" * 100_000

BAD_STATES = {
    "no ranks": _delete(["ranks"]),
    "ranks an object": _set(["ranks"], {"0": {}}),
    "fewer ranks than world_size": lambda s: s.update(ranks=s["ranks"][:1]),
    "a rank not an object": _set(["ranks", 1], 3),
    "rank without loss": _delete(["ranks", 0, "loss"]),
    "loss sums missing": _delete(["ranks", 0, "loss", "window_steps"]),
    "loss sum a string": _set(["ranks", 1, "loss", "epoch_sum"], "2.5"),
    "step a string": _set(["step"], "12"),
    "epoch a bool": _set(["epoch"], True),
    "negative batch_in_epoch": _set(["batch_in_epoch"], -1),
    "world_size zero": _set(["world_size"], 0),
    "global_batch_size a float": _set(["global_batch_size"], 200.0),
    "tracking a list": _set(["tracking"], []),
    "wandb run id a number": _set(["tracking", "wandb_run_id"], 7),
    "config a string": _set(["config"], "x"),
    "a list, not an object": lambda s: [],
    "wrong format": _set(["format"], "something-else"),
    "format a list": _set(["format"], ["mnistdist-checkpoint-2"]),
    "step differs from the manifest": _set(["step"], 6),
    "train_time_s negative": _set(["train_time_s"], -1.0),
    "train_time_s a bool": _set(["train_time_s"], True),
}


@pytest.mark.parametrize("case", list(BAD_STATES))
def test_malformed_state_json_is_a_checkpoint_error_naming_it(tmp_path, case):
    path = checkpoint.save_checkpoint(tmp_path, make_snapshot(5), keep_last=0)
    edit_state(path, BAD_STATES[case])
    with pytest.raises(CheckpointError) as info:
        checkpoint.load_checkpoint(path)
    assert str(path / "state.json") in str(info.value)


@pytest.mark.parametrize("data", [DEEP, b"null", b"\xff\xfe\xfa not text", b"[1, 2]"],
                         ids=["deeply nested", "null", "not UTF-8", "a list"])
def test_state_json_that_is_not_a_state_is_a_checkpoint_error(tmp_path, data):
    path = checkpoint.save_checkpoint(tmp_path, make_snapshot(5), keep_last=0)
    rewrite(path, "state.json", data)
    with pytest.raises(CheckpointError) as info:
        checkpoint.load_checkpoint(path)
    assert str(path / "state.json") in str(info.value)


@pytest.mark.parametrize("name", ["momentum_buffer", "7.momentum_buffer", "x.momentum_buffer", "-1.momentum_buffer"])
def test_optimizer_tensor_of_no_parameter_is_a_checkpoint_error_naming_it(tmp_path, name):
    """At load for a name that is not <parameter index>.<key>; at restore, where the number of
    parameters is known, for an index beyond it."""
    from safetensors.torch import save_file

    path = checkpoint.save_checkpoint(tmp_path, make_snapshot(5), keep_last=0)
    save_file({name: torch.zeros(3)}, str(tmp_path / "optimizer"))
    rewrite(path, "optimizer.safetensors", (tmp_path / "optimizer").read_bytes())
    model = WB()
    with pytest.raises(CheckpointError) as info:
        checkpoint.restore(checkpoint.load_checkpoint(path), model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert str(path / "optimizer.safetensors") in str(info.value)


def _manifest(path):
    return json.loads((path / "manifest.json").read_text())


BAD_MANIFESTS = {  # changed in place
    "files a list": lambda m: m.update(files=list(m["files"])),
    "entries not objects": lambda m: m.update(files={name: 3 for name in m["files"]}),
    "entry without sha256": lambda m: m["files"]["model.safetensors"].pop("sha256"),
    "bytes a string": lambda m: m["files"]["model.safetensors"].update(bytes="184"),
    "sha256 a number": lambda m: m["files"]["state.json"].update(sha256=1),
    "no step": lambda m: m.pop("step"),
    "step a string": lambda m: m.update(step="5"),
    "wrong format": lambda m: m.update(format="other"),
    "format an object": lambda m: m.update(format={}),
    "a file not listed": lambda m: m["files"].pop("optimizer.safetensors"),
    "the first format's files, the second's format": lambda m: m["files"].update(
        {"ranks.safetensors": m["files"]["model.safetensors"]}),
}
NOT_MANIFESTS = {"a list": b"[]", "null": b"null", "a string": b'"files"', "deeply nested": DEEP,
                 "not UTF-8": b"\xff\xfe\xfa{}"}


@pytest.mark.parametrize("case", list(BAD_MANIFESTS) + list(NOT_MANIFESTS))
def test_malformed_manifest_is_a_checkpoint_error_naming_it(tmp_path, case):
    path = checkpoint.save_checkpoint(tmp_path, make_snapshot(5), keep_last=0)
    if case in NOT_MANIFESTS:
        data = NOT_MANIFESTS[case]
    else:
        manifest = _manifest(path)
        BAD_MANIFESTS[case](manifest)
        data = json.dumps(manifest).encode()
    (path / "manifest.json").write_bytes(data)
    with pytest.raises(CheckpointError) as info:
        checkpoint.load_checkpoint(path)
    assert str(path / "manifest.json") in str(info.value)


class OneProcess:
    """``Dist`` as seen by rank 0 of ``world_size`` when it is the only process: what
    checkpoint.save and checkpoint.resume use of it."""

    def __init__(self, world_size: int = 2) -> None:
        self.world_size, self.rank, self.is_main = world_size, 0, True

    def on_main(self, fn):
        return fn()

    def gather_object(self, obj):
        return [copy.deepcopy(obj) for _ in range(self.world_size)]  # as all_gather_object: copies


def test_auto_resume_skips_a_newest_checkpoint_that_does_not_load(tmp_path, capsys):
    checkpoint.save_checkpoint(tmp_path, make_snapshot(10), keep_last=0)
    newest = checkpoint.save_checkpoint(tmp_path, make_snapshot(20), keep_last=0)
    edit_state(newest, _delete(["ranks"]))  # manifest and checksums are fine; the content is not
    snap = checkpoint.resume(OneProcess(), tmp_path, "auto", 200)
    assert snap is not None and snap.step == 10 and snap.path.name == "step-00000010"
    out = capsys.readouterr().out
    assert "skipping damaged checkpoint" in out and str(newest / "state.json") in out


def test_auto_resume_with_only_malformed_checkpoints_is_an_error_naming_them(tmp_path, capsys):
    """Never a silent start from step 0 that would replace them."""
    older = checkpoint.save_checkpoint(tmp_path, make_snapshot(10), keep_last=0)
    newer = checkpoint.save_checkpoint(tmp_path, make_snapshot(20), keep_last=0)
    (older / "manifest.json").write_bytes(DEEP)
    damage(newer, "model.safetensors", "flip")
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    with pytest.raises(CheckpointError) as refused:
        checkpoint.resume(OneProcess(), tmp_path, "auto", 200)
    message = str(refused.value)
    assert "\n" not in message and "none of its 2 checkpoint(s) loads" in message and "--resume never" in message
    assert "step-00000020/model.safetensors: checksum mismatch" in message and "step-00000010/manifest.json" in message
    assert capsys.readouterr().out == ""  # no warning per checkpoint: the error names them
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before


def test_resume_never_keeps_checkpoints_none_of_which_loads_aside(tmp_path, capsys):
    path = checkpoint.save_checkpoint(tmp_path, make_snapshot(10), keep_last=0)
    damage(path, "state.json", "truncate")
    assert checkpoint.resume(OneProcess(), tmp_path, "never", 200) is None
    assert not (tmp_path / "checkpoints").exists()
    assert (tmp_path / "checkpoints.old-1" / "step-00000010" / "state.json").is_file()
    assert "checkpoints.old-1" in capsys.readouterr().err
    checkpoint.save_checkpoint(tmp_path, make_snapshot(10), keep_last=0)
    with pytest.raises(ConfigError, match="already holds checkpoints"):  # one loads: still refused
        checkpoint.resume(OneProcess(), tmp_path, "never", 200)


def test_resume_of_a_named_malformed_checkpoint_is_a_checkpoint_error(tmp_path):
    path = checkpoint.save_checkpoint(tmp_path, make_snapshot(10), keep_last=0)
    edit_state(path, _set(["ranks", 0], None))
    with pytest.raises(CheckpointError, match="state.json"):
        checkpoint.resume(OneProcess(), tmp_path, str(path), 200)


def test_save_and_resume_through_a_dist_round_trip(tmp_path):
    from mnistdist.config import load_config

    dist = OneProcess()
    cfg = load_config(None, ["checkpoint.keep_last=2", "train.global_batch_size=200"])
    model = WB()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    (model.w.sum() + 2 * model.b.sum()).backward()
    optimizer.step()  # momentum buffers
    loss = {"window_sum": 1.5, "window_steps": 3, "epoch_sum": 2.5}
    path = checkpoint.save(dist, RunDir(tmp_path), cfg, model, optimizer,
                           {"step": 10, "epoch": 1, "batch_in_epoch": 4, "loss": loss, "train_time_s": 12.5},
                           {"wandb_run_id": None})
    back = checkpoint.resume(dist, tmp_path, "auto", 200)
    assert back.path == path and back.step == 10 and back.losses == [loss, loss]
    assert back.train_state(0, 1) == {"step": 10, "epoch": 1, "batch_in_epoch": 4,
                                      "loss": {"window_sum": 1.5, "window_steps": 3, "epoch_sum": 2.5},
                                      "best": None, "train_time_s": 12.5}
    assert back.train_state(1, 2)["loss"] == loss  # its own sums on the world size that saved them
    fresh = WB()
    fresh_optimizer = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    checkpoint.restore(back, fresh, fresh_optimizer)
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q) and torch.equal(optimizer.state[p]["momentum_buffer"], fresh_optimizer.state[q]["momentum_buffer"])


# --------------------------------------------------------------------------------------
# Item 9: a manifest names only files inside its checkpoint.


@pytest.mark.parametrize("name", ["../../secret", "ABSOLUTE", "sub/model.safetensors", "extra.bin",
                                  ".", "..", "", "manifest.json"])
def test_manifest_naming_anything_but_a_checkpoint_file_is_refused(tmp_path, name):
    path = checkpoint.save_checkpoint(tmp_path, make_snapshot(5), keep_last=0)
    secret = tmp_path / "secret"
    secret.write_bytes(b"not yours")
    (path / "sub").mkdir()
    (path / "sub" / "model.safetensors").write_bytes(b"not yours")
    (path / "extra.bin").write_bytes(b"not yours")
    if name == "ABSOLUTE":
        name = str(secret)
    manifest = _manifest(path)
    manifest["files"][name] = {"bytes": 9, "sha256": hashlib.sha256(secret.read_bytes()).hexdigest()}
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError) as info:
        checkpoint.load_checkpoint(path)
    assert str(path / "manifest.json") in str(info.value)


def test_a_checkpoint_file_that_is_a_symlink_out_of_the_checkpoint_is_refused(tmp_path):
    path = checkpoint.save_checkpoint(tmp_path, make_snapshot(5), keep_last=0)
    outside = tmp_path / "elsewhere.safetensors"
    (path / "model.safetensors").rename(outside)
    (path / "model.safetensors").symlink_to(outside)  # same bytes, so the checksum matches
    with pytest.raises(CheckpointError) as info:
        checkpoint.load_checkpoint(path)
    assert str(path / "model.safetensors") in str(info.value)


# --------------------------------------------------------------------------------------
# Item 10: durable writes, and a step never missing while it is replaced.


@pytest.fixture
def fsynced(monkeypatch):
    """The paths passed to os.fsync, in order (read from /proc/self/fd)."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to name fsynced descriptors")
    seen: list[str] = []
    real = os.fsync

    def fsync(fd):
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return seen


def test_checkpoint_files_and_directories_are_fsynced(tmp_path, fsynced):
    run = tmp_path / "run"
    run.mkdir()
    path = checkpoint.save_checkpoint(run, make_snapshot(5), keep_last=0)
    root = os.path.realpath(path.parent)
    names = [os.path.basename(p) for p in fsynced]
    for name in ("model.safetensors", "optimizer.safetensors", "state.json", "manifest.json"):
        assert name in names
    tmp_dir = next(i for i, p in enumerate(fsynced) if os.path.basename(p).startswith(".tmp-step-00000005"))
    assert root in fsynced[tmp_dir:]  # the rename into checkpoints/ is made durable
    assert os.path.realpath(run) in fsynced  # and so is the new checkpoints/ entry of the run dir


def test_save_weights_fsyncs_the_file_and_its_directory(tmp_path, fsynced):
    model = torch.nn.Linear(2, 2)
    checkpoint.save_weights(model.state_dict(), tmp_path / "model.safetensors")
    assert fsynced[-1] == os.path.realpath(tmp_path)
    assert any(p.endswith("model.safetensors.tmp") for p in fsynced)


def test_write_text_atomic_fsyncs_the_file_and_its_directory(tmp_path, fsynced):
    from mnistdist import rundir

    rundir.write_text_atomic(tmp_path / "summary.json", "{}\n")
    assert (tmp_path / "summary.json").read_text() == "{}\n"
    assert fsynced[-1] == os.path.realpath(tmp_path)
    assert any(".summary.json.tmp-" in p for p in fsynced[:-1])


def test_sigkill_while_replacing_a_step_leaves_a_copy_of_that_step(tmp_path):
    """A real SIGKILL after the existing directory of the step was moved aside, before the new
    one is in place: one copy of the step must still be found and load."""
    checkpoint.save_checkpoint(tmp_path, make_snapshot(10), keep_last=0)
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        from mnistdist import checkpoint
        from tests.unit.test_checkpoint import make_snapshot
        real, calls = os.rename, []
        def rename(src, dst):
            calls.append(src)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            real(src, dst)
        os.rename = rename
        checkpoint.save_checkpoint({str(tmp_path)!r}, make_snapshot(10), keep_last=0)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO)
    assert result.returncode == -9
    listed = checkpoint.list_checkpoints(tmp_path)
    assert len(listed) == 1
    assert checkpoint.load_checkpoint(listed[0]).step == 10
    assert checkpoint.load_latest(tmp_path).path == listed[0]
    # The next save puts the copy back under its own name and removes the leftovers.
    checkpoint.save_checkpoint(tmp_path, make_snapshot(20), keep_last=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-00000020", "step-00000010"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    assert checkpoint.load_checkpoint(tmp_path / "checkpoints" / "step-00000010").step == 10


def test_a_checkpoint_of_another_model_is_a_checkpoint_error_at_restore(tmp_path):
    path = checkpoint.save_checkpoint(tmp_path, make_snapshot(5), keep_last=0)
    snap = checkpoint.load_checkpoint(path)  # keys w and b; this model has weight and bias
    model = torch.nn.Linear(3, 4)
    with pytest.raises(CheckpointError) as info:
        checkpoint.restore(snap, model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert str(path / "model.safetensors") in str(info.value)


def test_non_finite_weights_are_a_checkpoint_error_naming_the_file(tmp_path):
    from safetensors.torch import save_file

    path = checkpoint.save_checkpoint(tmp_path, make_snapshot(5), keep_last=0)
    save_file({"w": torch.full((4, 3), float("nan")), "b": torch.zeros(4)}, str(tmp_path / "model"))
    rewrite(path, "model.safetensors", (tmp_path / "model").read_bytes())
    with pytest.raises(CheckpointError) as info:
        checkpoint.load_checkpoint(path)
    assert str(path / "model.safetensors") in str(info.value)


class WB(torch.nn.Module):
    """The model of make_snapshot: parameters w (4x3) and b (4)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(4, 3))
        self.b = torch.nn.Parameter(torch.zeros(4))


def test_restore_into_the_model_it_was_saved_from(tmp_path):
    """Weights and momentum come from the checkpoint, the hyper-parameters stay the optimizer's
    (the config's): nothing needs setting again after a resume."""
    path = checkpoint.save_checkpoint(tmp_path, make_snapshot(5), keep_last=0)
    model = WB().double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.8, nesterov=True, weight_decay=1e-3)
    groups = copy.deepcopy(optimizer.param_groups[0])
    checkpoint.restore(checkpoint.load_checkpoint(path), model, optimizer)
    assert torch.equal(model.w.detach(), make_snapshot(5).model["w"].double())
    buffer = optimizer.state[model.w]["momentum_buffer"]
    assert buffer.dtype == torch.float64 and torch.equal(buffer, make_snapshot(5).optimizer[0]["momentum_buffer"].double())
    assert {k: v for k, v in optimizer.param_groups[0].items() if k != "params"} == \
        {k: v for k, v in groups.items() if k != "params"}


def test_optimizer_state_of_another_shape_is_a_checkpoint_error_at_restore(tmp_path):
    from safetensors.torch import save_file

    path = checkpoint.save_checkpoint(tmp_path, make_snapshot(5), keep_last=0)
    save_file({"0.momentum_buffer": torch.zeros(2)}, str(tmp_path / "optimizer"))
    rewrite(path, "optimizer.safetensors", (tmp_path / "optimizer").read_bytes())
    model = WB()
    with pytest.raises(CheckpointError) as info:
        checkpoint.restore(checkpoint.load_checkpoint(path), model,
                           torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    assert str(path / "optimizer.safetensors") in str(info.value)


# --------------------------------------------------------------------------------------
# Permissions: weights follow the umask, as every other file of a run does.


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_checkpoint_and_model_files_follow_the_umask(tmp_path, umask):
    before = os.umask(umask)
    try:
        path = checkpoint.save_checkpoint(tmp_path, make_snapshot(5), keep_last=0)
        checkpoint.save_weights(torch.nn.Linear(2, 2).state_dict(), tmp_path / "model.safetensors")
    finally:
        os.umask(before)
    for file in (*path.iterdir(), tmp_path / "model.safetensors"):
        assert file.stat().st_mode & 0o777 == 0o666 & ~umask, file
    assert path.stat().st_mode & 0o777 == 0o777 & ~umask
    assert checkpoint.load_checkpoint(path).step == 5 and not list(tmp_path.glob("*.tmp*"))
# The best model (data.validation_size > 0): its validation result in state.json, its weights
# in best.safetensors, so a resumed run keeps the right best in any run directory.

BEST = {"step": 8, "epoch": 1, "val_acc": 0.75, "val_loss": 0.5, "val_correct": 3, "val_total": 4}


def with_best(snap: Snapshot) -> Snapshot:
    snap.best = dict(BEST)
    snap.best_model = {"w": torch.full((4, 3), 7.0), "b": torch.ones(4)}
    return snap


def test_the_best_model_round_trips_through_a_checkpoint(tmp_path):
    path = checkpoint.save_checkpoint(tmp_path, with_best(make_snapshot(12)), keep_last=0)
    assert (path / "best.safetensors").is_file()
    back = checkpoint.load_checkpoint(path)
    assert back.best == BEST and back.train_state(0, 2)["best"] == BEST
    assert back.best_model.keys() == {"w", "b"} and torch.equal(back.best_model["w"], torch.full((4, 3), 7.0))
    checkpoint.restore(back, WB(), torch.optim.SGD(WB().parameters(), lr=0.1))  # it fits the model

    plain = checkpoint.load_checkpoint(checkpoint.save_checkpoint(tmp_path, make_snapshot(13), keep_last=0))
    assert plain.best is None and plain.best_model is None
    assert not (plain.path / "best.safetensors").exists()


def test_save_through_dist_carries_the_best_of_the_train_state(tmp_path):
    from mnistdist.config import load_config

    model = WB()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = {"step": 10, "epoch": 1, "batch_in_epoch": 4, "best": dict(BEST),
             "loss": {"window_sum": 1.5, "window_steps": 3, "epoch_sum": 2.5}}
    cfg = load_config(None, ["train.global_batch_size=200"])
    checkpoint.save(OneProcess(), RunDir(tmp_path), cfg, model, optimizer, state, {"wandb_run_id": None},
                    best_model={"w": torch.ones(4, 3), "b": torch.ones(4)})
    back = checkpoint.resume(OneProcess(), tmp_path, "auto", 200)
    assert back.best == BEST and torch.equal(back.best_model["b"], torch.ones(4))


def test_a_checkpoint_of_the_second_format_still_loads_without_a_best(tmp_path):
    path = checkpoint.save_checkpoint(tmp_path, make_snapshot(5), keep_last=0)
    edit_state(path, lambda state: {**{k: v for k, v in state.items() if k != "best"},
                                    "format": "mnistdist-checkpoint-2"})
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "format": "mnistdist-checkpoint-2"}))
    back = checkpoint.load_checkpoint(path)
    assert back.step == 5 and back.best is None and back.best_model is None


@pytest.mark.parametrize("with_weights,change", [
    (True, _set(["best"], None)),  # best.safetensors listed, but no best
    (True, _set(["best", "val_acc"], "high")),
    (True, _delete(["best", "step"])),
    (False, _set(["best"], dict(BEST))),  # a best without its weights
], ids=["null with weights", "val_acc a string", "no step", "without weights"])
def test_a_malformed_best_is_a_checkpoint_error(tmp_path, with_weights, change):
    snap = make_snapshot(5)
    path = checkpoint.save_checkpoint(tmp_path, with_best(snap) if with_weights else snap, keep_last=0)
    edit_state(path, change)
    with pytest.raises(CheckpointError, match=r"state.json: unreadable checkpoint content \(best"):
        checkpoint.load_checkpoint(path)


def test_best_weights_of_another_model_are_refused_at_restore(tmp_path):
    snap = with_best(make_snapshot(5))
    snap.best_model = {"w": torch.zeros(2, 2), "b": torch.ones(4)}
    path = checkpoint.save_checkpoint(tmp_path, snap, keep_last=0)
    model = WB()
    with pytest.raises(CheckpointError) as info:
        checkpoint.restore(checkpoint.load_checkpoint(path), model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert str(path / "best.safetensors") in str(info.value)


def test_save_weights_writes_the_header_metadata(tmp_path):
    from safetensors import safe_open

    checkpoint.save_weights({"w": torch.ones(2)}, tmp_path / "best.safetensors", {"step": "8", "epoch": "1"})
    with safe_open(str(tmp_path / "best.safetensors"), "pt") as f:
        assert f.metadata() == {"step": "8", "epoch": "1"}
    assert torch.equal(checkpoint.load_model_state(tmp_path / "best.safetensors")["w"], torch.ones(2))


def test_tensors_safetensors_refuses_are_a_one_line_error_naming_the_file(tmp_path):
    """Say, weights that share memory (tied layers): refused in one line, before anything is written."""
    tied = torch.zeros(4, 3)
    snap = make_snapshot(5)
    snap.model = {"w": tied, "also_w": tied}
    with pytest.raises(CheckpointError) as refused:
        checkpoint.save_checkpoint(tmp_path, snap, keep_last=0)
    message = str(refused.value)
    assert "\n" not in message and "share memory" in message
    assert message.startswith(f"cannot write {tmp_path / 'checkpoints' / 'step-00000005' / 'model.safetensors'}: ")
    assert not (tmp_path / "checkpoints").exists()
    with pytest.raises(CheckpointError, match=r"cannot write .*best.safetensors: Some tensors share memory"):
        checkpoint.save_weights(snap.model, tmp_path / "best.safetensors")
    assert not list(tmp_path.iterdir())
