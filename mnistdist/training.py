"""The training loop, read top to bottom: ``run`` starts the process group, ``fit`` trains
(data -> model -> resume -> for each epoch: its steps, evaluate, log, checkpoint -> final
weights, summary and plots), then the group is torn down.

With a validation set (``data.validation_size``) each epoch is evaluated on it, the best model
so far is kept (``RUN_DIR/best.safetensors``, and in checkpoints), and the test set only at the
end, for the final and the best model. Without one, each epoch is evaluated on the test set.

Every rank runs the same steps in the same order, so the collectives inside them (DDP's
gradient all-reduce, the stop agreement, the loss and evaluation sums, checkpoint saves) always
match up. Side effects (files, W&B, prints, progress output) happen on the main process only.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from mnistdist import checkpoint, rundir
from mnistdist.config import Config, ConfigError, to_yaml, trajectory_changes
from mnistdist.data import (MnistTensors, TrainBatches, eval_shard, load_tensors, normalize, prepare_mnist,
                            validation_split)
from mnistdist.distributed import Dist, software_versions
from mnistdist.ranks import warn_main
from mnistdist.metrics import Best, EvalCounts, LossMeter, improves, per_sample_loss
from mnistdist.model import MLP
from mnistdist.progress import Progress, finished_line, precision_name, start_line
from mnistdist.rundir import RunDir
from mnistdist.schedule import lr_at
from mnistdist.signals import NonFiniteLoss, Preempted, StopSignals
from mnistdist.step import EagerStep, GraphedStep
from mnistdist.tracking import Tracker


@dataclass
class TrainState:
    """Where training stands and this rank's loss sums: with the weights and the optimizer's
    tensors, what a checkpoint holds. ``state_dict``/``load_state_dict`` as in torch."""

    loss: LossMeter
    steps_per_epoch: int
    # The LR schedule spans all epochs; train.max_steps only ends the run early, at last_step, so
    # a short run is an exact prefix of the full one.
    total_steps: int
    last_step: int
    step: int = 0  # optimizer steps done in the whole run (the global step of every log)
    epoch: int = 0  # the epoch in progress, 0-based
    batch_in_epoch: int = 0  # batches of ``epoch`` done; a resumed run continues with the next
    train_time_s: float = 0.0  # the whole run's training time, as of the last checkpoint
    best: Best | None = None  # the validation result of the best model so far, if any
    best_model: dict[str, torch.Tensor] | None = None  # its weights (the same on every rank)

    @classmethod
    def start(cls, cfg: Config, steps_per_epoch: int, device: torch.device) -> TrainState:
        """Step 0 of a run of ``cfg`` with ``steps_per_epoch`` batches per epoch."""
        total = steps_per_epoch * cfg.train.epochs
        return cls(LossMeter(device, getattr(torch, cfg.model.dtype)), steps_per_epoch, total,
                   min(total, cfg.train.max_steps or total))

    @property
    def unfinished(self) -> bool:
        """Steps left, or an epoch whose batches are done but whose evaluation is still owed (a
        run stopped right after its last batch)."""
        return self.step < self.last_step or self.batch_in_epoch == self.steps_per_epoch

    @property
    def steps_left_in_epoch(self) -> int:
        return min(self.steps_per_epoch - self.batch_in_epoch, self.last_step - self.step)

    @property
    def epoch_over(self) -> bool:
        """The epoch's batches are done, or the run's (``train.max_steps`` may end it early)."""
        return self.batch_in_epoch == self.steps_per_epoch or self.step == self.last_step

    def advance(self) -> None:
        """One optimizer step done (the step itself added its loss to the sums)."""
        self.step += 1
        self.batch_in_epoch += 1
        self.loss.window_steps += 1

    def next_epoch(self) -> None:
        """The epoch is over: the next one starts at its first batch."""
        self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        self.loss.epoch_sum.zero_()

    def consider(self, counts: EvalCounts, model: torch.nn.Module) -> bool:
        """Keep ``model`` as the best if its validation ``counts`` beat the best so far."""
        if not improves(self.best, counts):
            return False
        self.best = Best.of(counts, self.step, self.epoch + 1)
        self.best_model = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return True

    def state_dict(self) -> dict[str, Any]:
        """Without the best weights, which a checkpoint stores as tensors (``best_model``)."""
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "loss": self.loss.state_dict(), "best": self.best.state_dict() if self.best else None,
                "train_time_s": self.train_time_s}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The inverse of ``state_dict``."""
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.loss.load_state_dict(state["loss"])
        self.best = Best.from_state_dict(state["best"]) if state.get("best") else None
        self.train_time_s = state.get("train_time_s", 0.0)


