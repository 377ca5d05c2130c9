"""Data: the file checks, the offline error, and both pipelines yielding identical batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mnistdist.config import DataConfig
from mnistdist.data import (
    MNIST_FILES,
    DataError,
    TrainBatches,
    check_mnist_files,
    eval_shard,
    load_tensors,
    normalize,
    prepare_mnist,
    raw_dir,
    seed_transform,
)
from tests.conftest import data_root


@pytest.fixture(scope="module")
def tensors():
    return load_tensors(data_root())


def staged_copy(tmp_path: Path) -> Path:
    """A data root whose raw files are symlinks to the real ones (replace one to damage it)."""
    raw = raw_dir(tmp_path)
    raw.mkdir(parents=True)
    for name in MNIST_FILES:
        (raw / name).symlink_to(raw_dir(data_root()) / name)
    return tmp_path


def replace_with(root: Path, name: str, content: bytes) -> Path:
    path = raw_dir(root) / name
    path.unlink()
    path.write_bytes(content)
    return path


def test_real_files_pass_the_checks():
    assert check_mnist_files(data_root()) == []


def test_missing_file_is_named(tmp_path):
    root = staged_copy(tmp_path)
    (raw_dir(root) / "t10k-images-idx3-ubyte").unlink()
    [problem] = check_mnist_files(root)
    assert "t10k-images-idx3-ubyte: missing" in problem


def test_truncated_file_is_named(tmp_path):
    root = staged_copy(tmp_path)
    good = (raw_dir(data_root()) / "train-images-idx3-ubyte").read_bytes()
    replace_with(root, "train-images-idx3-ubyte", good[: len(good) // 2])
    [problem] = check_mnist_files(root)
    assert "train-images-idx3-ubyte" in problem and "truncated" in problem


def test_wrong_magic_is_named(tmp_path):
    root = staged_copy(tmp_path)
    good = bytearray((raw_dir(data_root()) / "t10k-labels-idx1-ubyte").read_bytes())
    good[3] = 0x03  # magic 2049 -> 2051
    replace_with(root, "t10k-labels-idx1-ubyte", bytes(good))
    [problem] = check_mnist_files(root)
    assert "t10k-labels-idx1-ubyte" in problem and "magic 2051" in problem


def test_label_out_of_range_is_named(tmp_path):
    root = staged_copy(tmp_path)
    good = bytearray((raw_dir(data_root()) / "t10k-labels-idx1-ubyte").read_bytes())
    good[100] = 42
    replace_with(root, "t10k-labels-idx1-ubyte", bytes(good))
    [problem] = check_mnist_files(root)
    assert "label 42 out of range" in problem


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


def test_normalize_is_bit_identical_to_torchvision(tensors):
    from PIL import Image

    transform = seed_transform(0.1307, 0.3081)
    images = tensors.train_images[:64]
    ours = normalize(images, 0.1307, 0.3081)
    theirs = torch.stack([transform(Image.fromarray(img.numpy(), mode="L")) for img in images])
    assert torch.equal(ours, theirs)


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


def test_start_batch_skips_exactly(tensors):
    cfg = DataConfig(root=str(data_root()))
    batches = TrainBatches(cfg, tensors, 100, 0, 2, seed=0, device=torch.device("cpu"))
    full = [y for _, y in batches.epoch(0)]
    resumed = [y for _, y in batches.epoch(0, start_batch=7)]
    assert len(full) == len(batches) == 300
    assert all(torch.equal(a, b) for a, b in zip(full[7:], resumed, strict=True))
    # Resuming right after the epoch's last batch yields nothing (not one empty batch).
    assert list(batches.epoch(0, start_batch=300)) == []


def test_epochs_are_shuffled_differently(tensors):
    batches = TrainBatches(DataConfig(root=str(data_root())), tensors, 200, 0, 1, seed=0, device=torch.device("cpu"))
    assert not torch.equal(batches.epoch_indices(0), batches.epoch_indices(1))
    assert sorted(batches.epoch_indices(0).tolist()) == list(range(60000))


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_eval_shards_cover_each_item_once(n):
    shards = [eval_shard(10000, r, n) for r in range(n)]
    assert sorted(torch.cat(shards).tolist()) == list(range(10000))
