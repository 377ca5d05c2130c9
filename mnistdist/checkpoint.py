"""Checkpoints: atomic, verified, and free of pickle.

Layout of one checkpoint, ``RUN_DIR/checkpoints/step-00000600/``:

    model.safetensors       the model's state dict (also loadable by ``mnistdist evaluate``)
    optimizer.safetensors   the optimizer's tensors: each parameter's SGD momentum buffer
    state.json              step, epoch, position in the epoch, world size, global batch, each
                            rank's loss sums, the W&B run id, the config, the run's training
                            time so far (over jobs: summary.json's), the best model's
                            validation result
    best.safetensors        the best model's weights (only with a validation set, once it was
                            evaluated): a resumed run keeps the right best, in any run directory
    manifest.json           size and sha256 of every file above: written last

That is all a run needs to continue exactly. No random number decides anything after the
start (the sampler's shuffle is seeded by ``train.seed`` + epoch, the model has no dropout), so
no RNG state is kept; the optimizer's hyper-parameters are the config's (the learning rate is
set before every step from the schedule), so only its tensors are.

Commit protocol: everything is written into ``checkpoints/.tmp-step-...``, fsynced, the manifest
last, then the directory is renamed into place and ``checkpoints/`` is fsynced. A directory
without a manifest whose checksums match is never loaded, so a save killed half-way leaves the
previous checkpoint as the newest valid one. Older checkpoints are pruned only after the new one
is in place. Replacing a directory of the same step never leaves the step without a copy (see
``save_checkpoint``).

Loading trusts nothing: the manifest may name only the files above, each must match its size
and sha256, and every field of ``state.json`` is checked for its type and range before use.
Whatever is wrong is a ``CheckpointError`` naming the file; auto-resume skips such a checkpoint
as it skips a damaged one. Nothing here unpickles: tensors go through safetensors, the rest
through JSON. Checkpoints of the earlier formats still load (the first also held each rank's
RNG state, in ``ranks.safetensors`` and ``state.json``, which is not read; neither has a best
model).
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

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from mnistdist.config import Config, ConfigError, trajectory_changes
from mnistdist.metrics import LossMeter
from mnistdist.rundir import CHECKPOINTS, RunDir, fsync_dir, read_summary, set_aside

if TYPE_CHECKING:
    from mnistdist.distributed import Dist

MANIFEST = "manifest.json"
FORMAT = "mnistdist-checkpoint-3"
FILES = ("model.safetensors", "optimizer.safetensors", "state.json")
"""The files every checkpoint has besides its manifest."""
BEST_FILE = "best.safetensors"
"""The one optional file: listed in the manifest exactly when state.json has a ``best``."""
OLD_FORMATS = {"mnistdist-checkpoint-1": (*FILES, "ranks.safetensors"), "mnistdist-checkpoint-2": FILES}
"""Earlier formats that still load, with the files their manifests list."""
_STEP = re.compile(r"step-[0-9]+")
_TRASH = ".trash-"
_TRASHED_STEP = re.compile(r"\.trash-(step-[0-9]+)-[0-9]+")
"""The old copy of step N moved aside while a save replaces it (see ``save_checkpoint``)."""
_LOSS_KEYS = ("window_sum", "window_steps", "epoch_sum")
"""What ``metrics.LossMeter.state_dict()`` saves per rank, and ``load_state_dict`` reads."""
_SHA256 = re.compile(r"[0-9a-f]{64}")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the directory and the file."""


@dataclass
class Snapshot:
    """A checkpoint in memory: what ``save_checkpoint`` writes and ``load_checkpoint`` reads."""

    step: int
    """Optimizer steps done since the start of the run."""
    epoch: int
    """The epoch in progress (0-based)."""
    batch_in_epoch: int
    """Batches of ``epoch`` already trained; resume continues with the next one."""
    world_size: int
    global_batch_size: int
    model: dict[str, torch.Tensor]
    optimizer: dict[int, dict[str, torch.Tensor]]
    """``optimizer.state_dict()["state"]``: each parameter's tensors, by parameter index."""
    losses: list[dict[str, Any]]
    """Each rank's ``LossMeter.state_dict()``, in rank order."""
    tracking: dict[str, Any] = field(default_factory=dict)
    """E.g. the W&B run id, so a resumed job continues the same W&B run."""
    config: dict[str, Any] = field(default_factory=dict)
    """The resolved config of the run that wrote it."""
    train_time_s: float = 0.0
    """The run's training time up to this step, over all the jobs that trained it."""
    best: dict[str, Any] | None = None
    """The best model's validation result (``metrics.Best.state_dict()``); None without one."""
    best_model: dict[str, torch.Tensor] | None = None
    """The best model's state dict; present exactly when ``best`` is."""
    path: Path | None = None
    """The directory it was read from (None before it is saved)."""

    def train_state(self, rank: int, world_size: int) -> dict[str, Any]:
        """What rank ``rank`` of ``world_size`` resumes with: ``TrainState.load_state_dict``'s
        argument (the loss sums re-split when the world size differs: ``LossMeter.for_rank``)."""
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "loss": LossMeter.for_rank(self.losses, rank, world_size), "best": self.best,
                "train_time_s": self.train_time_s}