def run(cfg: Config, run_dir: str | Path | None = None, resume: str = "auto",
        allow_config_change: bool = False) -> dict[str, Any]:
    """Train according to ``cfg`` on however many processes were launched; return the summary.

    ``resume``: ``auto`` (newest valid checkpoint in the run directory, if any; a finished run
    is left as it is, ``checkpoint.finished``), ``never``, or the path of a checkpoint directory.
    A checkpoint written with other values of keys that change the trajectory
    (``config.TRAJECTORY_KEYS``) is refused unless ``allow_config_change``.
    """
    # Stop requests (SIGTERM, SIGUSR1, Ctrl-C) are recorded from the first moment to the last:
    # one during start-up stops after the first step, one after training is ignored.
    with StopSignals() as signals:
        dist = Dist(cfg.dist)
        try:
            with rundir.claim(run_dir, dist) as claimed:
                if resume == "auto" and (done := checkpoint.finished(dist, claimed, cfg)):
                    return done  # a finished run stays finished: said so, nothing written
                return fit(cfg, dist, claimed, resume, signals, allow_config_change)
        except Exception as e:
            if isinstance(e, (Preempted, NonFiniteLoss)) or getattr(e, "agreed", False):
                # Every rank stopped at the same step, or on one decision (Dist.on_main). Leave
                # together, once rank 0 has finished W&B (bounded by tracking.finish_timeout_s):
                # a rank that exits first makes torchrun SIGTERM the others.
                dist.barrier()
            raise
        finally:
            dist.close()


def fit(cfg: Config, dist: Dist, run_dir: RunDir, resume: str, signals: StopSignals,
        allow_config_change: bool = False) -> dict[str, Any]:
    """Train and evaluate; return the summary. Collective: every rank calls it."""
    # Data: MNIST as tensors on the training device, the validation set held out of the training
    # images by the seed (None without one), and this rank's batches of the rest.
    data = load_data(cfg, dist)

    # The same seed gives every rank the same initial weights; then fresh, or continue where a
    # checkpoint left off (and say so: run.json, the start line, the tracker).
    dist.seed(cfg.train.seed)
    model = build_model(cfg, dist.device)
    model, optimizer = dist.prepare(model, build_optimizer(cfg, model))
    state = TrainState.start(cfg, len(data.batches), dist.device)
    tracker = start_run(cfg, dist, run_dir, resume, allow_config_change, dist.unwrap(model), optimizer, state, data)
    train_step = build_step(cfg, dist, model, optimizer, state, data.batches, signals)
    progress = Progress(cfg.tracking.progress, dist.is_main, cfg.train.epochs, state.last_step,
                        cfg.train.global_batch_size, train_time_s=state.train_time_s)

    def save_checkpoint() -> Path:  # collective
        state.train_time_s = progress.trained_s  # the whole run's, carried on to the next job
        return checkpoint.save(dist, run_dir, cfg, dist.unwrap(model), optimizer, state.state_dict(),
                               {"wandb_run_id": tracker.run_id}, best_model=state.best_model)

    results: Results | None = None
    with tracker, progress, dist.diagnose_failures(run_dir.heartbeat, lambda: f"at step {state.step}"):
        while state.unfinished:
            progress.start_epoch(state.epoch, steps=state.steps_left_in_epoch)
            for x, y in data.batches.epoch(state.epoch, start_batch=state.batch_in_epoch):
                lr = lr_at(state.step, state.total_steps, cfg.train.lr, cfg.train.lr_schedule, cfg.train.warmup_steps)
                stop = train_step(x, y, lr, state.step + 1)  # forward, backward (DDP all-reduce), NaN check, update
                state.advance()
                progress.update()
                if state.step % cfg.train.log_every_steps == 0 or state.epoch_over:
                    tracker.log(progress.log(train_record(dist, state, lr)))
                if stop:  # the ranks agreed on a stop request: all leave after this same step
                    raise signals.stopped(state.step, save_checkpoint())
                if state.epoch_over:  # saved below, after its evaluation
                    break
                if cfg.checkpoint.every_steps and state.step % cfg.checkpoint.every_steps == 0:
                    save_checkpoint()

            # The validation set if there is one, else the test set (as the seed does).
            counts = evaluate(cfg, dist, dist.unwrap(model), data.tensors, data.validation)
            if data.validation is not None and state.consider(counts, dist.unwrap(model)):
                write_best(dist, run_dir, state)
            if state.step == state.last_step:  # the test results of the final and the best model, evaluated once
                results = final_results(cfg, dist, dist.unwrap(model), data, state, counts)
            # Logged before the checkpoint, as every evaluation line: a run resumed from it has it.
            tracker.log(progress.epoch_end(epoch_record(dist, state, counts, data.validation is not None, results)))
            if state.batch_in_epoch == state.steps_per_epoch:
                state.next_epoch()
            save_checkpoint()

        if results is None:  # resumed from the final checkpoint: nothing left to train
            results = final_results(cfg, dist, dist.unwrap(model), data, state, None)
        summary = results.summary(state, run_dir, progress.trained_s, dist.world_size,
                                  precision_name(cfg.model.dtype, dist.mixed_precision))
        # Rank 0 writes; a failure (the run directory lost, a full disk) is raised on every rank.
        dist.on_main(lambda: write_results(run_dir, dist.unwrap(model), summary, results.final, tracker, state.step,
                                           cfg.tracking.plots))
    dist.barrier()  # nobody exits (and tears down the group) while rank 0 still finishes W&B
    return summary


