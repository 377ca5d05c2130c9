"""Data: the file checks, the offline error, and both pipelines yielding identical batches.

The file checks run on a tiny synthetic MNIST (tests/synthetic_mnist.py); the tests that read
real MNIST are ``slow`` (left out of ``make test-fast``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mnistdist.config import DataConfig
from mnistdist.data import (
    DataError,
    TrainBatches,
    check_mnist_files,
    eval_shard,
    load_tensors,
    normalize,
    prepare_mnist,
    raw_dir,
    repeated_per_epoch,
    seed_transform,
    validation_split,
)
from tests.conftest import data_root
from tests.synthetic_mnist import idx_images, idx_labels, write_synthetic_mnist


@pytest.fixture(scope="module")
def tensors():
    return load_tensors(data_root())


def replace_with(root: Path, name: str, content: bytes) -> Path:
    path = raw_dir(root) / name
    path.unlink()
    path.write_bytes(content)
    return path


def header(path: Path, fields: int) -> list[int]:
    return [int.from_bytes(path.read_bytes()[i : i + 4], "big") for i in range(0, 4 * fields, 4)]


@pytest.mark.slow
def test_real_files_pass_the_checks():
    assert check_mnist_files(data_root()) == []


def test_synthetic_files_pass_the_checks_and_load(synthetic_mnist):
    """Any item count passes when the headers describe the files; torchvision reads them."""
    assert check_mnist_files(synthetic_mnist) == []
    prepare_mnist(DataConfig(root=str(synthetic_mnist), download=False), is_local_main=True, barrier=lambda: None)
    t = load_tensors(synthetic_mnist)
    assert t.train_images.shape == (1000, 28, 28) and t.test_images.shape == (200, 28, 28)
    assert t.train_images.dtype == torch.uint8 and t.train_labels.dtype == torch.int64
    images = raw_dir(synthetic_mnist) / "train-images-idx3-ubyte"
    assert header(images, 4) == [2051, 1000, 28, 28]
    assert torch.equal(t.train_images[-1].flatten(), torch.tensor(list(images.read_bytes()[-784:]), dtype=torch.uint8))
    assert sorted(set(t.train_labels.tolist())) == list(range(10))


def test_tiny_dataset_passes(tmp_path):
    root = write_synthetic_mnist(tmp_path, num_train=3, num_test=1)
    assert check_mnist_files(root) == []


def test_missing_file_is_named(synthetic_mnist):
    (raw_dir(synthetic_mnist) / "t10k-images-idx3-ubyte").unlink()
    [problem] = check_mnist_files(synthetic_mnist)
    assert problem == f"{raw_dir(synthetic_mnist) / 't10k-images-idx3-ubyte'}: missing"


def test_truncated_file_is_named(synthetic_mnist):
    good = (raw_dir(synthetic_mnist) / "train-images-idx3-ubyte").read_bytes()
    path = replace_with(synthetic_mnist, "train-images-idx3-ubyte", good[: len(good) // 2])
    [problem] = check_mnist_files(synthetic_mnist)
    assert problem.startswith(f"{path}: ") and "truncated" in problem
    assert f"{len(good) // 2} bytes" in problem and "count 1000" in problem


def test_file_longer_than_its_header_says_is_named(synthetic_mnist):
    good = (raw_dir(synthetic_mnist) / "t10k-labels-idx1-ubyte").read_bytes()
    path = replace_with(synthetic_mnist, "t10k-labels-idx1-ubyte", good + b"\0")
    [problem] = check_mnist_files(synthetic_mnist)
    assert problem.startswith(f"{path}: {len(good) + 1} bytes") and "count 200 needs 208" in problem


def test_file_shorter_than_a_header_is_named(synthetic_mnist):
    path = replace_with(synthetic_mnist, "t10k-images-idx3-ubyte", b"\0\0\x08\x03\0")
    [problem] = check_mnist_files(synthetic_mnist)
    assert problem.startswith(f"{path}: 5 bytes") and "16-byte IDX header" in problem


def test_wrong_magic_is_named(synthetic_mnist):
    good = bytearray((raw_dir(synthetic_mnist) / "t10k-labels-idx1-ubyte").read_bytes())
    good[3] = 0x03  # magic 2049 -> 2051
    path = replace_with(synthetic_mnist, "t10k-labels-idx1-ubyte", bytes(good))
    [problem] = check_mnist_files(synthetic_mnist)
    assert problem.startswith(f"{path}: ") and "magic 2051" in problem and "expected magic 2049" in problem


def test_images_not_28x28_are_named(synthetic_mnist):
    good = bytearray((raw_dir(synthetic_mnist) / "train-images-idx3-ubyte").read_bytes())
    good[8:16] = (14).to_bytes(4, "big") + (56).to_bytes(4, "big")  # same bytes per image, wrong shape
    path = replace_with(synthetic_mnist, "train-images-idx3-ubyte", bytes(good))
    [problem] = check_mnist_files(synthetic_mnist)
    assert problem.startswith(f"{path}: ") and "14x56" in problem and "expected 28x28" in problem


def test_images_and_labels_must_agree_on_the_count(synthetic_mnist):
    """Each file is sound on its own (header matches size) but the split's two files differ."""
    labels = raw_dir(synthetic_mnist) / "train-labels-idx1-ubyte"
    good = labels.read_bytes()
    fewer = (2049).to_bytes(4, "big") + (999).to_bytes(4, "big") + good[8:-1]
    replace_with(synthetic_mnist, "train-labels-idx1-ubyte", fewer)
    [problem] = check_mnist_files(synthetic_mnist)
    images = raw_dir(synthetic_mnist) / "train-images-idx3-ubyte"
    assert problem.startswith(f"{labels}: 999 labels") and f"{images} has 1000 images" in problem


