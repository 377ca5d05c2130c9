"""Checkpoints: atomic, verified, and free of pickle.

Layout of one checkpoint, ``RUN_DIR/checkpoints/step-00000600/``:

    model.safetensors       the model's state dict (also loadable by ``mnistdist evaluate``)
    optimizer.safetensors   the optimizer's tensors (SGD momentum buffers)
    ranks.safetensors       each rank's torch RNG states
    state.json              step, epoch, position in the epoch, world size, global batch,
                            optimizer hyper-parameters, per-rank Python/NumPy RNG and loss sums,
                            the W&B run id, the config
    manifest.json           size and sha256 of every file above: written last

Commit protocol: everything is written into ``checkpoints/.tmp-step-...``, fsynced, the manifest
last, then the directory is renamed into place and ``checkpoints/`` is fsynced. A directory
without a manifest whose checksums match is never loaded, so a save killed half-way leaves the
previous checkpoint as the newest valid one. Older checkpoints are pruned only after the new one
is in place. Replacing a directory of the same step never leaves the step without a copy (see
``save_checkpoint``).

Loading trusts nothing: the manifest names only the files above, and every field of
``state.json`` and every tensor name of the safetensors files is checked for its type and
range before use. Whatever is wrong is a ``CheckpointError`` naming the file, and auto-resume
skips such a checkpoint as it skips a damaged one.

Nothing here unpickles: tensors go through safetensors, everything else through JSON.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mnistdist.config import ConfigError
from mnistdist.rundir import CHECKPOINTS, fsync_dir

if TYPE_CHECKING:
    from mnistdist.distributed import Dist

MANIFEST = "manifest.json"
FORMAT = "mnistdist-checkpoint-1"
FILES = ("model.safetensors", "optimizer.safetensors", "ranks.safetensors", "state.json")
"""The files a checkpoint has besides its manifest; the manifest lists exactly these."""
_PREFIX = "step-"
_TRASH = ".trash-"
_LOSS_KEYS = ("window_sum", "window_steps", "epoch_sum")
"""What ``metrics.LossMeter.state_dict()`` saves per rank, and ``load_state_dict`` reads."""
_SHA256 = re.compile(r"[0-9a-f]{64}")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the directory and the file."""


@dataclass
class Snapshot:
    """Everything needed to continue a run exactly where it stopped."""

    step: int
    """Optimizer steps done since the start of the run."""
    epoch: int
    """The epoch in progress (0-based)."""
    batch_in_epoch: int
    """Batches of ``epoch`` already trained; resume continues with the next one."""
    world_size: int
    global_batch_size: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    """``optimizer.state_dict()``."""
    ranks: list[dict[str, Any]]
    """Per rank: ``{"rng": rng_state(), "loss": {...}}``, in rank order."""
    tracking: dict[str, Any] = field(default_factory=dict)
    """E.g. the W&B run id, so a resumed job continues the same W&B run."""
    config: dict[str, Any] = field(default_factory=dict)
    """The resolved config of the run that wrote it."""
    path: Path | None = None
    """The directory it was read from (None before it is saved)."""


# --------------------------------------------------------------------------------------
# RNG state of one process (pure torch/random/numpy; no files)