@dataclass
class RunData:
    """MNIST on the training device; the validation indices into its training images (None
    without a validation set); this rank's batches of the other training images."""

    tensors: MnistTensors
    validation: torch.Tensor | None
    batches: TrainBatches


@dataclass
class Results:
    """The test results of the final model and of the best one (without a validation set
    nothing is chosen: the final model's), and with one the final model's validation result."""

    final: EvalCounts
    best: EvalCounts
    final_val: EvalCounts | None

    def record(self, state: TrainState) -> dict[str, Any]:
        """What the last evaluation line adds with a validation set: the final and best test results."""
        if self.final_val is None:
            return {}
        best = state.best or Best.of(self.final_val, state.step, state.epoch + 1)
        return {**self.final.as_record(), "per_class_acc": self.final.per_class_accuracy(),
                "confusion": self.final.confusion.tolist(), "best_test_loss": self.best.mean_loss,
                "best_test_acc": self.best.accuracy, "best_test_correct": self.best.correct,
                "best_step": best.step, "best_epoch": best.epoch}

    def summary(self, state: TrainState, run_dir: RunDir, train_time_s: float, world_size: int,
                precision: str) -> dict[str, Any]:
        """summary.json (docs/runs.md): the whole run's numbers, as of this job's end."""
        chosen = self.final_val is not None and state.best is not None
        summary = {"final_test_acc": self.final.accuracy, "final_test_loss": self.final.mean_loss,
                   "test_correct": self.final.correct, "test_total": self.final.total, "model": str(run_dir.model),
                   "best_test_acc": self.best.accuracy, "best_test_loss": self.best.mean_loss,
                   "best_test_correct": self.best.correct, "best_model": str(run_dir.best if chosen else run_dir.model),
                   "best_selected_by": "val_acc" if chosen else "none: the final model",
                   "best_step": state.best.step if chosen else state.step}
        if chosen:
            summary.update({"best_epoch": state.best.epoch, "best_val_acc": state.best.val_acc,
                            "best_val_loss": state.best.val_loss, "final_val_acc": self.final_val.accuracy,
                            "final_val_loss": self.final_val.mean_loss, "val_total": self.final_val.total})
        return {**summary, "steps": state.step, "epochs": state.epoch, "train_time_s": train_time_s,
                "world_size": world_size, "precision": precision, "run_dir": str(run_dir.root)}


def final_results(cfg: Config, dist: Dist, model: torch.nn.Module, data: RunData, state: TrainState,
                  counts: EvalCounts | None) -> Results:
    """The test results of the final ``model`` and of ``state.best_model``, each evaluated once;
    ``counts``: the final model's evaluation just made (None: evaluate it here). Collective."""
    if data.validation is None:
        final = counts if counts is not None else evaluate(cfg, dist, model, data.tensors)
        return Results(final, final, None)
    final_val = counts if counts is not None else evaluate(cfg, dist, model, data.tensors, data.validation)
    final = evaluate(cfg, dist, model, data.tensors)
    if state.best_model is None or state.best.step == state.step:  # the best model is the final one
        return Results(final, final, final_val)
    best_model = copy.deepcopy(model)  # (not build_model: that would draw from the global RNG)
    best_model.load_state_dict(state.best_model)
    return Results(final, evaluate(cfg, dist, best_model, data.tensors), final_val)