# --------------------------------------------------------------------------------------
# Saving


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:08d}"


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


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """``tensors`` as a safetensors file, fsynced. Written by ``open`` like every other file of a
    run, so its permissions follow the umask (safetensors' own ``save_file`` creates it 0600:
    teammates on a shared file system could not read the weights)."""
    try:
        data = safetensors_bytes({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    except SafetensorError as e:
        raise OSError(f"{path}: {e}") from e
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


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

    _save_tensors(tmp / "model.safetensors", snap.model)
    _save_tensors(tmp / "optimizer.safetensors",  # SGD's state is tensors only
                  {f"{index}.{key}": value for index, tensors in snap.optimizer.items() for key, value in tensors.items()})
    if snap.best_model is not None:
        _save_tensors(tmp / BEST_FILE, snap.best_model)
    _write_json(tmp / "state.json", {
        "format": FORMAT, "step": snap.step, "epoch": snap.epoch, "batch_in_epoch": snap.batch_in_epoch,
        "world_size": snap.world_size, "global_batch_size": snap.global_batch_size,
        "ranks": [{"loss": loss} for loss in snap.losses], "tracking": snap.tracking, "config": snap.config,
        "best": snap.best if snap.best_model is not None else None, "train_time_s": snap.train_time_s,
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
        # (Linux's atomic swap, renameat2 RENAME_EXCHANGE, is not on every filesystem, so a
        # fallback needing this same recovery would remain; one mechanism everywhere.)
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
    for leftover in root.glob(".t*-*") if root.is_dir() else ():
        if not leftover.name.startswith((".tmp-", _TRASH)) or leftover.name.endswith(f"-{os.getpid()}"):
            continue
        trashed = _TRASHED_STEP.fullmatch(leftover.name)
        if trashed and not (root / trashed[1]).exists():
            # The old copy of a step whose replacement died between its two renames (see
            # save_checkpoint): the only copy of that step, so it gets its name back (if that
            # fails, it is still listed under its trash name and the next save tries again).
            with contextlib.suppress(OSError):
                os.rename(leftover, root / trashed[1])
                fsync_dir(root)
        else:
            shutil.rmtree(leftover, ignore_errors=True)
    if keep_last > 0:
        for old in list_checkpoints(run_dir)[keep_last:]:
            shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------
# Finding and loading


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Committed-looking checkpoint directories, newest first (validity not checked).

    Besides ``step-N``, the old copy ``.trash-step-N-PID`` of a step counts while no ``step-N``
    exists: a save that replaced step N died between its two renames (see save_checkpoint)."""
    root = Path(run_dir) / CHECKPOINTS
    found = []
    for p in root.iterdir() if root.is_dir() else ():
        trashed = _TRASHED_STEP.fullmatch(p.name)
        name = trashed[1] if trashed else p.name
        if p.is_dir() and _STEP.fullmatch(name) and not (trashed and (root / name).exists()):
            found.append((int(name[len("step-"):]), p.name, p))
    return [p for *_, p in sorted(found, reverse=True)]


class _Malformed(ValueError):
    """A field of a checkpoint file with the wrong type or value; the message says which."""


def _check(ok: Any, what: str) -> None:
    if not ok:
        raise _Malformed(what)


def _is_int(value: Any, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_format(value: Any) -> bool:
    return isinstance(value, str) and (value == FORMAT or value in OLD_FORMATS)


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


def _check_manifest(manifest: Any) -> None:
    """Every field of a manifest has its type, and it lists exactly its format's files."""
    _check(isinstance(manifest, dict), "not a JSON object")
    _check(_is_format(manifest.get("format")), f"format {manifest.get('format')!r}, expected {FORMAT}")
    names = OLD_FORMATS.get(manifest["format"], FILES)
    allowed = names if manifest["format"] in OLD_FORMATS else (*names, BEST_FILE)
    _check(_is_int(manifest.get("step")), "step: not an integer >= 0")
    files = manifest.get("files")
    _check(isinstance(files, dict), "files: not an object")
    for name, meta in files.items():
        # Only the checkpoint's own files, by plain name: nothing else is ever opened, so a
        # manifest cannot make verify read (or vouch for) a file outside its directory.
        _check(name in allowed, f"files: {name!r} is not a file of a checkpoint ({', '.join(allowed)})")
        _check(isinstance(meta, dict) and _is_int(meta.get("bytes")) and isinstance(meta.get("sha256"), str)
               and _SHA256.fullmatch(meta["sha256"]),
               f"files: {name}: not an object of bytes (an integer >= 0) and sha256 (64 hex digits)")
    missing = [name for name in names if name not in files]
    _check(not missing, f"files: {', '.join(missing)} not listed")


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
        _check_manifest(manifest)
    except _Malformed as e:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({e})") from None
    for name, meta in manifest["files"].items():
        file = path / name
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


def _check_state(state: Any, manifest_step: int, has_best_file: bool = False) -> None:
    """Every field of state.json that resuming reads has its type and range; ``best`` is there
    exactly when the manifest lists the best model's weights (``has_best_file``)."""
    _check(isinstance(state, dict), "not a JSON object")
    _check(_is_format(state.get("format")), f"format {state.get('format')!r}, expected {FORMAT}")
    for key, minimum in (("step", 0), ("epoch", 0), ("batch_in_epoch", 0), ("world_size", 1), ("global_batch_size", 1)):
        _check(_is_int(state.get(key), minimum), f"{key}: not an integer >= {minimum}")
    _check(state["step"] == manifest_step, f"step {state['step']}, but the manifest says {manifest_step}")
    ranks = state.get("ranks")
    _check(isinstance(ranks, list) and len(ranks) == state["world_size"],
           f"ranks: not a list of world_size ({state['world_size']}) entries")
    for r, rank in enumerate(ranks):
        loss = rank.get("loss") if isinstance(rank, dict) else None
        _check(isinstance(loss, dict) and all(_is_number(loss.get(k)) for k in _LOSS_KEYS)
               and _is_int(loss["window_steps"]),
               f"ranks[{r}].loss: not an object of the finite numbers {', '.join(_LOSS_KEYS)}")
    tracking = state.get("tracking", {})
    _check(isinstance(tracking, dict) and isinstance(tracking.get("wandb_run_id"), (str, type(None))),
           "tracking: not an object with a string or null wandb_run_id")
    _check(isinstance(state.get("config", {}), dict), "config: not an object")
    _check(_is_number(state.get("train_time_s", 0.0)) and state.get("train_time_s", 0.0) >= 0,
           "train_time_s: not a finite number >= 0")  # (absent from checkpoints written before it was kept)
    best = state.get("best")
    _check((best is not None) == has_best_file,
           f"best: {'null' if best is None else 'set'}, but the manifest {'lists' if has_best_file else 'has no'} "
           f"{BEST_FILE}")
    if best is not None:
        _check(isinstance(best, dict) and all(_is_int(best.get(k)) for k in ("step", "epoch", "val_correct"))
               and _is_int(best.get("val_total"), 1) and all(_is_number(best.get(k)) for k in ("val_acc", "val_loss")),
               "best: not an object of the integers step, epoch, val_correct, val_total and the finite numbers "
               "val_acc, val_loss")


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    """A safetensors file of finite tensors (no checkpoint is ever saved with NaN/Inf)."""
    try:
        tensors = load_file(str(file))
    except Exception as e:  # noqa: BLE001 - the checksum matched, but the content is not ours
        raise CheckpointError(f"{file}: unreadable checkpoint content ({type(e).__name__}: {e})") from None
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{file}: unreadable checkpoint content ({key} holds NaN or Inf, "
                                  "which no saved checkpoint does)")
    return tensors


def load_checkpoint(path: Path) -> Snapshot:
    """Verify, then read a checkpoint (safetensors and JSON only). Anything wrong with it is a
    CheckpointError naming the file."""
    path = Path(path)
    manifest = verify(path)
    step, has_best_file = manifest["step"], BEST_FILE in manifest["files"]
    state = _read_json(path / "state.json", "unreadable checkpoint content")
    try:
        _check_state(state, step, has_best_file)
    except _Malformed as e:
        raise CheckpointError(f"{path / 'state.json'}: unreadable checkpoint content ({e})") from None
    model = _load_tensors(path / "model.safetensors")
    optimizer: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in _load_tensors(path / "optimizer.safetensors").items():
        index, _, key = name.partition(".")  # "<parameter index>.<key>", e.g. "3.momentum_buffer"
        if not (index.isascii() and index.isdigit() and key):
            raise CheckpointError(f"{path / 'optimizer.safetensors'}: unreadable checkpoint content "
                                  f"({name!r} is not <parameter index>.<key>)")
        optimizer.setdefault(int(index), {})[key] = tensor
    return Snapshot(step=step, epoch=state["epoch"], batch_in_epoch=state["batch_in_epoch"],
                    world_size=state["world_size"], global_batch_size=state["global_batch_size"],
                    model=model, optimizer=optimizer, losses=[rank["loss"] for rank in state["ranks"]],
                    tracking=state.get("tracking", {}), config=state.get("config", {}),
                    train_time_s=state.get("train_time_s", 0.0), best=state.get("best"),
                    best_model=_load_tensors(path / BEST_FILE) if has_best_file else None, path=path)


def load_newest(run_dir: Path) -> tuple[Snapshot | None, list[CheckpointError]]:
    """The newest checkpoint that loads completely (None if none does), and why each newer one
    (every one, when none loads) did not."""
    errors = []
    for path in list_checkpoints(run_dir):
        try:
            return load_checkpoint(path), errors
        except CheckpointError as e:
            errors.append(e)
    return None, errors


def load_latest(run_dir: Path, warn: Any = print) -> Snapshot | None:
    """The newest checkpoint that loads completely; the others are reported through ``warn``."""
    snap, errors = load_newest(run_dir)
    for e in errors:
        warn(f"warning: skipping damaged checkpoint: {e}")
    return snap


def none_loads(run_dir: Path, errors: list[CheckpointError]) -> CheckpointError:
    """The error of a run directory whose checkpoints all fail to load: one line naming each
    (the first few) and why, and the way to start the run over."""
    root = Path(run_dir) / CHECKPOINTS
    shown = [str(e).replace(f"{root}{os.sep}", "") for e in errors[:3]]
    more = f"; and {len(errors) - 3} more" if len(errors) > 3 else ""
    return CheckpointError(
        f"{root}: none of its {len(errors)} checkpoint(s) loads ({'; '.join(shown)}{more}); nothing was changed. "
        "To train this run again from step 0 (they are kept aside as checkpoints.old-N), run with --resume never")


# --------------------------------------------------------------------------------------
# Final weights


def save_model(model: torch.nn.Module, path: Path) -> None:
    """Write ``model``'s state dict to ``path`` via a temporary file and an atomic rename."""
    save_weights(model.state_dict(), path)


def save_weights(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a state dict to ``path`` (with ``metadata`` in the safetensors header) via a
    temporary file and an atomic rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    _save_tensors(tmp, tensors, metadata)  # fsyncs the file
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


def save(dist: Dist, run_dir: Path, cfg: Config, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         train_state: dict[str, Any], tracking: dict[str, Any], best_model: dict[str, torch.Tensor] | None = None,
         before_writing: Callable[[], None] | None = None) -> Path:
    """Checkpoint the run as it stands: ``train_state`` is this rank's ``TrainState.state_dict()``
    (its ``best``, if any, goes with ``best_model``, the best model's weights); the loss sums of
    every rank are gathered, and rank 0 writes, after ``before_writing()`` (e.g.
    ``RunDir.check_held``): what it raises is raised on every rank, and nothing is written."""
    snap = Snapshot(step=train_state["step"], epoch=train_state["epoch"], batch_in_epoch=train_state["batch_in_epoch"],
                    world_size=dist.world_size, global_batch_size=cfg.train.global_batch_size,
                    model=model.state_dict(), optimizer=optimizer.state_dict()["state"],
                    losses=dist.gather_object(train_state["loss"]), tracking=tracking, config=cfg.to_dict(),
                    best=train_state.get("best") if best_model is not None else None, best_model=best_model,
                    train_time_s=train_state.get("train_time_s", 0.0))

    def write() -> Path:
        if before_writing is not None:
            before_writing()
        try:
            return save_checkpoint(run_dir, snap, cfg.checkpoint.keep_last)
        except OSError as e:
            raise CheckpointError(f"cannot write checkpoint in {Path(run_dir) / CHECKPOINTS}: {e.strerror or e}") from None

    return dist.on_main(write)


def resume(dist: Dist, run_dir: Path, resume: str, global_batch_size: int) -> Snapshot | None:
    """The checkpoint that ``--resume`` names, read on every rank; None to start fresh.

    ``resume``: ``auto`` (the newest valid checkpoint in the run directory, if any; damaged ones
    are skipped with a warning, but when there are checkpoints and none loads, that is a
    CheckpointError naming them: the run never silently starts over), ``never`` (refused when
    the run directory holds a checkpoint that loads; checkpoints none of which loads are kept
    aside as ``checkpoints.old-N``), or the path of a checkpoint directory.
    """

    chosen: list[Snapshot] = []  # rank 0 keeps the snapshot it validated, instead of reading it twice

    def choose() -> str | None:
        # Rank 0 loads the checkpoint completely (verification and schema checks included)
        # before naming it, so the path every rank then loads is one that loads: a bad one is
        # skipped here (auto) or raised here on every rank together (a named path).
        if resume == "never":
            if list_checkpoints(run_dir):
                if load_newest(run_dir)[0] is not None:
                    raise ConfigError(f"--resume never: {Path(run_dir) / CHECKPOINTS} already holds checkpoints; "
                                      "use another --run-dir or --resume auto")
                set_aside(Path(run_dir) / CHECKPOINTS, "checkpoints")  # none loads: kept, out of the new run's way
            return None
        if resume == "auto":
            snap, errors = load_newest(run_dir)
            if snap is None and errors:
                raise none_loads(run_dir, errors)
            for e in errors:
                print(f"warning: skipping damaged checkpoint: {e}", flush=True)
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


def finished(dist: Dist, run: RunDir, cfg: Config) -> dict[str, Any] | None:
    """The summary of a finished run that ``--resume auto`` has nothing left to train in (after
    saying so in one line), for every rank; None to go on as usual.

    Decided on rank 0 while it holds the run directory's lock (no other job changes the files
    meanwhile), before any tracker or data exists, so a finished run gets no new W&B run and no
    file rewritten. Finished means: summary.json and model.safetensors are there; the summary is
    of the newest checkpoint's step (the job that wrote that checkpoint also completed its final
    writes); and that step ends the run under ``cfg``: every one of train.epochs done, or
    train.max_steps reached. Anything else goes the usual way: a damaged newest checkpoint is
    handled by resuming, and a changed key of the trajectory (more epochs, a validation set...)
    is refused there, naming it, unless ``allow_config_change``: then the run resumes under the
    new config (a run that still ends here trains nothing, and its results are written anew).
    """

    def decide() -> dict[str, Any] | None:
        summary = read_summary(run)
        newest = list_checkpoints(run.root)[:1]
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
    where = snap.path if snap.path is not None else Path("checkpoint")
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def load_optimizer() -> None:
        for index, tensors in snap.optimizer.items():  # load_state_dict checks neither
            if index >= len(params):
                raise ValueError(f"state of parameter {index}, but the model has {len(params)} parameters")
            for key, value in tensors.items():
                if value.shape != params[index].shape:
                    raise ValueError(f"{key} of shape {tuple(value.shape)} for a parameter of shape "
                                     f"{tuple(params[index].shape)}")
        # This optimizer's own param_groups: the saved tensors go to its parameters (moved to
        # their device and dtype by load_state_dict), its hyper-parameters stay as they are.
        optimizer.load_state_dict({"state": snap.optimizer, "param_groups": optimizer.state_dict()["param_groups"]})

    def check_best() -> None:  # loaded into a model only at the end: checked now, as the others are
        if snap.best_model is None:
            return
        ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        theirs = {k: tuple(v.shape) for k, v in snap.best_model.items()}
        if ours != theirs:
            raise ValueError(f"tensors {sorted(theirs.items())} for a model of {sorted(ours.items())}")

    for name, what, load in (("model.safetensors", "model", lambda: model.load_state_dict(snap.model)),
                             ("optimizer.safetensors", "optimizer", load_optimizer),
                             (BEST_FILE, "model", check_best)):
        try:
            load()
        except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, ValueError, KeyError...
            reason = " ".join(str(e).split())[:300] or type(e).__name__
            raise CheckpointError(f"{where / name}: does not fit this run's {what} ({reason})") from None
