"""The training loop: plain functions, read top to bottom.

``run(cfg, run_dir, resume)`` -> set up the process group -> ``fit`` -> tear down.
``fit``: data -> model -> (resume) -> for each epoch: ``train_one_epoch``, ``evaluate``,
checkpoint -> final weights and summary.
"""

from __future__ import annotations

import json
import math
import resource
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mnistdist import checkpoint
from mnistdist.checkpoint import CheckpointError, Snapshot
from mnistdist.config import Config, ConfigError, to_yaml
from mnistdist.data import MnistTensors, TrainBatches, eval_shard, load_tensors, normalize, prepare_mnist
from mnistdist.distributed import Dist, Heartbeat, is_collective_failure, warn_main
from mnistdist.metrics import EvalCounts, per_sample_loss
from mnistdist.model import MLP
from mnistdist.schedule import lr_at
from mnistdist.signals import FaultInjector, NonFiniteLoss, Preempted, RankFailure, StopSignals, TrainingStopped
from mnistdist.step import EagerStep, GraphedStep
from mnistdist.tracking import Tracker, truncate_metrics


@dataclass
class TrainState:
    """Where the run is. Together with model, optimizer, RNG and loss sums it is a checkpoint."""

    step: int = 0
    """Optimizer steps done since the start of the run (the global step of every log)."""
    epoch: int = 0
    """The epoch in progress, 0-based."""
    batch_in_epoch: int = 0
    """Batches of ``epoch`` done; a resumed run continues with the next batch."""


