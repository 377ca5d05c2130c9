"""Run under the real launcher: record which training samples each rank sees in one epoch.

It builds the process group and the batches exactly as training does (``Dist`` and
``TrainBatches``), but with each sample's label replaced by its index, so the labels that come
out of the batch stream *are* the sample ids. Rank 0 writes {rank: [ids...]} as JSON.
"""

import json
import sys

import torch

from mnistdist.config import load_config
from mnistdist.data import TrainBatches, load_tensors
from mnistdist.distributed import Dist


def main(out_path: str) -> None:
    cfg = load_config(None)
    dist = Dist(cfg.dist)
    tensors = load_tensors(cfg.data.root)
    tensors.train_labels = torch.arange(len(tensors.train_labels))
    batches = TrainBatches(cfg.data, tensors, cfg.train.global_batch_size // dist.world_size,
                           dist.rank, dist.world_size, cfg.train.seed, dist.device)
    seen = torch.cat([y for _, y in batches.epoch(0)]).tolist()
    all_seen = dist.gather_object(seen)
    if dist.is_main:
        with open(out_path, "w") as f:
            json.dump({"world_size": dist.world_size, "seen": all_seen}, f)
    dist.close()


if __name__ == "__main__":
    main(sys.argv[1])
