"""The training loop, read top to bottom.

``run(cfg, run_dir, resume)``: start the process group -> ``fit`` -> tear it down.
``fit``: data -> model -> resume -> for each epoch: train its steps, evaluate, log, checkpoint
-> final weights, summary and plots.

Every rank runs the same steps in the same order, so the collectives inside them (DDP's
gradient all-reduce, the stop agreement, the loss and evaluation sums, checkpoint saves) always
match up. Side effects (files, W&B, prints, progress output) happen on the main process only.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mnistdist import checkpoint, rundir
from mnistdist.checkpoint import Snapshot
from mnistdist.config import Config, ConfigError, to_yaml, trajectory_changes
from mnistdist.data import MnistTensors, TrainBatches, eval_shard, load_tensors, normalize, prepare_mnist
from mnistdist.distributed import Dist, warn_main
from mnistdist.metrics import EvalCounts, LossMeter, per_sample_loss
from mnistdist.model import MLP
from mnistdist.progress import Progress
from mnistdist.rundir import RunDir
from mnistdist.schedule import lr_at
from mnistdist.signals import Interrupted, NonFiniteLoss, Preempted, StopSignals
from mnistdist.step import EagerStep, GraphedStep
from mnistdist.tracking import Tracker


@dataclass
class Position:
    """Where training stands; with the weights, optimizer, RNG and loss sums, a checkpoint."""

    step: int = 0
    """Optimizer steps done since the start of the run (the global step of every log)."""
    epoch: int = 0
    """The epoch in progress, 0-based."""
    batch_in_epoch: int = 0
    """Batches of ``epoch`` done; a resumed run continues with the next batch."""


def run(cfg: Config, run_dir: str | Path | None = None, resume: str = "auto",
        allow_config_change: bool = False) -> dict[str, Any]:
    """Train according to ``cfg`` on however many processes were launched; return the summary.

    ``resume``: ``auto`` (newest valid checkpoint in the run directory, if any), ``never``, or
    the path of a checkpoint directory. A checkpoint written with other values of keys that
    change the trajectory (``config.TRAJECTORY_KEYS``) is refused unless ``allow_config_change``.
    """
    # Stop requests (SIGTERM, SIGUSR1, Ctrl-C) are recorded from the first moment to the last:
    # one during start-up stops after the first step, one after training is ignored.
    with StopSignals() as signals:
        dist = Dist(cfg.dist)
        try:
            with rundir.claim(run_dir, dist) as run:
                return fit(cfg, dist, run, resume, signals, allow_config_change)
        except (Preempted, NonFiniteLoss):
            # Every rank stopped at the same step. Leave together, once rank 0 has finished W&B
            # (bounded by tracking.finish_timeout_s): a rank that exits first makes torchrun
            # SIGTERM the others.
            dist.barrier()
            raise
        finally:
            dist.close()


def fit(cfg: Config, dist: Dist, run: RunDir, resume: str, signals: StopSignals,
        allow_config_change: bool = False) -> dict[str, Any]:
    """Train and evaluate; return the summary. Collective: every rank calls it."""
    t = cfg.train

    # Data: MNIST checked (downloaded once per node), held as tensors on the training device;
    # this rank's batches of every epoch come from torch's DistributedSampler.
    prepare_mnist(cfg.data, dist.is_local_main, dist.barrier)
    tensors = load_tensors(cfg.data.root).to(dist.device)
    per_process_batch = t.global_batch_size // dist.world_size  # divisibility was validated
    batches = TrainBatches(cfg.data, tensors, per_process_batch, dist.rank, dist.world_size, t.seed, dist.device)
    steps_per_epoch = len(batches)
    # The LR schedule spans all epochs; train.max_steps only stops early, so a short run is an
    # exact prefix of the full one.
    schedule_steps = steps_per_epoch * t.epochs
    last_step = min(schedule_steps, t.max_steps) if t.max_steps else schedule_steps

    # Model and optimizer: the same seed gives every rank the same initial weights.
    dist.seed(t.seed)
    model = build_model(cfg, dist.device)
    model, optimizer = dist.prepare(model, build_optimizer(cfg, model))

    # Fresh, or continue where a checkpoint left off (the same checkpoint on every rank).
    pos, meter = Position(), LossMeter(dist.device, getattr(torch, cfg.model.dtype))
    snap = checkpoint.resume(dist, run.root, resume, t.global_batch_size)
    changes = config_changes(snap, cfg, allow_config_change)  # ConfigError unless allowed
    if snap is not None:
        checkpoint.restore(snap, dist.unwrap(model), optimizer, dist.rank)
        set_hyperparameters(optimizer, cfg)  # the config's values win over the checkpoint's
        pos = Position(snap.step, snap.epoch, snap.batch_in_epoch)
        meter.load_state_dict(LossMeter.for_rank([r["loss"] for r in snap.ranks], dist.rank, dist.world_size))
    if dist.is_main:
        rundir.start(run, to_yaml(cfg), resumed_step=pos.step if snap else None)

    step = build_step(cfg, dist, model, optimizer, meter, batches, pos, signals)
    dist.print(
        f"training on {dist.world_size} process(es), {dist.device.type}, backend {dist.backend}; "
        f"global batch {t.global_batch_size} = {dist.world_size} x {per_process_batch}; "
        f"{steps_per_epoch} steps/epoch; run dir {run.root}"
    )
    if snap is not None:  # a line of its own: paths can be long, and log lines stay short
        dist.print(f"resumed from {snap.path} at step {pos.step}"
                   + (f" (written by {snap.world_size} process(es))" if snap.world_size != dist.world_size else ""))

    run_id = snap.tracking.get("wandb_run_id") if snap else None
    # After a stop the other ranks wait at a barrier (bounded by dist.timeout_s) while the main
    # process finishes W&B: its wait must end well before theirs.
    tracking = dataclasses.replace(cfg.tracking,
                                   finish_timeout_s=min(cfg.tracking.finish_timeout_s, 0.8 * cfg.dist.timeout_s))
    tracker = Tracker(tracking, run, cfg.to_dict(), enabled=dist.is_main, run_id=run_id,
                      resumed_step=pos.step if snap else None)
    if changes:
        dist.print(f"continuing with changed config (--allow-config-change): "
                   + ", ".join(f"{k} {old!r} -> {new!r}" for k, old, new in changes))
        tracker.log({"step": pos.step, "config_changes": {k: [old, new] for k, old, new in changes}})

    def save_checkpoint() -> Path:  # collective
        state = Snapshot(step=pos.step, epoch=pos.epoch, batch_in_epoch=pos.batch_in_epoch,
                         world_size=dist.world_size, global_batch_size=t.global_batch_size,
                         model=dist.unwrap(model).state_dict(), optimizer=optimizer.state_dict(), ranks=[],
                         config=cfg.to_dict(), tracking={"wandb_run_id": tracker.run_id})
        return checkpoint.save(dist, run.root, cfg.checkpoint.keep_last, state, meter.state_dict())

    counts: EvalCounts | None = None
    best_acc, train_time_s = 0.0, 0.0
    progress = Progress(cfg.tracking.progress, dist.is_main, t.epochs, last_step)  # bar, lines or off
    with tracker, progress, dist.diagnose_failures(run.heartbeat, lambda: f"at step {pos.step}"):
        # (A run stopped right after the last batch of an epoch still owes its evaluation.)
        while pos.step < last_step or pos.batch_in_epoch == steps_per_epoch:
            # -- train the rest of this epoch ---------------------------------------------
            epoch_start, steps_before, window_start = time.perf_counter(), pos.step, time.perf_counter()
            progress.start_epoch(pos.epoch, steps=min(steps_per_epoch - pos.batch_in_epoch, last_step - pos.step))
            stop = False
            for x, y in batches.epoch(pos.epoch, start_batch=pos.batch_in_epoch):
                if pos.step >= last_step:
                    break
                lr = lr_at(pos.step, schedule_steps, t.lr, t.lr_schedule, t.warmup_steps)
                stop = step(x, y, lr, pos.step + 1)  # forward, backward (DDP all-reduce), NaN check, update
                pos.step += 1
                pos.batch_in_epoch += 1
                meter.window_steps += 1
                progress.step()
                end_of_epoch = pos.batch_in_epoch == steps_per_epoch or pos.step == last_step
                if pos.step % t.log_every_steps == 0 or end_of_epoch:
                    progress.log(log_training(dist, tracker, meter, pos, lr, t.global_batch_size, window_start))
                    window_start = time.perf_counter()
                if stop:
                    break
                every = cfg.checkpoint.every_steps
                if every and pos.step % every == 0 and not end_of_epoch:  # epoch ends save anyway
                    save_checkpoint()
            epoch_time_s = time.perf_counter() - epoch_start
            train_time_s += epoch_time_s
            if stop:
                where = save_checkpoint()
                why = signals.name if signals.received else "a stop signal on another rank"
                stopped = Interrupted if signals.received == signal.SIGINT else Preempted
                raise stopped(f"stopped by {why} after step {pos.step}; checkpoint written to {where}; "
                              "run again with the same --run-dir to resume")

            # -- evaluate, log, checkpoint --------------------------------------------------
            # Each rank's loss is a mean over an equal-sized batch, so the mean over ranks is
            # the mean over the global batch.
            train_loss = (dist.all_reduce_sum(meter.epoch_sum) / (dist.world_size * pos.batch_in_epoch)).item()
            counts = evaluate(cfg, dist, dist.unwrap(model), tensors)
            best_acc = max(best_acc, counts.accuracy)
            steps_done = pos.step - steps_before
            samples_per_s = steps_done * t.global_batch_size / epoch_time_s if steps_done else 0.0
            tracker.log({"epoch": pos.epoch + 1, "step": pos.step, **counts.as_record(),
                         "train_loss_epoch": train_loss, "epoch_time_s": epoch_time_s,
                         "samples_per_s": samples_per_s, "per_class_acc": counts.per_class_accuracy(),
                         "confusion": counts.confusion.tolist()})
            progress.epoch_end(pos.epoch, train_loss, counts, samples_per_s, epoch_time_s)  # the summary line
            if pos.batch_in_epoch == steps_per_epoch:
                pos.epoch, pos.batch_in_epoch = pos.epoch + 1, 0
                meter.epoch_sum.zero_()
            save_checkpoint()

        if counts is None:  # resumed from the final checkpoint: nothing left to train
            counts = evaluate(cfg, dist, dist.unwrap(model), tensors)
        summary = {
            "final_test_acc": counts.accuracy,
            "best_test_acc": max(best_acc, counts.accuracy),
            "final_test_loss": counts.mean_loss,
            "test_correct": counts.correct,
            "test_total": counts.total,
            "steps": pos.step,
            "epochs": pos.epoch,
            "train_time_s": train_time_s,
            "world_size": dist.world_size,
            "run_dir": str(run.root),
        }
        if dist.is_main:
            write_results(run, dist.unwrap(model), summary, counts, tracker, pos.step)
    dist.barrier()  # nobody exits (and tears down the group) while rank 0 still writes
    return summary


def config_changes(snap: Snapshot | None, cfg: Config, allowed: bool) -> list[tuple[str, Any, Any]]:
    """The trajectory keys whose values differ from the checkpoint's (the same on every rank):
    a ConfigError listing them, unless ``allowed``."""
    changes = trajectory_changes(snap.config, cfg) if snap is not None else []
    if changes and not allowed:
        raise ConfigError(f"{snap.path}: written with other values of keys that change training: "
                          + ", ".join(f"{k} {old!r} -> {new!r}" for k, old, new in changes)
                          + "; continue with the new values with --allow-config-change, or use another --run-dir")
    return changes


def log_training(dist: Dist, tracker: Tracker, meter: LossMeter, pos: Position, lr: float,
                 global_batch_size: int, window_start: float) -> dict[str, Any]:
    """Log the mean training loss since the last line (all-reduced: a sync point that every
    rank reaches at the same step) and start a new window. Returns the logged record."""
    steps = meter.window_steps
    loss = (dist.all_reduce_sum(meter.window_sum) / (dist.world_size * steps)).item()
    if not math.isfinite(loss):  # the same value on every rank: all stop together
        raise NonFiniteLoss(f"non-finite training loss in steps {pos.step - steps + 1}-{pos.step} "
                            "(the gradients were finite); lower train.lr or check the data")
    record = {"epoch": pos.epoch + 1, "step": pos.step, "train_loss": loss, "lr": lr,
              "samples_per_s": global_batch_size * steps / (time.perf_counter() - window_start)}
    tracker.log(record)
    meter.window_sum.zero_()
    meter.window_steps = 0
    return record


def write_results(run: RunDir, model: torch.nn.Module, summary: dict[str, Any], counts: EvalCounts,
                  tracker: Tracker, step: int) -> None:
    """Main process: the final weights, summary.json, the W&B summary and the plots."""
    checkpoint.save_model(model, run.model)
    rundir.write_summary(run, summary)
    tracker.summary({k: v for k, v in summary.items() if k != "run_dir"})
    from mnistdist.plots import write_run_plots  # matplotlib: imported only here

    try:
        paths = write_run_plots(run.root, confusion=counts.confusion.tolist())
    except Exception as e:  # noqa: BLE001 - a plot must never turn a finished training into a failure
        warn_main(f"could not write plots: {type(e).__name__}: {e}")
        return
    tracker.log_images({f"plots/{p.stem}": p for p in paths}, step=step)


# --------------------------------------------------------------------------------------
# Building blocks


def build_model(cfg: Config, device: torch.device | str = "cpu") -> MLP:
    """The MLP of ``cfg`` (final ReLU, dtype) on ``device``."""
    return MLP(final_relu=cfg.model.final_relu).to(device=device, dtype=getattr(torch, cfg.model.dtype))


def set_hyperparameters(optimizer: torch.optim.Optimizer, cfg: Config) -> None:
    """The config's SGD settings in every parameter group (``load_state_dict`` brings back the
    checkpoint's; the learning rate is set before every step from the schedule)."""
    for group in optimizer.param_groups:
        group.update(momentum=cfg.train.momentum, nesterov=cfg.train.nesterov, weight_decay=cfg.train.weight_decay)


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    t = cfg.train
    on_cuda = next(model.parameters()).is_cuda
    return torch.optim.SGD(
        model.parameters(), lr=t.lr, momentum=t.momentum, nesterov=t.nesterov, weight_decay=t.weight_decay,
        fused=True if on_cuda else None,  # one kernel for the whole update on GPUs
    )