class LossMeter:
    """This rank's loss sums, kept on the device (reading them every step would force a
    host-device sync per step) and added to by the step itself; they are part of a checkpoint
    so logs resume exactly. Always updated in place: a CUDA graph holds their addresses."""

    def __init__(self, device: torch.device) -> None:
        self.window_sum = torch.zeros((), device=device)
        self.window_steps = 0
        self.epoch_sum = torch.zeros((), device=device)

    def state_dict(self) -> dict[str, Any]:
        # float32 -> Python float is exact, and back again.
        return {"window_sum": float(self.window_sum), "window_steps": self.window_steps,
                "epoch_sum": float(self.epoch_sum)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window_sum.fill_(state["window_sum"])
        self.window_steps = state["window_steps"]
        self.epoch_sum.fill_(state["epoch_sum"])


def run(cfg: Config, run_dir: str | Path | None = None, resume: str = "auto") -> dict[str, Any]:
    """Train according to ``cfg`` on however many processes were launched; return the summary.

    ``resume``: ``auto`` (newest valid checkpoint in the run directory, if any), ``never``, or
    the path of a checkpoint directory.
    """
    dist = Dist(cfg.dist)
    try:
        return fit(cfg, dist, make_run_dir(run_dir, dist), resume)
    finally:
        dist.close()


def make_run_dir(requested: str | Path | None, dist: Dist) -> Path:
    """``requested``, or ``runs/<time>-<random>`` chosen on rank 0 and shared with all ranks
    (clocks and random state differ between processes, so each rank must not pick its own)."""
    if requested is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        requested = dist.broadcast_object(f"runs/{stamp}-{secrets.token_hex(3)}")
    run_dir = Path(requested)
    error = None
    if dist.is_main:
        # Fail now, not at the first checkpoint: create the directory and write a probe file.
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            probe = run_dir / f".write-test-{secrets.token_hex(4)}"
            probe.write_bytes(b"\0" * 65536)
            probe.unlink()
        except OSError as e:
            error = f"--run-dir {run_dir}: cannot write there ({e.strerror or e})"
    error = dist.broadcast_object(error)  # every rank fails the same way, nobody waits
    if error:
        raise ConfigError(error)
    return run_dir


def build_model(cfg: Config, device: torch.device) -> MLP:
    return MLP(final_relu=cfg.model.final_relu).to(device=device, dtype=getattr(torch, cfg.model.dtype))


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
        warn_main(f"dist.compile={cfg.dist.compile} is used on GPUs only; training eagerly on {device.type}")
        return loss_fn
    return torch.compile(loss_fn, mode=cfg.dist.compile)


def build_step(cfg: Config, dist: Dist, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               meter: LossMeter, batches: TrainBatches, epoch: int) -> EagerStep | GraphedStep:
    """The eager step, or the CUDA-graph one when ``dist.cuda_graph`` asks and it can work."""
    eager = EagerStep(dist, model, optimizer, make_loss_fn(cfg, model, dist.device),
                      meter.window_sum, meter.epoch_sum)
    if not cfg.dist.cuda_graph:
        return eager
    why_not = ("it needs CUDA" if dist.device.type != "cuda" else
               "it is single-GPU only" if dist.world_size > 1 else
               "it does not combine with bf16 autocast" if cfg.dist.mixed_precision != "no" else
               "dist.compile does the capturing already" if cfg.dist.compile != "off" else None)
    if why_not:
        warn_main(f"dist.cuda_graph: {why_not}; using the eager step")
        return eager
    example_x, example_y = next(iter(batches.epoch(epoch)))
    return GraphedStep(eager, dist.raw_optimizer(optimizer), example_x, example_y)


@dataclass
class Job:
    """Everything one rank's training works on, built once by ``fit``."""

    cfg: Config
    dist: Dist
    run_dir: Path
    tensors: MnistTensors
    batches: TrainBatches
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step: EagerStep | GraphedStep
    """Takes one optimizer step (adds its loss to ``meter``'s sums)."""
    state: TrainState
    meter: LossMeter
    tracker: Tracker
    schedule_steps: int
    """Steps the LR schedule spans: all epochs (``max_steps`` only stops early, so a short run
    is an exact prefix of the full one)."""
    stop_at: int
    """The step at which this run ends: all epochs, or ``train.max_steps``."""


def fit(cfg: Config, dist: Dist, run_dir: Path, resume: str = "auto") -> dict[str, Any]:
    """Build the job (resuming if asked), train and evaluate it, return the summary."""
    t = cfg.train
    prepare_mnist(cfg.data, dist.is_local_main, dist.barrier)
    tensors = load_tensors(cfg.data.root).to(dist.device)  # 55 MB of uint8: held once
    per_process_batch_size = t.global_batch_size // dist.world_size  # divisibility validated
    batches = TrainBatches(
        cfg.data, tensors, per_process_batch_size, dist.rank, dist.world_size, t.seed, dist.device
    )
    schedule_steps = len(batches) * t.epochs

    dist.seed(t.seed)  # identical initial weights on every rank
    model = build_model(cfg, dist.device)
    optimizer = build_optimizer(cfg, model)
    model, optimizer = dist.prepare(model, optimizer)
    state, meter = TrainState(), LossMeter(dist.device)

    snapshot_path = resolve_resume(resume, run_dir, dist)
    run_id = None
    if snapshot_path is not None:
        snap = load_snapshot(snapshot_path, dist, t.global_batch_size)
        restore(snap, dist, model, optimizer, state, meter)
        run_id = snap.tracking.get("wandb_run_id")
    if dist.is_main:
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        if snapshot_path is not None:
            truncate_metrics(run_dir, state.step)  # drop lines logged after the checkpoint
    tracker = Tracker(cfg.tracking, run_dir, cfg.to_dict(), enabled=dist.is_main, run_id=run_id)
    job = Job(cfg, dist, run_dir, tensors, batches, model, optimizer,
              build_step(cfg, dist, model, optimizer, meter, batches, state.epoch),
              state, meter, tracker, schedule_steps,
              stop_at=min(schedule_steps, t.max_steps) if t.max_steps else schedule_steps)
    dist.print(
        f"training on {dist.world_size} process(es), {dist.device.type}, backend {dist.backend}, "
        f"gradients averaged by {dist.gradient_reduction}; "
        f"global batch {t.global_batch_size} = {dist.world_size} x {per_process_batch_size}; "
        f"{len(batches)} steps/epoch; run dir {run_dir}"
        + (f"; resumed from {snapshot_path} at step {state.step}" if snapshot_path else "")
    )
    heartbeat = Heartbeat(run_dir / ".heartbeat", dist.rank, dist.world_size) if dist.world_size > 1 else None
    try:
        summary = train_and_evaluate(job)
    except BaseException as e:
        tracker.close(exit_code=getattr(e, "exit_code", 1))
        if heartbeat is not None and not isinstance(e, TrainingStopped) and is_collective_failure(e):
            raise RankFailure(describe_collective_failure(e, heartbeat, state, cfg.dist.timeout_s)) from e
        raise
    finally:
        if heartbeat is not None:
            heartbeat.stop()
    tracker.close()
    dist.barrier()  # nobody exits (and tears down the group) while rank 0 still writes
    return summary


def train_and_evaluate(job: Job) -> dict[str, Any]:
    """The epoch loop: train, evaluate, log and checkpoint until ``job.stop_at``."""
    cfg, dist, state, meter, t = job.cfg, job.dist, job.state, job.meter, job.cfg.train
    steps_per_epoch = len(job.batches)
    counts: EvalCounts | None = None
    best_acc, train_time_s = 0.0, 0.0
    faults = FaultInjector(dist.rank)
    with StopSignals() as signals:
        # (A run stopped right after the last batch of an epoch still owes that epoch's evaluation.)
        while state.step < job.stop_at or state.batch_in_epoch == steps_per_epoch:
            epoch_start, step_before = time.perf_counter(), state.step
            stopped = train_one_epoch(job, signals, faults)
            epoch_time_s = time.perf_counter() - epoch_start
            train_time_s += epoch_time_s
            if stopped:
                save_checkpoint(job)
                why = signals.name if signals.received else "a stop signal on another rank"
                raise Preempted(
                    f"stopped by {why} after step {state.step}; checkpoint written to "
                    f"{checkpoint.checkpoint_dir(job.run_dir, state.step)}; run again with the same "
                    "--run-dir to resume"
                )
            train_loss = (dist.all_reduce_sum(meter.epoch_sum) / (dist.world_size * state.batch_in_epoch)).item()
            counts = evaluate(cfg, dist, dist.unwrap(job.model), job.tensors)
            best_acc = max(best_acc, counts.accuracy)
            steps_done = state.step - step_before
            samples_per_s = steps_done * t.global_batch_size / epoch_time_s if steps_done else 0.0
            job.tracker.log(
                {"epoch": state.epoch + 1, "step": state.step, **counts.as_record(),
                 "train_loss_epoch": train_loss, "epoch_time_s": epoch_time_s, "samples_per_s": samples_per_s,
                 "per_class_acc": counts.per_class_accuracy(), "confusion": counts.confusion.tolist()}
            )
            _log_line(
                dist,
                f"epoch {state.epoch + 1}/{t.epochs}  train_loss {train_loss:.4f}  "
                f"test_loss {counts.mean_loss:.4f}  test_acc {100 * counts.accuracy:.2f}% "
                f"({counts.correct}/{counts.total})  {samples_per_s:,.0f} samples/s  {epoch_time_s:.1f} s",
            )
            if state.batch_in_epoch == steps_per_epoch:
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                meter.epoch_sum.zero_()
            save_checkpoint(job)

    if counts is None:  # resumed from the final checkpoint: nothing left to train
        counts = evaluate(cfg, dist, dist.unwrap(job.model), job.tensors)
    # Peak memory of every rank, for `python -m mnistdist.bench` (ru_maxrss is KiB on Linux).
    per_rank = dist.gather_object({
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_cuda_mb": torch.cuda.max_memory_allocated(dist.device) / 2**20 if dist.device.type == "cuda" else None,
    })
    summary = {
        "final_test_acc": counts.accuracy,
        "best_test_acc": max(best_acc, counts.accuracy),
        "final_test_loss": counts.mean_loss,
        "test_correct": counts.correct,
        "test_total": counts.total,
        "steps": state.step,
        "epochs": state.epoch,
        "train_time_s": train_time_s,
        "world_size": dist.world_size,
        "run_dir": str(job.run_dir),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in per_rank),
        "per_rank": per_rank,
    }
    if dist.is_main:
        checkpoint.save_model(dist.unwrap(job.model), job.run_dir / "model.safetensors")
        (job.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        job.tracker.summary({k: v for k, v in summary.items() if k not in ("run_dir", "per_rank")})
        write_plots(job, counts)
    return summary


def write_plots(job: Job, counts: EvalCounts) -> None:
    """Loss/accuracy/confusion PNGs into RUN_DIR/plots, and the same pictures to W&B."""
    from mnistdist.plots import write_run_plots  # matplotlib: imported only here

    try:
        paths = write_run_plots(job.run_dir, confusion=counts.confusion.tolist())
    except Exception as e:  # noqa: BLE001 - a plot must never turn a finished training into a failure
        warn_main(f"could not write plots: {type(e).__name__}: {e}")
        return
    job.tracker.log_images({f"plots/{p.stem}": p for p in paths}, step=job.state.step)


def train_one_epoch(job: Job, signals: StopSignals, faults: FaultInjector) -> bool:
    """Train the rest of ``state.epoch`` (or up to ``job.stop_at``). Returns True when the ranks
    agreed to stop on a signal. Every rank runs the same steps, so collectives stay matched."""
    cfg, dist, state, meter, t = job.cfg, job.dist, job.state, job.meter, job.cfg.train
    steps_left = min(len(job.batches) - state.batch_in_epoch, job.stop_at - state.step)
    progress = tqdm(total=steps_left, desc=f"epoch {state.epoch + 1}/{t.epochs}", leave=False,
                    disable=not dist.is_main, mininterval=1.0, dynamic_ncols=True)
    window_start = time.perf_counter()
    stop = False
    for x, y in job.batches.epoch(state.epoch, start_batch=state.batch_in_epoch):
        if state.step >= job.stop_at:
            break
        lr = lr_at(state.step, job.schedule_steps, t.lr, t.lr_schedule, t.warmup_steps)
        stop = job.step(x, y, lr, step=state.step + 1,
                        check=(state.step + 1) % t.stop_check_every_steps == 0,
                        stop_requested=signals.received is not None, poison=faults.poisons_loss(state.step + 1))
        state.step += 1
        state.batch_in_epoch += 1
        meter.window_steps += 1
        progress.update()
        faults.after_step(state.step)

        end_of_epoch = state.batch_in_epoch == len(job.batches) or state.step == job.stop_at
        if state.step % t.log_every_steps == 0 or end_of_epoch:
            # Each rank's loss is a mean over an equal-sized batch, so the mean over ranks is
            # the mean over the global batch. Sync point: every rank reaches this step.
            mean_loss = (dist.all_reduce_sum(meter.window_sum) / (dist.world_size * meter.window_steps)).item()
            if not math.isfinite(mean_loss):  # the same value on every rank: all stop together
                raise NonFiniteLoss(f"non-finite training loss in steps {state.step - meter.window_steps + 1}-"
                                    f"{state.step} (the gradients were finite); lower train.lr or check the data")
            elapsed = time.perf_counter() - window_start
            job.tracker.log({"epoch": state.epoch + 1, "step": state.step, "train_loss": mean_loss, "lr": lr,
                             "samples_per_s": t.global_batch_size * meter.window_steps / elapsed})
            progress.set_postfix(loss=f"{mean_loss:.4f}", refresh=False)
            meter.window_sum.zero_()
            meter.window_steps = 0
            window_start = time.perf_counter()
        if stop:
            break
        every = cfg.checkpoint.every_steps
        if every and state.step % every == 0 and not end_of_epoch:  # epoch ends save anyway
            save_checkpoint(job)
    progress.close()
    return stop


def describe_collective_failure(exc: BaseException, heartbeat: Heartbeat, state: TrainState,
                                timeout_s: float) -> str:
    """One line: where it failed and which rank(s) look responsible."""
    silent = heartbeat.silent_ranks(older_than_s=max(3 * heartbeat.interval_s, min(timeout_s / 2, 10.0)))
    if silent:
        who = ", ".join(f"rank {r} (silent for {age:.0f} s)" if age != float("inf") else f"rank {r}"
                        for r, age in sorted(silent.items()))
        culprit = f"{who} stopped responding (hung, stopped or killed)"
    else:
        culprit = "another rank exited or raised (see its own error above)"
    first_line = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    return (f"a collective operation failed at step {state.step} (dist.timeout_s={timeout_s:g}): {culprit}; "
            f"{type(exc).__name__}: {first_line}")


# --------------------------------------------------------------------------------------
# Checkpoints: collected from all ranks, written by rank 0, the outcome shared with all


def save_checkpoint(job: Job) -> None:
    """Collective: every rank must call it at the same step."""
    cfg, dist, state = job.cfg, job.dist, job.state
    ranks = dist.gather_object({"rng": checkpoint.rng_state(), "loss": job.meter.state_dict()})
    error = None
    if dist.is_main:
        snap = Snapshot(
            step=state.step, epoch=state.epoch, batch_in_epoch=state.batch_in_epoch,
            world_size=dist.world_size, global_batch_size=cfg.train.global_batch_size,
            model=dist.unwrap(job.model).state_dict(), optimizer=job.optimizer.state_dict(), ranks=ranks,
            config=cfg.to_dict(), tracking={"wandb_run_id": job.tracker.run_id},
        )
        try:
            checkpoint.save_checkpoint(job.run_dir, snap, cfg.checkpoint.keep_last)
        except OSError as e:
            error = f"cannot write checkpoint in {job.run_dir / checkpoint.CHECKPOINTS}: {e.strerror or e}"
    # Rank 0 must not fail alone: the others would wait in the next collective until the
    # timeout. Share the outcome and fail together.
    error = dist.broadcast_object(error)
    if error:
        raise CheckpointError(error)


def resolve_resume(resume: str, run_dir: Path, dist: Dist) -> Path | None:
    """Decide on rank 0 which checkpoint to resume from; every rank gets the same answer."""
    answer: tuple[str | None, str | None] = (None, None)
    if dist.is_main:
        try:
            if resume == "never":
                if checkpoint.list_checkpoints(run_dir):
                    raise ConfigError(
                        f"--resume never: {run_dir / checkpoint.CHECKPOINTS} already holds checkpoints; "
                        "use another --run-dir or --resume auto"
                    )
            elif resume == "auto":
                found = checkpoint.find_latest_valid(run_dir, warn=dist.print)
                answer = (str(found) if found else None, None)
            else:
                checkpoint.verify(Path(resume))
                answer = (resume, None)
        except (CheckpointError, ConfigError) as e:
            answer = (None, f"{type(e).__name__}:{e}")
    path, error = dist.broadcast_object(answer)
    if error:
        kind, message = error.split(":", 1)
        raise (ConfigError if kind == "ConfigError" else CheckpointError)(message)
    return Path(path) if path else None


def load_snapshot(path: Path, dist: Dist, global_batch_size: int) -> Snapshot:
    snap = checkpoint.load_checkpoint(path)
    if snap.world_size != dist.world_size or snap.global_batch_size != global_batch_size:
        raise ConfigError(
            f"{path}: written by {snap.world_size} process(es) with train.global_batch_size "
            f"{snap.global_batch_size}; this run has {dist.world_size} with {global_batch_size}. "
            "Resume with the same number of processes and global batch (or --resume never)"
        )
    return snap


def restore(snap: Snapshot, dist: Dist, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            state: TrainState, meter: LossMeter) -> None:
    dist.unwrap(model).load_state_dict(snap.model)
    optimizer.load_state_dict(snap.optimizer)
    state.step, state.epoch, state.batch_in_epoch = snap.step, snap.epoch, snap.batch_in_epoch
    mine = snap.ranks[dist.rank]
    meter.load_state_dict(mine["loss"])
    checkpoint.set_rng_state(mine["rng"])


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


def _log_line(dist: Dist, line: str) -> None:
    if dist.is_main:
        tqdm.write(line)