def write_best(dist: Dist, run_dir: RunDir, state: TrainState) -> None:
    """``RUN_DIR/best.safetensors``: the best model of ``state``, with its step, epoch and
    validation result in the header; no such file while there is none. Collective."""

    def write() -> None:
        try:
            if state.best_model is None:
                run_dir.best.unlink(missing_ok=True)
            else:
                checkpoint.save_weights(state.best_model, run_dir.best,
                                        {k: str(v) for k, v in state.best.state_dict().items()})
        except OSError as e:
            raise checkpoint.CheckpointError(f"cannot write {run_dir.best}: {e.strerror or e}") from None

    dist.on_main(write)


def start_run(cfg: Config, dist: Dist, run_dir: RunDir, resume: str, allow_config_change: bool,
              model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: TrainState, data: RunData) -> Tracker:
    """Fresh, or resumed from a checkpoint (``resume_from``); this start recorded in run.json
    and said by the start line (``record_start``); returns the run's tracker. Collective."""
    resumed, changes = resume_from(cfg, dist, run_dir, resume, allow_config_change, model, optimizer, state)
    record_start(cfg, dist, run_dir, data, state.step, resumed)
    return start_tracking(cfg, dist, run_dir, resumed, state.step, changes)


def record_start(cfg: Config, dist: Dist, run_dir: RunDir, data: RunData, step: int,
                 resumed: checkpoint.Snapshot | None) -> None:
    """What this start of the run runs on (``Dist.describe``, the data, the versions): added to
    run.json and said by the start line on the main process. Collective."""
    machine = dist.describe()
    batches = data.batches
    start = {"start_step": step, "resumed_from": str(resumed.path) if resumed else None,
             "started_at": datetime.now().astimezone().isoformat(timespec="seconds"), "argv": list(sys.argv),
             **machine, "dtype": cfg.model.dtype,
             "precision": precision_name(cfg.model.dtype, machine["mixed_precision"]),
             "global_batch_size": cfg.train.global_batch_size, "per_process_batch_size": batches.batch_size,
             "steps_per_epoch": len(batches), "training_images": batches.num_images,
             "validation_images": 0 if data.validation is None else len(data.validation),
             "repeated_images_per_epoch": batches.repeated_per_epoch}

    def write() -> None:
        start["versions"] = software_versions()
        rundir.record_start(run_dir, start)
        print(start_line(start, run_dir.root), flush=True)

    dist.on_main(write)


def resume_from(cfg: Config, dist: Dist, run_dir: RunDir, resume: str, allow_config_change: bool,
                model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                state: TrainState) -> tuple[checkpoint.Snapshot | None, list[tuple[str, Any, Any]]]:
    """Start fresh, or continue from the checkpoint ``--resume`` chooses (the same on every rank):
    its weights, optimizer tensors (the config's hyper-parameters stay), train state and best
    model; the run directory's logs are cut back to its step. Returns it (or None) and its
    ``trajectory_changes``: keys that change training written with other values, a ConfigError
    unless ``allow_config_change``."""
    snap = checkpoint.resume(dist, run_dir.root, resume, cfg.train.global_batch_size)
    changes = trajectory_changes(snap.config, cfg) if snap is not None else []
    if changes and not allow_config_change:
        raise ConfigError(f"{snap.path}: written with other values of keys that change training: {listed(changes)}"
                          "; continue with the new values with --allow-config-change, or use another --run-dir")
    if snap is not None:
        checkpoint.restore(snap, model, optimizer)
        state.load_state_dict(snap.train_state(dist.rank, dist.world_size))
        state.best_model = {k: v.to(dist.device) for k, v in snap.best_model.items()} if snap.best_model else None
        if state.best is not None and {k for k, _, _ in changes} & {"data.validation_size", "train.seed"}:
            dist.print("the validation set changed (--allow-config-change): the best model is chosen anew")
            state.best = state.best_model = None
        dist.print(f"resumed from {snap.path} at step {state.step}"
                   + (f" (written by {snap.world_size} process(es))" if snap.world_size != dist.world_size else ""))
    if dist.is_main:
        rundir.start(run_dir, to_yaml(cfg), resumed_step=state.step if snap is not None else None)
    write_best(dist, run_dir, state)  # the best model of the checkpoint resumed from, or none yet
    return snap, changes


