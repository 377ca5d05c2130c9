"""Device-side batches (issue 17): the index batches, the gather into given buffers and the
gather-then-normalize path are bitwise the batches the tensor pipeline has always given.

On the CPU here; tests/gpu/ repeats the comparison on a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mnistdist.config import DataConfig
from mnistdist.data import TrainBatches, gather_normalized, load_tensors, normalize
from tests.synthetic_mnist import write_synthetic_mnist

MEAN, STD = 0.1307, 0.3081


@pytest.fixture(scope="module")
def tensors(tmp_path_factory):
    return load_tensors(write_synthetic_mnist(tmp_path_factory.mktemp("data"), num_train=1000, num_test=10))


def reference_batches(tensors, batch: int, rank: int, world: int, epoch: int, start_batch: int):
    """The tensor pipeline as it was written before index_batches/gather: normalize every
    image once, take this rank's sampler indices, index_select batch by batch."""
    images = normalize(tensors.train_images, MEAN, STD)
    sampler = torch.utils.data.DistributedSampler(range(len(tensors.train_labels)), num_replicas=world, rank=rank,
                                                  shuffle=True, seed=0, drop_last=False)
    sampler.set_epoch(epoch)
    indices = torch.tensor(list(sampler), dtype=torch.long)[start_batch * batch:]
    return [(images.index_select(0, indices[s:s + batch]), tensors.train_labels.index_select(0, indices[s:s + batch]))
            for s in range(0, len(indices), batch)]


def batches_for(tensors, batch: int, rank: int, world: int) -> TrainBatches:
    cfg = DataConfig(pipeline="tensor", normalize_mean=MEAN, normalize_std=STD)
    return TrainBatches(cfg, tensors, batch, rank, world, seed=0, device=torch.device("cpu"))


@pytest.mark.parametrize("batch,rank,world,epoch,start", [(50, 0, 1, 0, 0), (50, 0, 1, 3, 7), (30, 2, 3, 1, 0),
                                                          (64, 1, 2, 2, 5)])  # 64: a last partial batch
def test_epoch_gather_and_gather_normalized_equal_the_reference_bitwise(tensors, batch, rank, world, epoch, start):
    ours = batches_for(tensors, batch, rank, world)
    expected = reference_batches(tensors, batch, rank, world, epoch, start)
    got = list(ours.epoch(epoch, start_batch=start))
    chunks = list(ours.index_batches(epoch, start_batch=start))
    assert len(got) == len(chunks) == len(expected) > 0
    x_buf, y_buf = torch.empty_like(expected[0][0]), torch.empty_like(expected[0][1])
    for (x, y), chunk, (ex, ey) in zip(got, chunks, expected):
        assert torch.equal(x, ex) and torch.equal(y, ey) and x.dtype == ex.dtype == torch.float32
        if len(chunk) == len(x_buf):  # a captured step's static buffers have the full batch size
            out = ours.gather(chunk, out=(x_buf, y_buf))
            assert out[0] is x_buf and torch.equal(x_buf, ex) and torch.equal(y_buf, ey)
        assert torch.equal(gather_normalized(tensors.train_images, chunk, MEAN, STD), ex)


def test_gather_normalized_is_bitwise_for_every_byte_value():
    """Normalizing a gathered batch equals gathering from the images normalized once, for all
    256 pixel values (elementwise IEEE ops: the same bits whatever the batch)."""
    images = torch.arange(256 * 28 * 28, dtype=torch.int64).remainder(256).to(torch.uint8).reshape(256, 28, 28)
    once = normalize(images, MEAN, STD)
    indices = torch.randperm(256, generator=torch.Generator().manual_seed(0))[:100]
    assert torch.equal(gather_normalized(images, indices, MEAN, STD), once.index_select(0, indices))
