"""Checkpoints: atomic, verified, and free of pickle.

One checkpoint, ``RUN_DIR/checkpoints/step-00000600/``:

    model.safetensors       the model's state dict (also loadable by ``mnistdist evaluate``)
    optimizer.safetensors   the optimizer's tensors (SGD's momentum buffers) as ``<parameter index>.<key>``
    state.json              ``Snapshot``'s other fields: the position in the run, each rank's loss
                            sums, the W&B run id, the config, the training time, the best model's result
    best.safetensors        the best model's weights (only once a validation set chose one)
    manifest.json           size and sha256 of every file above: written last, the commit marker

That is all a run needs to continue exactly: nothing random decides anything after the start
(the sampler is seeded by ``train.seed`` + epoch, the model has no dropout), so no RNG state; the
optimizer's hyper-parameters are the config's, so only its tensors. Whatever is wrong with a
checkpoint is a ``CheckpointError`` naming the file, and auto-resume falls back to the one before
(docs/reliability.md). The two earlier formats still load (the first also held RNG states, in
``ranks.safetensors``: verified, never read; neither has a best model).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors.torch
import torch

from mnistdist.config import Config, ConfigError, trajectory_changes
from mnistdist.metrics import LossMeter
from mnistdist.rundir import CHECKPOINTS, RunDir, fsync_dir, read_summary, set_aside

if TYPE_CHECKING:
    from mnistdist.distributed import Dist

MANIFEST = "manifest.json"
FORMAT = "mnistdist-checkpoint-3"
BEST_FILE = "best.safetensors"
"""The one optional file: listed in the manifest exactly when state.json has a ``best``."""
_FILES = ("model.safetensors", "optimizer.safetensors", "state.json")
FORMATS = {FORMAT: _FILES, "mnistdist-checkpoint-2": _FILES, "mnistdist-checkpoint-1": (*_FILES, "ranks.safetensors")}
"""The files each format's manifest lists (besides ``BEST_FILE``)."""
_STEP = re.compile(r"step-([0-9]+)")
_TRASHED = re.compile(r"\.trash-step-([0-9]+)-[0-9]+")
"""Step N's old copy, moved aside while a save replaces it (see ``save_checkpoint``)."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the directory and the file."""


@dataclass
class Snapshot:
    """A checkpoint in memory: what ``save_checkpoint`` writes and ``load_checkpoint`` reads.
    ``step``: optimizer steps done; ``epoch`` (0-based) is in progress, ``batch_in_epoch`` of its
    batches done. ``optimizer``: ``optimizer.state_dict()["state"]``. ``losses``: each rank's
    ``LossMeter.state_dict()``. ``tracking``: e.g. the W&B run id. ``train_time_s``: over all the
    jobs so far. ``best``: the best model's validation result (``metrics.Best.state_dict()``),
    kept exactly when its weights ``best_model`` are. ``path``: the directory it was read from."""

    step: int
    epoch: int
    batch_in_epoch: int
    world_size: int
    global_batch_size: int
    model: dict[str, torch.Tensor]
    optimizer: dict[int, dict[str, torch.Tensor]]
    losses: list[dict[str, Any]]
    tracking: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    train_time_s: float = 0.0
    best: dict[str, Any] | None = None
    best_model: dict[str, torch.Tensor] | None = None
    path: Path | None = None

    def train_state(self, rank: int, world_size: int) -> dict[str, Any]:
        """What rank ``rank`` of ``world_size`` resumes with: ``TrainState.load_state_dict``'s
        argument (the loss sums re-split when the world size differs: ``LossMeter.for_rank``)."""
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "loss": LossMeter.for_rank(self.losses, rank, world_size), "best": self.best,
                "train_time_s": self.train_time_s}


def _write(path: Path, data: bytes) -> None:
    """``data`` as ``path``, fsynced. Every file is made by ``open``, so its permissions follow
    the umask (safetensors' ``save_file`` makes weights 0600: unreadable to teammates)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """``tensors`` as the bytes of safetensors file ``path``; what safetensors refuses (say,
    tensors that share memory) is a CheckpointError naming ``path``."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    try:
        return safetensors.torch.save(tensors, metadata=metadata)
    except (safetensors.SafetensorError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"cannot write {path}: {' '.join(str(e).split())[:300]}") from None


