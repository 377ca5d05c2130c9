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
last, then the directory is renamed into place. A directory without a manifest whose
checksums match is never loaded, so a save killed half-way leaves the previous checkpoint as
the newest valid one. Older checkpoints are pruned only after the new one is in place.

Nothing here unpickles: tensors go through safetensors, everything else through JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mnistdist.config import ConfigError
from mnistdist.rundir import CHECKPOINTS

if TYPE_CHECKING:
    from mnistdist.distributed import Dist

MANIFEST = "manifest.json"
FORMAT = "mnistdist-checkpoint-1"
_PREFIX = "step-"


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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    root.mkdir(parents=True, exist_ok=True)
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
    _fsync_dir(tmp)

    if final.exists():  # e.g. a damaged checkpoint of the same step, skipped on resume
        trash = root / f".trash-{final.name}-{os.getpid()}"
        os.rename(final, trash)
        os.rename(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(root)
    prune(run_dir, keep_last)
    return final


def prune(run_dir: Path, keep_last: int) -> None:
    """Keep the ``keep_last`` newest checkpoints (0 = keep all); drop leftovers of dead saves."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return
    for leftover in root.glob(".t*-*"):
        if leftover.name.startswith((".tmp-", ".trash-")) and not leftover.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(leftover, ignore_errors=True)
    if keep_last > 0:
        for old in list_checkpoints(run_dir)[keep_last:]:
            shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------
# Finding and loading


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Committed-looking checkpoint directories, newest first (validity not checked)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and p.name[len(_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]), reverse=True)


def verify(path: Path) -> dict[str, Any]:
    """Check the manifest and every file's size and sha256; return the manifest."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{manifest_path}: missing (the save did not complete)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        if manifest.get("format") != FORMAT:
            raise ValueError(f"format {manifest.get('format')!r}, expected {FORMAT}")
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({e})") from None
    for required in ("model.safetensors", "optimizer.safetensors", "ranks.safetensors", "state.json"):
        if required not in files:
            raise CheckpointError(f"{path / required}: not listed in the manifest")
    for name, meta in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing")
        size = file.stat().st_size
        if size != meta["bytes"]:
            raise CheckpointError(f"{file}: {size} bytes, manifest says {meta['bytes']} (truncated or damaged)")
        if _sha256(file) != meta["sha256"]:
            raise CheckpointError(f"{file}: checksum mismatch (corrupted)")
    return manifest


def load_checkpoint(path: Path) -> Snapshot:
    """Verify, then read a checkpoint (safetensors and JSON only)."""
    path = Path(path)
    verify(path)
    try:
        state = json.loads((path / "state.json").read_text())
        model = load_file(str(path / "model.safetensors"))
        optimizer = _join_optimizer(load_file(str(path / "optimizer.safetensors")), state["optimizer"])
        rank_tensors = load_file(str(path / "ranks.safetensors"))
    except Exception as e:  # noqa: BLE001 - checksums matched but the content is not ours
        raise CheckpointError(f"{path}: unreadable checkpoint content ({type(e).__name__}: {e})") from None
    ranks = []
    for r, rank in enumerate(state["ranks"]):
        rng = _rng_from_json(rank["rng"])
        rng["torch_cpu"] = rank_tensors[f"{r}.torch_cpu"]
        rng["torch_cuda"] = rank_tensors.get(f"{r}.torch_cuda")
        ranks.append({"rng": rng, "loss": rank["loss"]})
    return Snapshot(
        step=state["step"], epoch=state["epoch"], batch_in_epoch=state["batch_in_epoch"],
        world_size=state["world_size"], global_batch_size=state["global_batch_size"],
        model=model, optimizer=optimizer, ranks=ranks, tracking=state.get("tracking", {}),
        config=state.get("config", {}), path=path,
    )


def find_latest_valid(run_dir: Path, warn: Any = print) -> Path | None:
    """The newest checkpoint that verifies; damaged ones are reported through ``warn`` and skipped."""
    for path in list_checkpoints(run_dir):
        try:
            verify(path)
            return path
        except CheckpointError as e:
            warn(f"warning: skipping damaged checkpoint: {e}")
    return None


# --------------------------------------------------------------------------------------
# Final weights


def save_model(model: torch.nn.Module, path: Path) -> None:
    """Write ``model``'s state dict to ``path`` via a temporary file and an atomic rename."""
    tmp = path.with_name(path.name + ".tmp")
    _save_tensors(tmp, model.state_dict())
    os.replace(tmp, path)


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

    def choose() -> str | None:
        if resume == "never":
            if list_checkpoints(run_dir):
                raise ConfigError(f"--resume never: {Path(run_dir) / CHECKPOINTS} already holds checkpoints; "
                                  "use another --run-dir or --resume auto")
            return None
        if resume == "auto":
            found = find_latest_valid(run_dir, warn=lambda m: print(m, flush=True))
            return str(found) if found else None
        verify(Path(resume))
        return resume

    path = dist.on_main(choose)
    if path is None:
        return None
    snap = load_checkpoint(Path(path))
    if snap.world_size != dist.world_size or snap.global_batch_size != global_batch_size:
        raise ConfigError(
            f"{path}: written by {snap.world_size} process(es) with train.global_batch_size "
            f"{snap.global_batch_size}; this run has {dist.world_size} with {global_batch_size}. "
            "Resume with the same number of processes and global batch (or --resume never)"
        )
    return snap


def restore(snap: Snapshot, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int) -> None:
    """Load the weights, the optimizer state and rank ``rank``'s RNG state of ``snap``."""
    model.load_state_dict(snap.model)
    optimizer.load_state_dict(snap.optimizer)
    set_rng_state(snap.ranks[rank]["rng"])
