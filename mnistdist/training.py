"""The training loop: plain functions, read top to bottom.

``run(cfg, run_dir)`` -> set up the process group -> ``fit`` -> tear down.
``fit``: data -> model -> for each epoch: ``train_one_epoch`` then ``evaluate``.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mnistdist import checkpoint
from mnistdist.config import Config, to_yaml
from mnistdist.data import MnistTensors, TrainBatches, eval_shard, load_tensors, normalize, prepare_mnist
from mnistdist.distributed import Dist
from mnistdist.metrics import EvalCounts, per_sample_loss
from mnistdist.model import MLP
from mnistdist.schedule import lr_at
from mnistdist.tracking import MetricsLog


@dataclass
class TrainState:
    """Where the run is: ``step`` counts optimizer steps since the start of the run."""

    step: int = 0
    epoch: int = 0


def run(cfg: Config, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Train according to ``cfg`` on however many processes were launched; return the summary."""
    dist = Dist(cfg.dist)
    try:
        return fit(cfg, dist, make_run_dir(run_dir, dist))
    finally:
        dist.close()


def make_run_dir(requested: str | Path | None, dist: Dist) -> Path:
    """``requested``, or ``runs/<time>-<random>`` chosen on rank 0 and shared with all ranks
    (clocks and random state differ between processes, so each rank must not pick its own)."""
    if requested is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        requested = dist.broadcast_object(f"runs/{stamp}-{secrets.token_hex(3)}")
    run_dir = Path(requested)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    return run_dir


def build_model(cfg: Config, device: torch.device) -> MLP:
    return MLP(final_relu=cfg.model.final_relu).to(device)


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    t = cfg.train
    return torch.optim.SGD(
        model.parameters(), lr=t.lr, momentum=t.momentum, nesterov=t.nesterov, weight_decay=t.weight_decay
    )


def fit(cfg: Config, dist: Dist, run_dir: Path) -> dict[str, Any]:
    """Train for ``cfg.train.epochs`` epochs (or ``max_steps``), evaluating after each epoch."""
    t = cfg.train
    if dist.is_main:
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    metrics = MetricsLog(run_dir, enabled=dist.is_main)

    prepare_mnist(cfg.data, dist.is_local_main, dist.barrier)
    tensors = load_tensors(cfg.data.root).to(dist.device)  # 55 MB of uint8: held once
    per_process_batch_size = t.global_batch_size // dist.world_size  # divisibility validated
    batches = TrainBatches(
        cfg.data, tensors, per_process_batch_size, dist.rank, dist.world_size, t.seed, dist.device
    )
    steps_per_epoch = len(batches)
    total_steps = steps_per_epoch * t.epochs
    if t.max_steps:
        total_steps = min(total_steps, t.max_steps)

    dist.seed(t.seed)  # identical initial weights on every rank
    model = build_model(cfg, dist.device)
    optimizer = build_optimizer(cfg, model)
    model, optimizer = dist.prepare(model, optimizer)

    dist.print(
        f"training on {dist.world_size} process(es), {dist.device.type}, backend {dist.backend}; "
        f"global batch {t.global_batch_size} = {dist.world_size} x {per_process_batch_size}; "
        f"{steps_per_epoch} steps/epoch; run dir {run_dir}"
    )
    state = TrainState()
    best_acc = 0.0
    train_time_s = 0.0
    counts = EvalCounts.zeros()
    while state.step < total_steps:
        epoch_start, step_before = time.perf_counter(), state.step
        train_loss = train_one_epoch(cfg, dist, model, optimizer, batches, state, total_steps, metrics)
        epoch_time_s = time.perf_counter() - epoch_start
        train_time_s += epoch_time_s
        counts = evaluate(cfg, dist, dist.unwrap(model), tensors)
        best_acc = max(best_acc, counts.accuracy)
        samples_per_s = (state.step - step_before) * t.global_batch_size / epoch_time_s
        metrics.log(
            {"epoch": state.epoch + 1, "step": state.step, **counts.as_record(),
             "train_loss_epoch": train_loss, "epoch_time_s": epoch_time_s, "samples_per_s": samples_per_s}
        )
        _log_line(
            dist,
            f"epoch {state.epoch + 1}/{t.epochs}  train_loss {train_loss:.4f}  "
            f"test_loss {counts.mean_loss:.4f}  test_acc {100 * counts.accuracy:.2f}% "
            f"({counts.correct}/{counts.total})  {samples_per_s:,.0f} samples/s  {epoch_time_s:.1f} s",
        )
        state.epoch += 1

    summary = {
        "final_test_acc": counts.accuracy,
        "best_test_acc": best_acc,
        "final_test_loss": counts.mean_loss,
        "test_correct": counts.correct,
        "test_total": counts.total,
        "steps": state.step,
        "epochs": state.epoch,
        "train_time_s": train_time_s,
        "world_size": dist.world_size,
        "run_dir": str(run_dir),
    }
    if dist.is_main:
        checkpoint.save_model(dist.unwrap(model), run_dir / "model.safetensors")
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    metrics.close()
    dist.barrier()  # nobody exits (and tears down the group) while rank 0 still writes
    return summary


def train_one_epoch(
    cfg: Config,
    dist: Dist,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: TrainBatches,
    state: TrainState,
    total_steps: int,
    metrics: MetricsLog,
) -> float:
    """One pass over this rank's shard (or up to ``total_steps``); returns the mean train loss
    over all ranks. Each rank runs the same number of steps, so collectives stay matched."""
    t = cfg.train
    model.train()
    steps_this_epoch = min(len(batches), total_steps - state.step)
    # Losses are summed on the device and only read at log points: reading them every step
    # would force a host-device sync per step.
    window_loss = torch.zeros((), device=dist.device)
    epoch_loss = torch.zeros((), device=dist.device)
    window_steps = 0
    window_start = time.perf_counter()
    progress = tqdm(total=steps_this_epoch, desc=f"epoch {state.epoch + 1}/{t.epochs}", leave=False,
                    disable=not dist.is_main, mininterval=1.0, dynamic_ncols=True)
    for i, (x, y) in enumerate(batches.epoch(state.epoch)):
        if i >= steps_this_epoch:
            break
        lr = lr_at(state.step, total_steps, t.lr, t.lr_schedule, t.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = per_sample_loss(model(x), y, t.loss).mean()
        optimizer.zero_grad(set_to_none=True)
        dist.backward(loss)  # DDP averages gradients over ranks here
        optimizer.step()
        state.step += 1
        window_loss += loss.detach()
        epoch_loss += loss.detach()
        window_steps += 1
        progress.update()
        if state.step % t.log_every_steps == 0 or i == steps_this_epoch - 1:
            # Each rank's loss is a mean over an equal-sized batch, so the mean over ranks
            # is the mean over the global batch. Sync point: every rank reaches this step.
            mean_loss = (dist.all_reduce_sum(window_loss) / (dist.world_size * window_steps)).item()
            elapsed = time.perf_counter() - window_start
            metrics.log({"epoch": state.epoch + 1, "step": state.step, "train_loss": mean_loss, "lr": lr,
                         "samples_per_s": t.global_batch_size * window_steps / elapsed})
            progress.set_postfix(loss=f"{mean_loss:.4f}", refresh=False)
            window_loss.zero_()
            window_steps = 0
            window_start = time.perf_counter()
    progress.close()
    return (dist.all_reduce_sum(epoch_loss) / (dist.world_size * steps_this_epoch)).item()


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