def test_label_out_of_range_is_named(synthetic_mnist):
    good = bytearray((raw_dir(synthetic_mnist) / "t10k-labels-idx1-ubyte").read_bytes())
    good[100] = 42
    path = replace_with(synthetic_mnist, "t10k-labels-idx1-ubyte", bytes(good))
    [problem] = check_mnist_files(synthetic_mnist)
    assert problem.startswith(f"{path}: ") and "label 42 out of range" in problem


def test_empty_split_is_named(synthetic_mnist):
    replace_with(synthetic_mnist, "t10k-images-idx3-ubyte", idx_images(np.zeros((0, 28, 28), np.uint8)))
    path = replace_with(synthetic_mnist, "t10k-labels-idx1-ubyte", idx_labels(np.zeros(0, np.uint8)))
    problems = check_mnist_files(synthetic_mnist)
    assert len(problems) == 2 and problems[1] == f"{path}: header says 0 items (empty file)"


def test_one_problem_per_bad_file(synthetic_mnist):
    (raw_dir(synthetic_mnist) / "train-images-idx3-ubyte").unlink()
    replace_with(synthetic_mnist, "t10k-labels-idx1-ubyte", b"junk")
    problems = check_mnist_files(synthetic_mnist)
    raw = raw_dir(synthetic_mnist)
    assert len(problems) == 2
    assert problems[0] == f"{raw / 'train-images-idx3-ubyte'}: missing"
    assert problems[1].startswith(f"{raw / 't10k-labels-idx1-ubyte'}: 4 bytes, shorter than the 8-byte IDX header")
    with pytest.raises(DataError) as info:
        prepare_mnist(DataConfig(root=str(synthetic_mnist), download=False), is_local_main=True, barrier=lambda: None)
    assert all(p in str(info.value) for p in problems)


def test_no_files_and_no_download_says_where_to_put_them(tmp_path):
    cfg = DataConfig(root=str(tmp_path), download=False)
    with pytest.raises(DataError) as info:
        prepare_mnist(cfg, is_local_main=True, barrier=lambda: None)
    text = str(info.value)
    assert str(raw_dir(tmp_path)) in text and "train-images-idx3-ubyte" in text and "MNISTDIST_DATA_ROOT" in text


def test_offline_download_failure_is_reported_not_raised_before_the_barrier(tmp_path, monkeypatch):
    import mnistdist.data as data

    calls = []
    monkeypatch.setattr(data, "download_mnist", lambda root: calls.append(root) or "URLError: no network")
    barrier_reached = []
    with pytest.raises(DataError, match="download failed: URLError: no network"):
        prepare_mnist(DataConfig(root=str(tmp_path)), is_local_main=True, barrier=lambda: barrier_reached.append(1))
    assert calls == [str(tmp_path)] and barrier_reached == [1]
    # Non-main ranks never download; they wait, then report the same problem.
    calls.clear()
    with pytest.raises(DataError):
        prepare_mnist(DataConfig(root=str(tmp_path)), is_local_main=False, barrier=lambda: None)
    assert calls == []