def make_loss_fn(cfg: Config, model: torch.nn.Module, device: torch.device) -> Callable:
    """``(images, labels) -> mean loss``; compiled (and CUDA-graph captured with
    ``reduce-overhead``) when ``dist.compile`` asks for it and the device is a GPU."""
    kind = cfg.train.loss

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return per_sample_loss(model(x), y, kind).mean()

    if cfg.dist.compile == "off":
        return loss_fn
    if device.type != "cuda":
        # On a CPU the step is bound by the matrix products, which inductor's C++ code calls as
        # eager does: compiled/eager epoch time 1.0x on 2 cores, after 3-27 s of compiling, and
        # not bitwise (scripts/compile_cpu_check.py, docs/benchmarks.md). Not worth adopting.
        warn_main(f"dist.compile={cfg.dist.compile} is used on GPUs only; training eagerly on {device.type}")
        return loss_fn
    return torch.compile(loss_fn, mode=cfg.dist.compile)


def build_step(cfg: Config, dist: Dist, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               meter: LossMeter, batches: TrainBatches, pos: Position,
               signals: StopSignals) -> EagerStep | GraphedStep:
    """``step(x, y, lr, number) -> stop``: the eager step, or the CUDA-graph one when
    ``dist.cuda_graph`` asks and it can work."""
    eager = EagerStep(dist, model, optimizer, make_loss_fn(cfg, model, dist.device), meter,
                      stop_requested=lambda: signals.received is not None,
                      check_every=cfg.train.stop_check_every_steps)
    if not cfg.dist.cuda_graph:
        return eager
    why_not = ("it needs CUDA" if dist.device.type != "cuda" else
               "it is single-GPU only" if dist.world_size > 1 else
               "it does not combine with bf16 autocast" if dist.mixed_precision != "no" else
               "dist.compile does the capturing already" if cfg.dist.compile != "off" else None)
    if why_not:
        warn_main(f"dist.cuda_graph: {why_not}; using the eager step")
        return eager
    example_x, example_y = next(iter(batches.epoch(pos.epoch)))
    return GraphedStep(eager, dist.raw_optimizer(optimizer), example_x, example_y)