def rng_state() -> dict[str, Any]:
    return {
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch_cpu"])
    if state.get("torch_cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def _rng_to_json(state: dict[str, Any]) -> dict[str, Any]:
    version, internal, gauss = state["python"]
    kind, keys, pos, has_gauss, cached = state["numpy"]
    return {"python": [version, list(internal), gauss],
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def _rng_from_json(data: dict[str, Any]) -> dict[str, Any]:
    version, internal, gauss = data["python"]
    kind, keys, pos, has_gauss, cached = data["numpy"]
    return {"python": (version, tuple(internal), gauss),
            "numpy": (kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached)}


# --------------------------------------------------------------------------------------
# Saving


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"{_PREFIX}{step:08d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
    except SafetensorError as e:  # its I/O errors (disk full...) are not OSErrors
        raise OSError(f"{path}: {e}") from e
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _split_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``optimizer.state_dict()`` -> (tensors for safetensors, the JSON-able rest)."""
    tensors, scalars = {}, {}
    for index, per_param in state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    # A CUDA-graph step keeps lr as a device tensor; store the number.
    groups = [{k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _param_index(name: Any) -> int | None:
    """``"3.momentum_buffer"`` -> 3; None for a name that is not ``<index>.<key>``."""
    if not isinstance(name, str):
        return None
    index, dot, key = name.partition(".")
    return int(index) if dot and key and index.isascii() and index.isdigit() else None


def _join_optimizer(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in [*tensors.items(), *rest["scalars"].items()]:
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def save_checkpoint(run_dir: Path, snap: Snapshot, keep_last: int) -> Path:
    """Write ``snap`` atomically as ``checkpoints/step-XXXXXXXX`` and prune older ones."""
    final = checkpoint_dir(run_dir, snap.step)
    root = final.parent
    if not root.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        fsync_dir(root.parent)  # the new checkpoints/ entry of the run directory
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()

    optimizer_tensors, optimizer_rest = _split_optimizer(snap.optimizer)
    rank_tensors = {}
    rank_json = []
    for r, rank in enumerate(snap.ranks):
        rank_tensors[f"{r}.torch_cpu"] = rank["rng"]["torch_cpu"]
        if rank["rng"].get("torch_cuda") is not None:
            rank_tensors[f"{r}.torch_cuda"] = rank["rng"]["torch_cuda"]
        rank_json.append({"rng": _rng_to_json(rank["rng"]), "loss": rank["loss"]})

    _save_tensors(tmp / "model.safetensors", snap.model)
    _save_tensors(tmp / "optimizer.safetensors", optimizer_tensors)
    _save_tensors(tmp / "ranks.safetensors", rank_tensors)
    _write_json(tmp / "state.json", {
        "format": FORMAT, "step": snap.step, "epoch": snap.epoch, "batch_in_epoch": snap.batch_in_epoch,
        "world_size": snap.world_size, "global_batch_size": snap.global_batch_size,
        "optimizer": optimizer_rest, "ranks": rank_json, "tracking": snap.tracking, "config": snap.config,
        "saved_at": time.time(),
    })
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
    _write_json(tmp / MANIFEST, {"format": FORMAT, "step": snap.step, "files": files})  # commit marker
    fsync_dir(tmp)

    if final.exists():
        # The step already has a directory: a damaged one skipped on resume, or one a run was
        # resumed from an earlier checkpoint past. A directory cannot be renamed over a
        # non-empty one, so the old copy is moved aside first, as .trash-step-N-PID. A crash
        # between the two renames must not leave the step without a copy, so while no step-N
        # exists, list_checkpoints counts .trash-step-N-PID as step N (it is still verified
        # and fully loaded before use), and the next save's prune() renames it back.
        # Why not an atomic swap (Linux renameat2 RENAME_EXCHANGE)? It exists on Linux only
        # and not on every filesystem (older NFS, some FUSE), so a fallback that needs this
        # same recovery would remain anyway; one mechanism everywhere is simpler to trust.
        trash = root / f"{_TRASH}{final.name}-{os.getpid()}"
        if trash.exists():  # left by an earlier failed save of this process; step-N exists
            shutil.rmtree(trash)
        os.rename(final, trash)
        os.rename(tmp, final)
        fsync_dir(root)  # the new copy is durably in place before the old one goes
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)
        fsync_dir(root)
    prune(run_dir, keep_last)
    return final


def prune(run_dir: Path, keep_last: int) -> None:
    """Keep the ``keep_last`` newest checkpoints (0 = keep all); drop leftovers of dead saves."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return
    restored = False
    for leftover in root.glob(".t*-*"):
        if not leftover.name.startswith((".tmp-", _TRASH)) or leftover.name.endswith(f"-{os.getpid()}"):
            continue
        name = _trashed_step(leftover.name)
        if name is not None and not (root / name).exists():
            # The old copy of a step whose replacement died between its two renames (see
            # save_checkpoint): the only copy of that step, so it gets its name back.
            try:
                os.rename(leftover, root / name)
                restored = True
            except OSError:
                pass  # still listed under its trash name; the next save tries again
            continue
        shutil.rmtree(leftover, ignore_errors=True)
    if restored:
        fsync_dir(root)
    if keep_last > 0:
        for old in list_checkpoints(run_dir)[keep_last:]:
            shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------
# Finding and loading


def _is_step_name(name: str) -> bool:
    return name.startswith(_PREFIX) and name[len(_PREFIX):].isascii() and name[len(_PREFIX):].isdigit()


def _trashed_step(name: str) -> str | None:
    """``.trash-step-00000600-1234`` -> ``step-00000600``; None for any other name."""
    if not name.startswith(_TRASH):
        return None
    step, dash, pid = name[len(_TRASH):].rpartition("-")
    return step if dash and pid.isdigit() and _is_step_name(step) else None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Committed-looking checkpoint directories, newest first (validity not checked).

    Besides ``step-N``, the old copy ``.trash-step-N-PID`` of a step counts while no ``step-N``
    exists: a save that replaced step N died between its two renames (see save_checkpoint)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if not p.is_dir():
            continue
        if _is_step_name(p.name):
            found.append((int(p.name[len(_PREFIX):]), p))
        elif (name := _trashed_step(p.name)) is not None and not (root / name).exists():
            found.append((int(name[len(_PREFIX):]), p))
    return [p for _, p in sorted(found, key=lambda sp: (sp[0], sp[1].name), reverse=True)]


class _Malformed(ValueError):
    """A field of a checkpoint file with the wrong type or value; the message says which."""


def _check(ok: Any, what: str) -> None:
    if not ok:
        raise _Malformed(what)


def _is_int(value: Any, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _regular_file(file: Path) -> os.stat_result:
    """``file``'s stat; a CheckpointError unless it is a regular file (a symlink is never
    followed: it could point out of the checkpoint)."""
    try:
        info = os.lstat(file)
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing") from None
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read it ({e.strerror or e})") from None
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(f"{file}: not a regular file (links and directories are never followed)")
    return info


def _read_json(file: Path, what: str) -> Any:
    try:
        return json.loads(file.read_bytes())
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read it ({e.strerror or e})") from None
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, or nested too deeply
        raise CheckpointError(f"{file}: {what} (not JSON: {type(e).__name__}: {e})") from None


def _check_manifest(manifest: Any) -> dict[str, dict[str, Any]]:
    """The ``files`` of a manifest whose every field has its type; _Malformed otherwise."""
    _check(isinstance(manifest, dict), "not a JSON object")
    _check(manifest.get("format") == FORMAT, f"format {manifest.get('format')!r}, expected {FORMAT}")
    _check(_is_int(manifest.get("step")), "step: not an integer >= 0")
    files = manifest.get("files")
    _check(isinstance(files, dict), "files: not an object")
    for name, meta in files.items():
        # Only plain names of the checkpoint's own files: nothing else is ever opened, so a
        # manifest cannot make verify read (or vouch for) a file outside its directory.
        _check(name not in ("", ".", "..") and "/" not in name and "\0" not in name
               and (os.altsep is None or os.altsep not in name) and not os.path.isabs(name),
               f"files: {name!r} is a path, not the name of a file in the checkpoint")
        _check(name in FILES, f"files: {name!r} is not a file of a checkpoint ({', '.join(FILES)})")
        _check(isinstance(meta, dict), f"files: {name}: not an object")
        _check(_is_int(meta.get("bytes")), f"files: {name}: bytes is not an integer >= 0")
        _check(isinstance(meta.get("sha256"), str) and _SHA256.fullmatch(meta["sha256"]),
               f"files: {name}: sha256 is not 64 hex digits")
    return files


def verify(path: Path) -> dict[str, Any]:
    """Check the manifest and every file's size and sha256; return the manifest."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{manifest_path}: missing (the save did not complete)")
    _regular_file(manifest_path)
    manifest = _read_json(manifest_path, "unreadable manifest")
    try:
        files = _check_manifest(manifest)
    except _Malformed as e:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({e})") from None
    for required in FILES:
        if required not in files:
            raise CheckpointError(f"{path / required}: not listed in the manifest")
    for name in FILES:
        meta, file = files[name], path / name
        size = _regular_file(file).st_size
        if size != meta["bytes"]:
            raise CheckpointError(f"{file}: {size} bytes, manifest says {meta['bytes']} (truncated or damaged)")
        try:
            digest = _sha256(file)
        except OSError as e:
            raise CheckpointError(f"{file}: cannot read it ({e.strerror or e})") from None
        if digest != meta["sha256"]:
            raise CheckpointError(f"{file}: checksum mismatch (corrupted)")
    return manifest


def _check_rng(data: Any) -> dict[str, Any]:
    """One rank's Python and NumPy RNG state from JSON, tried on throwaway generators (the
    global ones are untouched) so that ``set_rng_state`` cannot fail on it later."""
    _check(isinstance(data, dict), "not an object")
    try:
        rng = _rng_from_json(data)
        gauss = rng["python"][2]
        _check(gauss is None or _is_number(gauss), "python: the cached gauss is not a number or null")
        random.Random().setstate(rng["python"])
        np.random.RandomState().set_state(rng["numpy"])
    except _Malformed:
        raise
    except Exception as e:  # noqa: BLE001 - random and numpy say what they refuse in many types
        raise _Malformed(f"not a Python/NumPy RNG state ({type(e).__name__}: {e})") from None
    return rng


def _check_state(state: Any, manifest_step: int) -> list[dict[str, Any]]:
    """Check every field of state.json that loading and resuming use; return the ranks'
    Python/NumPy RNG states. _Malformed otherwise."""
    _check(isinstance(state, dict), "not a JSON object")
    _check(state.get("format") == FORMAT, f"format {state.get('format')!r}, expected {FORMAT}")
    for key in ("step", "epoch", "batch_in_epoch"):
        _check(_is_int(state.get(key)), f"{key}: not an integer >= 0")
    for key in ("world_size", "global_batch_size"):
        _check(_is_int(state.get(key), 1), f"{key}: not an integer >= 1")
    _check(state["step"] == manifest_step, f"step {state['step']}, but the manifest says {manifest_step}")

    optimizer = state.get("optimizer")
    _check(isinstance(optimizer, dict), "optimizer: not an object")
    groups = optimizer.get("param_groups")
    _check(isinstance(groups, list) and groups and all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                                       for g in groups),
           "optimizer.param_groups: not a list of objects with params")
    params = [p for g in groups for p in g["params"]]
    _check(all(_is_int(p) for p in params) and len(set(params)) == len(params),
           "optimizer.param_groups: params are not distinct integers >= 0")
    for group in groups:  # hyper-parameters: optimizer.load_state_dict takes them as they are
        for key, value in group.items():
            _check(key == "params" or value is None or isinstance(value, (bool, str)) or _is_number(value)
                   or (isinstance(value, list) and all(_is_number(v) for v in value)),
                   f"optimizer.param_groups: {key}: not a finite number, flag, string or list of numbers")
        for key in ("lr", "initial_lr", "momentum", "dampening", "weight_decay"):
            _check(key not in group or (_is_number(group[key]) and group[key] >= 0),
                   f"optimizer.param_groups: {key}: not a finite number >= 0")
    scalars = optimizer.get("scalars")
    _check(isinstance(scalars, dict), "optimizer.scalars: not an object")
    for name, value in scalars.items():
        _check(_param_index(name) in params, f"optimizer.scalars: {name!r} is not <parameter index>.<key>")
        _check(value is None or isinstance(value, (bool, int, float, str)),
               f"optimizer.scalars: {name}: not a number, string or null")

    world_size = state["world_size"]
    ranks = state.get("ranks")
    _check(isinstance(ranks, list) and len(ranks) == world_size,
           f"ranks: not a list of world_size ({world_size}) entries")
    rngs = []
    for r, rank in enumerate(ranks):
        _check(isinstance(rank, dict), f"ranks[{r}]: not an object")
        try:
            rngs.append(_check_rng(rank.get("rng")))
        except _Malformed as e:
            raise _Malformed(f"ranks[{r}].rng: {e}") from None
        loss = rank.get("loss")
        _check(isinstance(loss, dict) and all(_is_number(loss.get(k)) for k in _LOSS_KEYS)
               and _is_int(loss["window_steps"]),
               f"ranks[{r}].loss: not an object of the finite numbers {', '.join(_LOSS_KEYS)}")

    tracking = state.get("tracking", {})
    _check(isinstance(tracking, dict), "tracking: not an object")
    _check(isinstance(tracking.get("wandb_run_id"), (str, type(None))), "tracking.wandb_run_id: not a string")
    _check(isinstance(state.get("config", {}), dict), "config: not an object")
    return rngs


def _check_rank_tensors(tensors: dict[str, torch.Tensor], world_size: int) -> None:
    names = {f"{r}.{kind}" for r in range(world_size) for kind in ("torch_cpu", "torch_cuda")}
    for name in tensors:
        _check(name in names, f"{name!r} belongs to no rank of world_size {world_size}")
    for r in range(world_size):
        cpu, cuda = tensors.get(f"{r}.torch_cpu"), tensors.get(f"{r}.torch_cuda")
        _check(cpu is not None, f"{r}.torch_cpu: missing")
        for name, t in ((f"{r}.torch_cpu", cpu), (f"{r}.torch_cuda", cuda)):
            _check(t is None or (t.dtype == torch.uint8 and t.dim() == 1), f"{name}: not a 1-d uint8 RNG state")
        try:
            torch.Generator().set_state(cpu)  # a throwaway generator checks the size
        except Exception as e:  # noqa: BLE001
            raise _Malformed(f"{r}.torch_cpu: not a torch RNG state ({e})") from None


def load_checkpoint(path: Path) -> Snapshot:
    """Verify, then read a checkpoint (safetensors and JSON only). Anything wrong with it is a
    CheckpointError naming the file."""
    path = Path(path)
    manifest = verify(path)
    try:
        return _load_verified(path, manifest["step"])
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - a last net: the checks above should leave nothing for it
        raise CheckpointError(f"{path}: unreadable checkpoint content ({type(e).__name__}: {e})") from None


def _load_verified(path: Path, manifest_step: int) -> Snapshot:
    def content_error(name: str, reason: Any) -> CheckpointError:
        return CheckpointError(f"{path / name}: unreadable checkpoint content ({reason})")

    state = _read_json(path / "state.json", "unreadable checkpoint content")
    try:
        rngs = _check_state(state, manifest_step)
    except _Malformed as e:
        raise content_error("state.json", e) from None

    tensors = {}
    for name in ("model.safetensors", "optimizer.safetensors", "ranks.safetensors"):
        try:
            tensors[name] = load_file(str(path / name))
        except Exception as e:  # noqa: BLE001 - checksums matched but the content is not ours
            raise content_error(name, f"{type(e).__name__}: {e}") from None

    for name in ("model.safetensors", "optimizer.safetensors"):
        for key, t in tensors[name].items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise content_error(name, f"{key} holds NaN or Inf, which no saved checkpoint does")
    params = {p for g in state["optimizer"]["param_groups"] for p in g["params"]}
    for name in tensors["optimizer.safetensors"]:
        if _param_index(name) not in params:
            raise content_error("optimizer.safetensors", f"{name!r} is not <parameter index>.<key> of param_groups")
    rank_tensors = tensors["ranks.safetensors"]
    try:
        _check_rank_tensors(rank_tensors, state["world_size"])
    except _Malformed as e:
        raise content_error("ranks.safetensors", e) from None

    ranks = []
    for r, (rank, rng) in enumerate(zip(state["ranks"], rngs)):
        rng["torch_cpu"] = rank_tensors[f"{r}.torch_cpu"]
        rng["torch_cuda"] = rank_tensors.get(f"{r}.torch_cuda")
        ranks.append({"rng": rng, "loss": rank["loss"]})
    return Snapshot(
        step=state["step"], epoch=state["epoch"], batch_in_epoch=state["batch_in_epoch"],
        world_size=state["world_size"], global_batch_size=state["global_batch_size"],
        model=tensors["model.safetensors"],
        optimizer=_join_optimizer(tensors["optimizer.safetensors"], state["optimizer"]),
        ranks=ranks, tracking=state.get("tracking", {}), config=state.get("config", {}), path=path,
    )


def _latest_loadable(run_dir: Path, warn: Any = print) -> Snapshot | None:
    """The newest checkpoint that loads completely; the others are reported through ``warn``."""
    for path in list_checkpoints(run_dir):
        try:
            return load_checkpoint(path)
        except CheckpointError as e:
            warn(f"warning: skipping damaged checkpoint: {e}")
    return None


def find_latest_valid(run_dir: Path, warn: Any = print) -> Path | None:
    """The newest checkpoint that loads (verified, and every field checked); damaged or
    malformed ones are reported through ``warn`` and skipped."""
    snap = _latest_loadable(run_dir, warn)
    return snap.path if snap is not None else None


# --------------------------------------------------------------------------------------
# Final weights


def save_model(model: torch.nn.Module, path: Path) -> None:
    """Write ``model``'s state dict to ``path`` via a temporary file and an atomic rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    _save_tensors(tmp, model.state_dict())  # fsyncs the file
    os.replace(tmp, path)
    fsync_dir(path.parent)  # and the rename


def load_model_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Weights from ``model.safetensors`` or from a checkpoint directory holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    return load_file(str(path))


# --------------------------------------------------------------------------------------
# Collectives: every rank calls these at the same point. Rank 0 decides or writes and every
# rank gets the same outcome (``Dist.on_main``): an error is raised on all ranks together.


def save(dist: Dist, run_dir: Path, keep_last: int, snap: Snapshot, loss_state: dict[str, Any]) -> Path:
    """Write ``snap`` (its ``ranks`` filled here with every rank's RNG and ``loss_state``)."""
    snap.ranks = dist.gather_object({"rng": rng_state(), "loss": loss_state})

    def write() -> Path:
        try:
            return save_checkpoint(run_dir, snap, keep_last)
        except OSError as e:
            raise CheckpointError(f"cannot write checkpoint in {Path(run_dir) / CHECKPOINTS}: {e.strerror or e}") from None

    return dist.on_main(write)


def resume(dist: Dist, run_dir: Path, resume: str, global_batch_size: int) -> Snapshot | None:
    """The checkpoint that ``--resume`` names, read on every rank; None to start fresh.

    ``resume``: ``auto`` (the newest valid checkpoint in the run directory, if any; damaged ones
    are skipped with a warning), ``never`` (refused when the run directory holds checkpoints),
    or the path of a checkpoint directory.
    """

    chosen: list[Snapshot] = []  # rank 0 keeps the snapshot it validated, instead of reading it twice

    def choose() -> str | None:
        # Rank 0 loads the checkpoint completely (verification and schema checks included)
        # before naming it, so the path every rank then loads is one that loads: a bad one is
        # skipped here (auto) or raised here on every rank together (a named path).
        if resume == "never":
            if list_checkpoints(run_dir):
                raise ConfigError(f"--resume never: {Path(run_dir) / CHECKPOINTS} already holds checkpoints; "
                                  "use another --run-dir or --resume auto")
            return None
        if resume == "auto":
            snap = _latest_loadable(run_dir, warn=lambda m: print(m, flush=True))
        else:
            snap = load_checkpoint(Path(resume))
        if snap is None:
            return None
        chosen.append(snap)
        return str(snap.path)

    path = dist.on_main(choose)
    if path is None:
        return None
    snap = chosen[0] if chosen else load_checkpoint(Path(path))
    # Another number of processes is fine: the training trajectory does not depend on it (see
    # data.TrainBatches); another global batch would change every batch from here on.
    if snap.global_batch_size != global_batch_size:
        raise ConfigError(
            f"{path}: written with train.global_batch_size {snap.global_batch_size}; this run has "
            f"{global_batch_size}, which would change every batch from here on. Resume with the same global "
            "batch, or start a new run with another --run-dir"
        )
    return snap


def restore(snap: Snapshot, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int) -> None:
    """Load the weights, the optimizer state and rank ``rank``'s RNG state of ``snap``.

    On another number of processes than wrote it, a rank without a saved RNG state takes rank
    0's: no random number decides anything in training (the sampler's shuffle is seeded from
    ``train.seed`` and the epoch, the model has no dropout), so this does not change the run.

    A checkpoint of another model (other layer names or shapes, other parameter groups) is a
    CheckpointError naming the file, raised on every rank alike (they all restore the same
    snapshot into the same model)."""
    where = snap.path if snap.path is not None else Path("checkpoint")

    def load_optimizer() -> None:
        optimizer.load_state_dict(snap.optimizer)
        # load_state_dict does not compare shapes; a wrong one would fail at the first step.
        for group in optimizer.param_groups:
            for p in group["params"]:
                for key, value in optimizer.state.get(p, {}).items():
                    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != p.shape:
                        raise ValueError(f"{key} of shape {tuple(value.shape)} "
                                         f"for a parameter of shape {tuple(p.shape)}")

    for name, what, load in (("model.safetensors", "model", lambda: model.load_state_dict(snap.model)),
                             ("optimizer.safetensors", "optimizer", load_optimizer)):
        try:
            load()
        except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, ValueError, KeyError...
            reason = " ".join(str(e).split())[:300] or type(e).__name__
            raise CheckpointError(f"{where / name}: does not fit this run's {what} ({reason})") from None
    set_rng_state(snap.ranks[rank if rank < snap.world_size else 0]["rng"])