@pytest.mark.slow
def test_normalize_is_bit_identical_to_torchvision(tensors):
    from PIL import Image

    transform = seed_transform(0.1307, 0.3081)
    images = tensors.train_images[:64]
    ours = normalize(images, 0.1307, 0.3081)
    theirs = torch.stack([transform(Image.fromarray(img.numpy(), mode="L")) for img in images])
    assert torch.equal(ours, theirs)


@pytest.mark.slow
@pytest.mark.parametrize("num_replicas,rank", [(1, 0), (2, 1), (3, 2)])
def test_both_pipelines_yield_the_same_batches(tensors, num_replicas, rank):
    root = str(data_root())
    per_process = 60 // num_replicas
    streams = {}
    for pipeline in ("tensor", "torchvision"):
        cfg = DataConfig(root=root, pipeline=pipeline)
        batches = TrainBatches(cfg, tensors, per_process, rank, num_replicas, seed=5, device=torch.device("cpu"))
        it = batches.epoch(epoch=1, start_batch=2)
        streams[pipeline] = [next(it) for _ in range(3)]
    for (xa, ya), (xb, yb) in zip(streams["tensor"], streams["torchvision"]):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xa.shape == (per_process, 1, 28, 28)


@pytest.mark.parametrize("batch,rank,world,epoch,start", [(50, 0, 1, 0, 0), (50, 0, 1, 3, 7), (30, 2, 3, 1, 0),
                                                          (64, 1, 2, 2, 5)])  # 64: a last partial batch
def test_tensor_batches_are_the_samplers_indices_bitwise(synthetic_mnist, batch, rank, world, epoch, start):
    """The tensor pipeline spelled out: normalize every image once, take this rank's
    DistributedSampler indices from ``start`` batches on, index_select batch by batch."""
    tensors, mean, std = load_tensors(synthetic_mnist), 0.1307, 0.3081
    cfg = DataConfig(pipeline="tensor", normalize_mean=mean, normalize_std=std)
    got = list(TrainBatches(cfg, tensors, batch, rank, world, seed=0, device=torch.device("cpu")).epoch(epoch, start))
    sampler = torch.utils.data.DistributedSampler(range(len(tensors.train_labels)), num_replicas=world, rank=rank,
                                                  shuffle=True, seed=0, drop_last=False)
    sampler.set_epoch(epoch)
    indices = torch.tensor(list(sampler), dtype=torch.long)[start * batch:].split(batch)
    images = normalize(tensors.train_images, mean, std)
    assert len(got) == len(indices) > 0
    for (x, y), chunk in zip(got, indices):
        assert torch.equal(x, images.index_select(0, chunk)) and x.dtype == torch.float32
        assert torch.equal(y, tensors.train_labels.index_select(0, chunk))


@pytest.mark.slow
def test_start_batch_skips_exactly(tensors):
    cfg = DataConfig(root=str(data_root()))
    batches = TrainBatches(cfg, tensors, 100, 0, 2, seed=0, device=torch.device("cpu"))
    full = [y for _, y in batches.epoch(0)]
    resumed = [y for _, y in batches.epoch(0, start_batch=7)]
    assert len(full) == len(batches) == 300
    assert all(torch.equal(a, b) for a, b in zip(full[7:], resumed, strict=True))
    # Resuming right after the epoch's last batch yields nothing (not one empty batch).
    assert list(batches.epoch(0, start_batch=300)) == []


@pytest.mark.slow
def test_epochs_are_shuffled_differently(tensors):
    batches = TrainBatches(DataConfig(root=str(data_root())), tensors, 200, 0, 1, seed=0, device=torch.device("cpu"))
    assert not torch.equal(batches.epoch_indices(0), batches.epoch_indices(1))
    assert sorted(batches.epoch_indices(0).tolist()) == list(range(60000))


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_eval_shards_cover_each_item_once(n):
    shards = [eval_shard(10000, r, n) for r in range(n)]
    assert sorted(torch.cat(shards).tolist()) == list(range(10000))