def save_checkpoint(run_dir: Path, snap: Snapshot, keep_last: int) -> Path:
    """Write ``snap`` as ``checkpoints/step-XXXXXXXX``, atomically, and prune older ones: its files
    go into ``.tmp-step-N-PID/``, each fsynced, the manifest last; then that directory is fsynced
    and renamed into place, and ``checkpoints/`` fsynced."""
    root = Path(run_dir) / CHECKPOINTS
    final = root / f"step-{snap.step:08d}"
    optimizer = {f"{index}.{key}": value for index, tensors in snap.optimizer.items() for key, value in tensors.items()}
    files = {"model.safetensors": _tensors(final / "model.safetensors", snap.model),
             "optimizer.safetensors": _tensors(final / "optimizer.safetensors", optimizer)}
    if snap.best_model is not None:
        files[BEST_FILE] = _tensors(final / BEST_FILE, snap.best_model)
    files["state.json"] = json.dumps({
        "format": FORMAT, **{key: getattr(snap, key) for key in _SCALARS}, "ranks": [{"loss": x} for x in snap.losses],
        "best": snap.best if snap.best_model is not None else None, "saved_at": time.time()}, indent=1).encode()
    entries = {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in files.items()}
    files[MANIFEST] = json.dumps({"format": FORMAT, "step": snap.step, "files": entries}, indent=1).encode()

    if not root.is_dir():
        root.mkdir(parents=True)
        fsync_dir(root.parent)  # the new checkpoints/ entry of the run directory
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # left by an earlier failed save of this process
    tmp.mkdir()
    for name, data in files.items():  # the manifest last
        _write(tmp / name, data)
    fsync_dir(tmp)
    # A step that has a directory already (a damaged one resume skipped, or one past the checkpoint
    # a run resumed from): a directory cannot be renamed over a non-empty one, so the old copy goes
    # aside first. Until prune removes it, list_checkpoints counts it as step N if no step-N exists.
    trash = root / f".trash-{final.name}-{os.getpid()}"
    shutil.rmtree(trash, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        os.rename(final, trash)
    os.rename(tmp, final)
    fsync_dir(root)  # the new copy is durably in place before prune removes the old one
    prune(run_dir, keep_last)
    return final


def prune(run_dir: Path, keep_last: int) -> None:
    """Keep the ``keep_last`` newest checkpoints (0: all); remove the leftovers of dead saves,
    but give a step's only copy (see ``save_checkpoint``) its name back."""
    root = Path(run_dir) / CHECKPOINTS
    for leftover in [*root.glob(".tmp-step-*"), *root.glob(".trash-step-*")]:
        trashed = _TRASHED.fullmatch(leftover.name)
        if trashed and not (root / f"step-{trashed[1]}").exists():
            with contextlib.suppress(OSError):  # if not, it is still listed; the next save tries again
                os.rename(leftover, root / f"step-{trashed[1]}")
                fsync_dir(root)
        else:
            shutil.rmtree(leftover, ignore_errors=True)
    for old in list_checkpoints(run_dir)[keep_last:] if keep_last > 0 else ():
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Committed-looking checkpoint directories, newest first (validity not checked): each
    ``step-N``, and ``.trash-step-N-PID`` while no ``step-N`` exists (see ``save_checkpoint``)."""
    root = Path(run_dir) / CHECKPOINTS
    found = []
    for p in root.iterdir() if root.is_dir() else ():
        step = _STEP.fullmatch(p.name) or _TRASHED.fullmatch(p.name)
        if step and p.is_dir() and (p.name.startswith("step-") or not (root / f"step-{step[1]}").exists()):
            found.append((int(step[1]), p.name, p))
    return [p for *_, p in sorted(found, reverse=True)]


def save_weights(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a state dict to ``path`` (with ``metadata`` in the safetensors header) via a
    temporary file and an atomic rename, both fsynced."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    _write(tmp, _tensors(path, tensors, metadata))
    os.replace(tmp, path)
    fsync_dir(path.parent)


def load_model_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict in weights file ``path`` (as ``save_weights`` writes them)."""
    return safetensors.torch.load_file(path)


def _nat(v: Any) -> bool:
    return type(v) is int and v >= 0


def _number(v: Any) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


_ENTRY = {"bytes": _nat, "sha256": lambda v: isinstance(v, str) and re.fullmatch("[0-9a-f]{64}", v) is not None}
_MANIFEST = {"format": lambda v: isinstance(v, str) and v in FORMATS, "step": _nat,
             "files": lambda v: isinstance(v, dict)}
_BEST = {"step": _nat, "epoch": _nat, "val_correct": _nat, "val_total": lambda v: _nat(v) and v > 0,
         "val_acc": _number, "val_loss": _number}
_STATE = {"step": _nat, "epoch": _nat, "batch_in_epoch": _nat, "world_size": lambda v: _nat(v) and v > 0,
          "global_batch_size": lambda v: _nat(v) and v > 0,
          "ranks": [{"loss": {"window_sum": _number, "window_steps": _nat, "epoch_sum": _number}}],
          "tracking": {"wandb_run_id": lambda v: v is None or isinstance(v, str)},
          "config": lambda v: isinstance(v, dict), "train_time_s": lambda v: _number(v) and v >= 0}
"""What resuming reads of state.json (besides format, step and best, checked against the manifest)."""
_SCALARS = [key for key in _STATE if key != "ranks"]
"""The fields of state.json that are the Snapshot's fields of the same name."""


def _mismatch(value: Any, spec: Any, where: str = "") -> str | None:
    """Where parsed JSON ``value`` does not match ``spec`` (a predicate; a dict: an object whose
    keys match theirs; a one-item list: a list of items that match it); None if it matches."""
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            return f"{where + ': ' if where else ''}not an object"
        found = (_mismatch(value.get(k), s, f"{where}.{k}" if where else k) for k, s in spec.items())
    elif isinstance(spec, list):
        if not isinstance(value, list):
            return f"{where}: not a list"
        found = (_mismatch(v, spec[0], f"{where}[{i}]") for i, v in enumerate(value))
    else:
        return None if spec(value) else f"{where}: unexpected {value!r:.60}"
    return next((m for m in found if m), None)


def _read(file: Path) -> bytes:
    """The content of ``file``, a regular file (a link is never followed: it could lead out of the checkpoint)."""
    try:
        if stat.S_ISREG(os.lstat(file).st_mode):
            return file.read_bytes()
        problem = "not a regular file (links and directories are never followed)"
    except OSError as e:
        problem = "missing" if isinstance(e, FileNotFoundError) else f"cannot read it ({e.strerror or e})"
    raise CheckpointError(f"{file}: {problem}")


def _parse(file: Path, data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, or nested too deeply
        raise CheckpointError(f"{file}: {what} (not JSON: {type(e).__name__})") from None


def _verified(path: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The manifest of checkpoint ``path`` and the content of each file it lists, all checked."""
    manifest = _parse(path / MANIFEST, _read(path / MANIFEST), "unreadable manifest")
    problem = _mismatch(manifest, _MANIFEST)
    if problem is None:
        listed, needed = set(manifest["files"]), set(FORMATS[manifest["format"]])
        allowed = needed | {BEST_FILE} if manifest["format"] == FORMAT else needed
        # Only the checkpoint's own files, by plain name: nothing else is ever opened.
        if not needed <= listed <= allowed:
            problem = f"files: {sorted(listed)}; {manifest['format']} lists {', '.join(sorted(needed))}"
        else:
            problem = _mismatch(manifest["files"], dict.fromkeys(listed, _ENTRY), "files")
    if problem:
        raise CheckpointError(f"{path / MANIFEST}: unreadable manifest ({problem})")
    content = {}
    for name, entry in manifest["files"].items():
        data = content[name] = _read(path / name)
        if len(data) != entry["bytes"]:
            raise CheckpointError(f"{path / name}: {len(data)} bytes, manifest says {entry['bytes']} "
                                  "(truncated or damaged)")
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise CheckpointError(f"{path / name}: checksum mismatch (corrupted)")
    return manifest, content


def load_checkpoint(path: Path) -> Snapshot:
    """Verify, then read a checkpoint (safetensors and JSON only): every file the manifest lists,
    read once, of its size and sha256; state.json as ``_STATE`` says; no weight NaN or Inf;
    optimizer tensors named ``<parameter index>.<key>``. Anything wrong with it is a
    CheckpointError naming the file."""
    path = Path(path)
    manifest, content = _verified(path)
    has_best = BEST_FILE in manifest["files"]

    def bad(name: str, problem: str) -> CheckpointError:
        return CheckpointError(f"{path / name}: unreadable checkpoint content ({problem})")

    state = _parse(path / "state.json", content["state.json"], "unreadable checkpoint content")
    if isinstance(state, dict):  # what the earlier formats lack
        state = {"tracking": {}, "config": {}, "train_time_s": 0.0, "best": None, **state}
    problem = _mismatch(state, {**_STATE, "format": lambda v: v == manifest["format"],
                                "step": lambda v: _nat(v) and v == manifest["step"],
                                "best": _BEST if has_best else (lambda v: v is None)})
    if problem is None and len(state["ranks"]) != state["world_size"]:
        problem = f"ranks: {len(state['ranks'])}, not one per process of world_size {state['world_size']}"
    if problem:
        raise bad("state.json", problem)

    def tensors(name: str) -> dict[str, torch.Tensor]:
        try:
            loaded = safetensors.torch.load(content[name])
        except Exception as e:  # noqa: BLE001 - the checksum matched, but the content is not ours
            raise bad(name, f"{type(e).__name__}: {e}") from None
        for key, t in loaded.items():  # no checkpoint is ever saved with NaN/Inf
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise bad(name, f"{key} holds NaN or Inf")
        return loaded

    optimizer: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors("optimizer.safetensors").items():
        if not (index_key := re.fullmatch(r"([0-9]+)\.(.+)", name)):
            raise bad("optimizer.safetensors", f"{name!r} is not <parameter index>.<key>")
        optimizer.setdefault(int(index_key[1]), {})[index_key[2]] = tensor
    return Snapshot(**{key: state[key] for key in _SCALARS}, model=tensors("model.safetensors"), optimizer=optimizer,
                    losses=[rank["loss"] for rank in state["ranks"]], best=state["best"],
                    best_model=tensors(BEST_FILE) if has_best else None, path=path)


def load_latest(run_dir: Path, warn: Callable[[str], Any] = print) -> Snapshot | None:
    """The newest checkpoint of ``run_dir`` that loads completely, each newer one reported
    through ``warn``; None when there is none. When there are checkpoints and none loads, a
    CheckpointError in one line naming each (the first three) and why: never a silent start
    from step 0 that would replace them."""
    errors = []
    for path in list_checkpoints(run_dir):
        try:
            snap = load_checkpoint(path)
        except CheckpointError as e:
            errors.append(str(e))
            continue
        for e in errors:
            warn(f"warning: skipping damaged checkpoint: {e}")
        return snap
    if not errors:
        return None
    root = Path(run_dir) / CHECKPOINTS
    shown = "; ".join(e.replace(f"{root}{os.sep}", "") for e in errors[:3])
    more = f"; and {len(errors) - 3} more" if len(errors) > 3 else ""
    raise CheckpointError(
        f"{root}: none of its {len(errors)} checkpoint(s) loads ({shown}{more}); nothing was changed. "
        "To train this run again from step 0 (they are kept aside as checkpoints.old-N), run with --resume never")


# --------------------------------------------------------------------------------------
# Collectives: every rank calls these at the same point. Rank 0 decides or writes and every
# rank gets the same outcome (``Dist.on_main``): an error is raised on all ranks together.


def save(dist: Dist, run: RunDir, cfg: Config, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         train_state: dict[str, Any], tracking: dict[str, Any],
         best_model: dict[str, torch.Tensor] | None = None) -> Path:
    """Checkpoint the run as it stands: ``train_state`` is this rank's ``TrainState.state_dict()``
    (its ``best``, if any, goes with ``best_model``, the best model's weights); the loss sums of
    every rank are gathered, and rank 0 writes into ``run`` while it still holds it
    (``RunDir.check_held``: what it raises is raised on every rank, and nothing is written)."""
    snap = Snapshot(**{k: train_state[k] for k in ("step", "epoch", "batch_in_epoch")}, world_size=dist.world_size,
                    global_batch_size=cfg.train.global_batch_size, model=model.state_dict(),
                    optimizer=optimizer.state_dict()["state"], losses=dist.gather_object(train_state["loss"]),
                    tracking=tracking, config=cfg.to_dict(), best=train_state.get("best"), best_model=best_model,
                    train_time_s=train_state.get("train_time_s", 0.0))

    def write() -> Path:
        run.check_held()
        try:
            return save_checkpoint(run.root, snap, cfg.checkpoint.keep_last)
        except OSError as e:
            raise CheckpointError(f"cannot write checkpoint in {run.root / CHECKPOINTS}: {e.strerror or e}") from None

    return dist.on_main(write)


def resume(dist: Dist, run_dir: Path, resume: str, global_batch_size: int) -> Snapshot | None:
    """The checkpoint that ``--resume`` names, read on every rank; None to start fresh.

    ``resume``: ``auto`` (``load_latest``: the newest that loads, if any), ``never`` (refused
    when the run directory holds a checkpoint that loads; checkpoints none of which loads are
    kept aside as ``checkpoints.old-N``), or the path of a checkpoint directory.
    """
    def choose() -> str | None:
        # Rank 0 loads it completely before naming it: every rank then loads one that loads.
        if resume == "never":
            try:
                if load_latest(run_dir, warn=lambda _: None) is not None:
                    raise ConfigError(f"--resume never: {Path(run_dir) / CHECKPOINTS} already holds checkpoints; "
                                      "use another --run-dir or --resume auto")
            except CheckpointError:  # none loads: kept, out of the new run's way
                set_aside(Path(run_dir) / CHECKPOINTS, "checkpoints")
            return None
        snap = (load_latest(run_dir, lambda m: print(m, flush=True)) if resume == "auto"
                else load_checkpoint(Path(resume)))
        if snap is None:
            return None
        # Another number of processes is fine: the training trajectory does not depend on it (see
        # data.TrainBatches); another global batch would change every batch from here on.
        if snap.global_batch_size != global_batch_size:
            raise ConfigError(
                f"{snap.path}: written with train.global_batch_size {snap.global_batch_size}; this run has "
                f"{global_batch_size}, which would change every batch from here on. Resume with the same global "
                "batch, or start a new run with another --run-dir")
        return str(snap.path)

    path = dist.on_main(choose)
    return None if path is None else load_checkpoint(Path(path))


def finished(dist: Dist, run: RunDir, cfg: Config) -> dict[str, Any] | None:
    """The summary of a run that ``--resume auto`` has nothing left to train in (said in one
    line), for every rank; None to go on as usual. Decided on rank 0 while it holds the lock,
    before any tracker or data exists, so nothing is written. Finished: summary.json and
    model.safetensors are there, the summary is of the newest checkpoint's step (its job did its
    final writes), and that step ends the run under ``cfg`` with no key of the trajectory changed."""

    def decide() -> dict[str, Any] | None:
        summary, newest = read_summary(run), list_checkpoints(run.root)[:1]
        if summary is None or not run.model.is_file() or not newest:
            return None
        try:
            snap = load_checkpoint(newest[0])
        except CheckpointError:
            return None
        t = cfg.train
        at_end = bool(t.max_steps and snap.step >= t.max_steps) or (snap.batch_in_epoch == 0 and snap.epoch >= t.epochs)
        if summary["steps"] != snap.step or not at_end or trajectory_changes(snap.config, cfg):
            return None
        best = summary.get("best_test_acc") if summary.get("best_selected_by") == "val_acc" else None
        best = f" (best by val_acc: {100 * best:.2f}%)" if isinstance(best, float) and math.isfinite(best) else ""
        print(f"already finished: {run.root} at step {snap.step}: test accuracy {100 * summary['final_test_acc']:.2f}%"
              f"{best}, model {run.model}; nothing was changed (to train it further: more train.epochs with "
              "--allow-config-change; to train anew: another --run-dir)", flush=True)
        return summary

    return dist.on_main(decide)


def restore(snap: Snapshot, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load ``snap``'s weights into ``model`` and its tensors into ``optimizer``, which keeps its
    own hyper-parameters (the config's). A checkpoint of another model (other layer names,
    shapes or number of parameters) is a CheckpointError naming the file, raised on every rank
    alike (they all restore the same snapshot into the same model)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    name, what = "model.safetensors", "model"
    try:
        model.load_state_dict(snap.model)
        name, what = "optimizer.safetensors", "optimizer"
        for index, tensors in snap.optimizer.items():  # optimizer.load_state_dict checks neither
            want = tuple(params[index].shape) if index < len(params) else f"none of the {len(params)} parameters"
            for key, value in tensors.items():
                if tuple(value.shape) != want:
                    raise ValueError(f"{index}.{key} of shape {tuple(value.shape)} for {want}")
        # The saved tensors go to this optimizer's parameters (moved to their device and dtype);
        # its own param_groups keep its hyper-parameters.
        optimizer.load_state_dict({"state": snap.optimizer, "param_groups": optimizer.state_dict()["param_groups"]})
        name, what = BEST_FILE, "model"  # loaded into a model only at the end: checked now, as the others
        theirs = {k: tuple(v.shape) for k, v in snap.best_model.items()} if snap.best_model is not None else shapes
        if theirs != shapes:
            raise ValueError(f"tensors {sorted(theirs.items())} for a model of {sorted(shapes.items())}")
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, ValueError, KeyError...
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        where = (snap.path or Path("checkpoint")) / name
        raise CheckpointError(f"{where}: does not fit this run's {what} ({reason})") from None
