"""Where the time of a 2-process CPU step goes (docs/benchmarks.md, "Where a 2-process step's
time goes").

    torchrun --nproc_per_node 2 benchmarks/allreduce_breakdown.py [--reps 3]

Each rank trains the seed model on its half of every global batch of 200 (1 thread per
process, as under the launcher), with the gradient all-reduce done by hand so that it can be
timed apart from the rest of the step, three ways in turn: no communication at all (the
compute floor); gloo's all-reduce of the gradients (one flat tensor, like DDP's single bucket
for this model); and that plus the 2-flag all-reduce of the stop agreement that
``train.stop_check_every_steps=1`` adds to every step. Communication time includes waiting for
the other rank. Not a test: a measurement to read.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

from mnistdist.data import load_tensors, normalize
from mnistdist.model import MLP


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="epochs per way (median reported)")
    parser.add_argument("--data-root", default=os.environ.get("MNISTDIST_DATA_ROOT", "data"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    tensors = load_tensors(args.data_root)
    images, labels = normalize(tensors.train_images, 0.1307, 0.3081), tensors.train_labels
    torch.manual_seed(0)
    model = MLP(final_relu=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    params = list(model.parameters())
    flat = torch.zeros(sum(p.numel() for p in params))
    flags = torch.zeros(2)
    per_rank = 200 // world_size

    def epoch(way: str) -> tuple[float, float]:
        order = torch.randperm(60000, generator=torch.Generator().manual_seed(0))[rank::world_size]
        comm_s, start = 0.0, time.perf_counter()
        for i in range(0, len(order), per_rank):
            idx = order[i:i + per_rank]
            loss = torch.nn.functional.cross_entropy(model(images.index_select(0, idx)), labels.index_select(0, idx))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if way != "none":
                torch.cat([p.grad.reshape(-1) for p in params], out=flat)
                flat.div_(world_size)
                t0 = time.perf_counter()
                dist.all_reduce(flat)
                if way == "gloo+flags":
                    dist.all_reduce(flags)
                comm_s += time.perf_counter() - t0
                for p, summed in zip(params, flat.split([p.numel() for p in params])):
                    p.grad.copy_(summed.view_as(p))
            optimizer.step()
        return time.perf_counter() - start, comm_s

    results: dict[str, list[tuple[float, float]]] = {"none": [], "gloo": [], "gloo+flags": []}
    for _ in range(args.reps):
        for way in results:  # interleaved, so that drifts of the machine hit all three alike
            results[way].append(epoch(way))
    if rank == 0:
        for way, runs in results.items():
            print(f"{way:10s} epoch median {statistics.median(r[0] for r in runs):.3f} s, of which "
                  f"all-reduce (waiting included) {statistics.median(r[1] for r in runs):.3f} s")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
