"""Eager vs ``torch.compile`` training step on the CPU, side by side in one run (issue 17;
docs/benchmarks.md, "torch.compile of the training step on the CPU").

    MNISTDIST_DATA_ROOT=DIR python benchmarks/compile_cpu_check.py [--config configs/seed.yaml]
        [--mode default] [--rounds 24] [--block 50] [--threads 0] [--warm-cache]

Both variants are mnistdist's own ``EagerStep`` (the trainer's step: lr, forward, backward, the
fused NaN check, SGD, loss sums) on copies of the same initial weights and the same batches; the
compiled one gets ``torch.compile(loss_fn, mode=...)`` (inductor's C++ backend on the CPU), as
``dist.compile`` gives it on a GPU. Reported:

* compile time: the first compiled step minus the first eager step, with an empty inductor
  cache (a fresh ``TORCHINDUCTOR_CACHE_DIR``) unless ``--warm-cache``;
* epoch time: ``--rounds`` rounds each run ``--block`` steps of every variant in turn (order
  alternating), so a busy machine slows both alike; wall and CPU time per block scaled to an
  epoch, medians, and the per-round ratio compiled/eager;
* exactness: the first step's loss and, after all steps, the largest parameter difference and
  the test accuracy of both models; then the same few steps again in float64;
* the per-step overhead left to remove: a third variant, "bare", is the plain loop (forward,
  loss, zero_grad, backward, SGD step) without the trainer's step around it.

Not a test: a measurement to read.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "seed.yaml")
    parser.add_argument("--mode", default="default", help="torch.compile mode (default: default)")
    parser.add_argument("--rounds", type=int, default=24)
    parser.add_argument("--block", type=int, default=50, help="steps per variant per round")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--float64-steps", type=int, default=50)
    parser.add_argument("--warm-cache", action="store_true", help="keep inductor's on-disk cache (default: empty)")
    args = parser.parse_args()
    if not args.warm_cache:  # before torch is imported: inductor reads it then
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-cold-")

    import torch

    from mnistdist.config import load_config
    from mnistdist.data import TrainBatches, load_tensors
    from mnistdist.distributed import Dist
    from mnistdist.metrics import LossMeter, per_sample_loss
    from mnistdist.step import EagerStep
    from mnistdist.training import build_model, build_optimizer, evaluate

    if args.threads:
        torch.set_num_threads(args.threads)

    def setup(dtype: str) -> tuple:
        cfg = load_config(args.config, ["dist.device=cpu", f"model.dtype={dtype}"])
        dist = Dist(cfg.dist)
        return cfg, dist

    def make(cfg, dist, base, compiled: bool, bare: bool = False):
        model = copy.deepcopy(base)
        optimizer = build_optimizer(cfg, model)

        def loss_fn(x, y):
            return per_sample_loss(model(x), y, cfg.train.loss).mean()

        fn = torch.compile(loss_fn, mode=args.mode) if compiled else loss_fn
        meter = LossMeter(dist.device, getattr(torch, cfg.model.dtype))
        if bare:
            def bare_step(x, y, lr, number):
                loss = loss_fn(x, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                meter.epoch_sum += loss.detach()
            return model, bare_step, meter
        return model, EagerStep(dist, model, optimizer, fn, meter, lambda: False, 10**9), meter

    cfg, dist = setup("float32")
    tensors = load_tensors(os.environ.get("MNISTDIST_DATA_ROOT", cfg.data.root))
    batches = TrainBatches(cfg.data, tensors, cfg.train.global_batch_size, 0, 1, cfg.train.seed, dist.device)
    data = list(batches.epoch(0))
    torch.manual_seed(cfg.train.seed)
    base = build_model(cfg, dist.device)
    names = ("eager", "compiled", "bare")
    runs = {name: make(cfg, dist, base, name == "compiled", name == "bare") for name in names}

    first_s, first_loss = {}, {}
    for name in names:
        _, step, meter = runs[name]
        start = time.perf_counter()
        step(*data[0], cfg.train.lr, 1)
        first_s[name] = time.perf_counter() - start
        first_loss[name] = meter.epoch_sum.item()
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    done = {n: 1 for n in names}
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            _, step, _ = runs[name]
            w, c = time.perf_counter(), time.process_time()
            for _ in range(args.block):
                x, y = data[done[name] % len(data)]
                done[name] += 1
                step(x, y, cfg.train.lr, done[name])
            wall[name].append(time.perf_counter() - w)
            cpu[name].append(time.process_time() - c)
    per_epoch = len(data) / args.block

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, config {args.config.name}, "
          f"mode {args.mode}, inductor cache {'warm' if args.warm_cache else 'empty'}; "
          f"{args.rounds} rounds x {args.block} steps per variant")
    print(f"compile time (first compiled step - first eager step): {first_s['compiled'] - first_s['eager']:.2f} s")
    for name in names:
        print(f"{name:>9}: epoch wall {statistics.median(wall[name]) * per_epoch:.3f} s "
              f"[{min(wall[name]) * per_epoch:.3f}-{max(wall[name]) * per_epoch:.3f}], "
              f"CPU {statistics.median(cpu[name]) * per_epoch:.3f} s")
    for other in ("compiled", "bare"):
        for label, series in (("wall", wall), ("CPU", cpu)):
            ratios = [c / e for c, e in zip(series[other], series["eager"])]
            print(f"{other}/eager {label} time per round: median {statistics.median(ratios):.3f} "
                  f"[{min(ratios):.3f}-{max(ratios):.3f}]")

    names = ("eager", "compiled")
    params = {n: list(runs[n][0].parameters()) for n in names}
    diff = max((a - b).abs().max().item() for a, b in zip(params["eager"], params["compiled"]))
    accs = {n: evaluate(cfg, dist, runs[n][0], tensors).accuracy for n in names}
    print(f"float32: first-step loss eager {first_loss['eager']!r} compiled {first_loss['compiled']!r} "
          f"(diff {abs(first_loss['eager'] - first_loss['compiled']):.2e}); after {done['eager']} steps: "
          f"max |param diff| {diff:.2e}, test acc eager {accs['eager']:.4f} compiled {accs['compiled']:.4f}")

    cfg64, dist64 = setup("float64")
    torch.manual_seed(cfg64.train.seed)
    base64 = build_model(cfg64, dist64.device)
    runs64 = {n: make(cfg64, dist64, base64, n == "compiled") for n in names}
    for i in range(args.float64_steps):
        for n in names:
            runs64[n][1](*data[i % len(data)], cfg64.train.lr, i + 1)
    p64 = {n: list(runs64[n][0].parameters()) for n in names}
    diff64 = max((a - b).abs().max().item() for a, b in zip(p64["eager"], p64["compiled"]))
    bitwise = all(torch.equal(a, b) for a, b in zip(p64["eager"], p64["compiled"]))
    print(f"float64: after {args.float64_steps} steps max |param diff| {diff64:.2e} (bitwise equal: {bitwise})")


if __name__ == "__main__":
    main()