# --------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(cfg: Config, dist: Dist, model: torch.nn.Module, tensors: MnistTensors) -> EvalCounts:
    """Exact test metrics over all 10,000 images at any world size.

    Rank r scores images r, r+N, r+2N, ... (no padding, no duplicates), sums its counts, and
    one all-reduce of the sums after the loop combines them. A single collective at the end
    also means ranks with different loop lengths (10000 % N != 0) cannot deadlock.
    """
    was_training = model.training
    model.eval()
    shard = eval_shard(len(tensors.test_labels), dist.rank, dist.world_size).to(tensors.test_labels.device)
    local = EvalCounts.zeros()
    for idx in shard.split(cfg.train.eval_per_process_batch_size):
        x = normalize(tensors.test_images[idx], cfg.data.normalize_mean, cfg.data.normalize_std)
        with dist.autocast():
            logits = model(x)
        local = local + EvalCounts.from_batch(logits, tensors.test_labels[idx], cfg.train.loss)
    model.train(was_training)
    return EvalCounts.from_tensor(dist.all_reduce_sum(local.to_tensor()))


def evaluate_model_file(cfg: Config, model_path: str | Path) -> EvalCounts:
    """Exact test metrics of saved weights, on however many processes were launched."""
    dist = Dist(cfg.dist)
    try:
        prepare_mnist(cfg.data, dist.is_local_main, dist.barrier)
        tensors = load_tensors(cfg.data.root).to(dist.device)
        model = build_model(cfg, dist.device)
        model.load_state_dict(checkpoint.load_model_state(model_path))
        return evaluate(cfg, dist, model, tensors)
    finally:
        dist.close()