def start_tracking(cfg: Config, dist: Dist, run_dir: RunDir, resumed: checkpoint.Snapshot | None,
                   step: int, changes: list[tuple[str, Any, Any]]) -> Tracker:
    """The run's tracker (metrics.jsonl, W&B, TensorBoard), continuing the W&B run of the
    checkpoint ``resumed`` from; the config ``changes`` allowed on resume are printed and logged."""
    # After a stop the others wait at a barrier (dist.timeout_s) while the main process finishes
    # W&B: its wait must end well before theirs.
    tracking = dataclasses.replace(cfg.tracking,
                                   finish_timeout_s=min(cfg.tracking.finish_timeout_s, 0.8 * cfg.dist.timeout_s))
    tracker = Tracker(tracking, run_dir, cfg.to_dict(), enabled=dist.is_main,
                      run_id=resumed.tracking.get("wandb_run_id") if resumed else None,
                      resumed_step=step if resumed else None)
    if changes:
        dist.print(f"continuing with changed config (--allow-config-change): {listed(changes)}")
        tracker.log({"step": step, "config_changes": {k: [old, new] for k, old, new in changes}})
    return tracker


def listed(changes: list[tuple[str, Any, Any]]) -> str:
    """``trajectory_changes`` as the messages say them: ``key old -> new, ...``."""
    return ", ".join(f"{k} {old!r} -> {new!r}" for k, old, new in changes)


def train_record(dist: Dist, state: TrainState, lr: float) -> dict[str, Any]:
    """The training line of the steps since the last one, whose sums it resets: their mean loss
    over all ranks (all-reduced: a sync point). A NaN/Inf mean, the same on every rank, raises
    NonFiniteLoss on all of them together."""
    meter = state.loss
    loss = (dist.all_reduce_sum(meter.window_sum) / (dist.world_size * meter.window_steps)).item()
    if not math.isfinite(loss):
        raise NonFiniteLoss(f"non-finite training loss in steps {state.step - meter.window_steps + 1}-{state.step} "
                            "(the gradients were finite); lower train.lr or check the data")
    meter.window_sum.zero_()
    meter.window_steps = 0
    return {"epoch": state.epoch + 1, "step": state.step, "train_loss": loss, "lr": lr}


def epoch_record(dist: Dist, state: TrainState, counts: EvalCounts, validated: bool,
                 results: Results | None) -> dict[str, Any]:
    """The evaluation line of the epoch: the counts of the test set (with per-class accuracy and
    confusion matrix) or, when ``validated``, of the validation set; the epoch's mean training
    loss (all-reduced; each rank's loss is the mean over an equal share of the global batch);
    and the ``results`` of the run's end, if it ends here."""
    train_loss = (dist.all_reduce_sum(state.loss.epoch_sum) / (dist.world_size * state.batch_in_epoch)).item()
    on = "val" if validated else "test"
    record = {"epoch": state.epoch + 1, "step": state.step, **counts.as_record(on), "train_loss_epoch": train_loss}
    if not validated:
        record.update({"per_class_acc": counts.per_class_accuracy(), "confusion": counts.confusion.tolist()})
    return {**record, **(results.record(state) if results else {})}


def write_results(run_dir: RunDir, model: torch.nn.Module, summary: dict[str, Any], counts: EvalCounts,
                  tracker: Tracker, step: int, plots: bool = True) -> None:
    """Main process: the final weights, summary.json, the W&B summary and, with ``plots``
    (``tracking.plots``), the plots (into a run directory still held), then the finished line."""
    run_dir.check_held()
    checkpoint.save_weights(model.state_dict(), run_dir.model)
    rundir.write_summary(run_dir, summary)
    tracker.summary({k: v for k, v in summary.items() if k != "run_dir"})
    if plots:
        from mnistdist.plots import write_run_plots  # matplotlib: imported only here

        try:
            paths = write_run_plots(run_dir.root, confusion=counts.confusion.tolist())
        except Exception as e:  # noqa: BLE001 - a plot must never turn a finished training into a failure
            warn_main(f"could not write plots: {type(e).__name__}: {e}")
        else:
            tracker.log_images({f"plots/{p.stem}": p for p in paths}, step=step)
    print(finished_line(summary), flush=True)


def load_tensors_on(cfg: Config, dist: Dist) -> MnistTensors:
    """MNIST checked (downloaded once per node) and held as tensors on the training device."""
    prepare_mnist(cfg.data, dist.is_local_main, dist.barrier)
    return load_tensors(cfg.data.root).to(dist.device)