def test_validation_split_is_a_partition_drawn_by_the_seed():
    split = validation_split(1000, 100, seed=3)
    train, val = split.train.tolist(), split.validation.tolist()
    assert len(val) == 100 and len(train) == 900
    assert train == sorted(train) and val == sorted(val)
    assert sorted(train + val) == list(range(1000))
    again = validation_split(1000, 100, seed=3)
    assert torch.equal(again.train, split.train) and torch.equal(again.validation, split.validation)
    assert not torch.equal(validation_split(1000, 100, seed=4).validation, split.validation)
    # Spread over the whole set, not a block at one end.
    assert val[0] < 100 and val[-1] > 900


def test_validation_split_ignores_and_leaves_the_global_random_state():
    torch.manual_seed(0)
    a = validation_split(500, 50, seed=1)
    after = torch.rand(1)
    torch.manual_seed(123)
    b = validation_split(500, 50, seed=1)
    torch.manual_seed(0)
    assert torch.equal(a.validation, b.validation) and torch.equal(torch.rand(1), after)


def test_validation_size_zero_keeps_every_image_in_order():
    split = validation_split(1000, 0, seed=3)
    assert split.train.tolist() == list(range(1000)) and split.validation.numel() == 0


def test_a_validation_set_leaving_nothing_to_train_on_is_a_config_error():
    from mnistdist.config import ConfigError

    with pytest.raises(ConfigError, match=r"data.validation_size: 1000 leaves no training images \(the training set "
                                          r"has 1000\)"):
        validation_split(1000, 1000, seed=0)


@pytest.mark.parametrize("num_items,world", [(60000, 1), (60000, 7), (55000, 7), (1200, 6), (10, 4)])
def test_repeated_per_epoch_is_the_samplers_padding(num_items, world):
    sampler = torch.utils.data.DistributedSampler(range(num_items), num_replicas=world, rank=0, drop_last=False)
    assert repeated_per_epoch(num_items, world) == sampler.total_size - num_items
    assert (repeated_per_epoch(num_items, world) == 0) == (num_items % world == 0)


def test_without_a_validation_set_the_batches_are_unchanged(synthetic_mnist):
    """``train_indices`` of every image gives bitwise the batches of the default."""
    tensors = load_tensors(synthetic_mnist)
    cfg, cpu = DataConfig(), torch.device("cpu")
    split = validation_split(len(tensors.train_labels), 0, seed=0)
    for rank in range(3):
        default = list(TrainBatches(cfg, tensors, 30, rank, 3, seed=0, device=cpu).epoch(2))
        explicit = list(TrainBatches(cfg, tensors, 30, rank, 3, seed=0, device=cpu, train_indices=split.train).epoch(2))
        assert len(default) == len(explicit) > 0
        for (xa, ya), (xb, yb) in zip(default, explicit):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize("world", [2, 3, 4, 6])
def test_with_a_validation_set_n_ranks_batches_are_one_ranks_batches_and_never_validation_images(
        synthetic_mnist, world):
    """1000 images, 100 held out: every epoch trains on the other 900, each once, and the N
    ranks' i-th batches together are the single-process batch i (as without validation)."""
    tensors = load_tensors(synthetic_mnist)
    split = validation_split(len(tensors.train_labels), 100, seed=7)
    held_out = set(split.validation.tolist())
    batch = 60

    def batches(rank: int, num_replicas: int) -> TrainBatches:
        return TrainBatches(DataConfig(), tensors, batch // num_replicas, rank, num_replicas, seed=7,
                            device=torch.device("cpu"), train_indices=split.train)

    one = batches(0, 1)
    assert one.num_images == 900 and one.repeated_per_epoch == 0 and len(one) == 15
    for epoch in (0, 1):
        single = one.epoch_indices(epoch)
        assert sorted(single.tolist()) == split.train.tolist()
        assert not held_out & set(single.tolist())
        per_rank = [batches(r, world).epoch_indices(epoch).split(batch // world) for r in range(world)]
        for i, single_batch in enumerate(single.split(batch)):
            together = torch.cat([chunks[i] for chunks in per_rank])
            assert sorted(together.tolist()) == sorted(single_batch.tolist())