def load_data(cfg: Config, dist: Dist) -> RunData:
    """MNIST on the training device; the validation indices (``data.validation_size``, None
    when empty), drawn by the seed alone, so the same on every rank at any world size; and
    this rank's batches of the remaining training images (DistributedSampler)."""
    tensors = load_tensors_on(cfg, dist)
    split = validation_split(len(tensors.train_labels), cfg.data.validation_size, cfg.train.seed)
    validation = split.validation.to(dist.device) if split.validation.numel() else None
    per_process = cfg.train.global_batch_size // dist.world_size  # (its divisibility was validated)
    batches = TrainBatches(cfg.data, tensors, per_process, dist.rank, dist.world_size, cfg.train.seed, dist.device,
                           train_indices=split.train)
    return RunData(tensors, validation, batches)


def build_model(cfg: Config, device: torch.device | str = "cpu") -> MLP:
    """The MLP of ``cfg`` (final ReLU, dtype) on ``device``."""
    return MLP(final_relu=cfg.model.final_relu).to(device=device, dtype=getattr(torch, cfg.model.dtype))


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """SGD with the config's hyper-parameters (the learning rate is set before every step)."""
    t = cfg.train  # fused: one kernel for the whole update on GPUs
    return torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, nesterov=t.nesterov,
                           weight_decay=t.weight_decay, fused=True if next(model.parameters()).is_cuda else None)


def build_step(cfg: Config, dist: Dist, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               state: TrainState, batches: TrainBatches, signals: StopSignals) -> EagerStep | GraphedStep:
    """``step(x, y, lr, number) -> stop``: the eager step (its loss compiled when ``dist.compile``
    asks on a GPU), or the CUDA-graph one when ``dist.cuda_graph`` asks and it can work."""
    kind = cfg.train.loss

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return per_sample_loss(model(x), y, kind).mean()

    if cfg.dist.compile != "off" and dist.device.type != "cuda":
        # On a CPU inductor is no faster and not bitwise (docs/benchmarks.md): not adopted.
        warn_main(f"dist.compile={cfg.dist.compile} is used on GPUs only; training eagerly on {dist.device.type}")
    elif cfg.dist.compile != "off":
        loss_fn = torch.compile(loss_fn, mode=cfg.dist.compile)
    eager = EagerStep(dist, model, optimizer, loss_fn, state.loss, stop_requested=lambda: signals.received is not None,
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
    example_x, example_y = next(iter(batches.epoch(state.epoch)))
    return GraphedStep(eager, dist.raw_optimizer(optimizer), example_x, example_y)


@torch.no_grad()
def evaluate(cfg: Config, dist: Dist, model: torch.nn.Module, tensors: MnistTensors,
             validation: torch.Tensor | None = None) -> EvalCounts:
    """Exact metrics over the 10,000 test images, or the ``validation`` indices into the training
    images, at any world size: rank r scores items r, r+N, ... (no padding, no duplicates); one
    all-reduce of the sums after the loop, so ranks of different loop lengths cannot deadlock."""
    was_training = model.training
    model.eval()
    if validation is None:
        images, labels = tensors.test_images, tensors.test_labels
        shard = eval_shard(len(labels), dist.rank, dist.world_size).to(labels.device)
    else:
        images, labels = tensors.train_images, tensors.train_labels
        shard = validation[eval_shard(len(validation), dist.rank, dist.world_size).to(validation.device)]
    local = EvalCounts.zeros()
    for idx in shard.split(cfg.train.eval_per_process_batch_size):
        x = normalize(images[idx], cfg.data.normalize_mean, cfg.data.normalize_std)
        with dist.autocast():
            logits = model(x)
        local = local + EvalCounts.from_batch(logits, labels[idx], cfg.train.loss)
    model.train(was_training)
    return EvalCounts.from_tensor(dist.all_reduce_sum(local.to_tensor()))


def evaluate_model_file(cfg: Config, model_path: str | Path) -> EvalCounts:
    """Exact test metrics of saved weights, on however many processes were launched."""
    dist = Dist(cfg.dist)
    try:
        tensors = load_tensors_on(cfg, dist)
        model = build_model(cfg, dist.device)
        model.load_state_dict(checkpoint.load_model_state(model_path))
        return evaluate(cfg, dist, model, tensors)
    finally:
        dist.close()
