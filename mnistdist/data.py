"""MNIST: download once per node, verify the files, and build each rank's batches.

Sharding contract (see ``TrainBatches``): torch's ``DistributedSampler`` owns the split of
the training set. Batches are drawn from its index list and are *never* handed to
``accelerator.prepare`` (that would shard them a second time; accelerate issues 3520/4199).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from mnistdist.config import ConfigError, DataConfig


class DataError(RuntimeError):
    """MNIST files missing or damaged; the message says which file and what to do."""


MNIST_SPLITS = tuple((f"{split}-images-idx3-ubyte", f"{split}-labels-idx1-ubyte") for split in ("train", "t10k"))
"""(images, labels) file of each split: both must hold the same number of items."""
# IDX format: a big-endian header, then one unsigned byte per value. Images (magic 2051 =
# unsigned bytes, 3 dims): magic, count, rows, cols. Labels (2049, 1 dim): magic, count.
MNIST_FILES = {name: magic for files in MNIST_SPLITS for name, magic in zip(files, (2051, 2049))}
"""File name -> its magic number."""
MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
IMAGE_SIZE = 28


def raw_dir(root: str | os.PathLike) -> Path:
    """Where the four raw files live under ``data.root`` (torchvision's layout)."""
    return Path(root) / "MNIST" / "raw"


def _check_idx_file(path: Path, magic: int) -> tuple[int | None, str | None]:
    """``(item count, None)`` for a sound IDX file, else ``(None, problem)``. Any number of
    items is accepted (the fast tests use a tiny synthetic set) if the header describes the file."""
    if not path.is_file():
        return None, f"{path}: missing"
    images = magic == 2051
    header_size = 16 if images else 8
    item_size = IMAGE_SIZE * IMAGE_SIZE if images else 1
    size = path.stat().st_size
    with open(path, "rb") as f:
        header = f.read(header_size)
        if len(header) < header_size:
            return None, (f"{path}: {size} bytes, shorter than the {header_size}-byte IDX header "
                          "(truncated or wrong file)")
        fields = [int.from_bytes(header[i : i + 4], "big") for i in range(0, header_size, 4)]
        found_magic, count = fields[0], fields[1]
        if found_magic != magic:
            return None, f"{path}: header says magic {found_magic}, expected magic {magic} (not an MNIST IDX file)"
        if images and fields[2:] != [IMAGE_SIZE, IMAGE_SIZE]:
            return None, (f"{path}: header says {fields[2]}x{fields[3]} images, expected "
                          f"{IMAGE_SIZE}x{IMAGE_SIZE} (not an MNIST image file)")
        expected = header_size + count * item_size
        if size != expected:
            return None, (f"{path}: {size} bytes, but its header's count {count} needs {expected} "
                          "(truncated or wrong file)")
        if count == 0:
            return None, f"{path}: header says 0 items (empty file)"
        if not images:
            top = max(f.read())
            if top > 9:
                return None, f"{path}: label {top} out of range 0..9 (corrupted)"
    return count, None


def check_mnist_files(root: str | os.PathLike) -> list[str]:
    """One problem per bad file (none when all four are present and sound): magic number,
    header count matching the file size, 28x28 images, labels in 0..9, and the images and
    labels of each split agreeing on the count."""
    problems, counts = [], {}
    for name, magic in MNIST_FILES.items():
        count, problem = _check_idx_file(raw_dir(root) / name, magic)
        if problem:
            problems.append(problem)
        else:
            counts[name] = count
    for images, labels in MNIST_SPLITS:
        if images in counts and labels in counts and counts[images] != counts[labels]:
            problems.append(
                f"{raw_dir(root) / labels}: {counts[labels]} labels but {raw_dir(root) / images} has "
                f"{counts[images]} images (the files do not belong together)"
            )
    return problems


def download_mnist(root: str | os.PathLike) -> str | None:
    """Download with torchvision; return an error text instead of raising (see ``prepare_mnist``)."""
    import torchvision

    try:
        torchvision.datasets.MNIST(str(root), train=True, download=True)
        torchvision.datasets.MNIST(str(root), train=False, download=True)
    except Exception as e:  # noqa: BLE001 - any failure becomes one line for every rank
        return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
    return None


def prepare_mnist(cfg: DataConfig, is_local_main: bool, barrier: Callable[[], None]) -> None:
    """Make sure MNIST is present and sound on every rank, downloading once per node.

    Only local rank 0 downloads; the others wait at ``barrier``. The downloader never raises
    before the barrier (the others would wait there for the process-group timeout); every rank
    checks the files after it and raises the same DataError."""
    download_error = None
    if is_local_main and cfg.download and check_mnist_files(cfg.root):
        download_error = download_mnist(cfg.root)
    barrier()
    problems = check_mnist_files(cfg.root)
    if problems:
        if not cfg.download:
            download_error = "data.download is false"
        raise DataError("\n".join([
            "MNIST data is not usable:", *[f"  {p}" for p in problems],
            *([f"  download failed: {download_error}"] if download_error else []),
            f"Put the four uncompressed files ({', '.join(MNIST_FILES)}) in {raw_dir(cfg.root)}/ (from "
            f"{MNIST_URL}, gunzipped), or point data.root / MNISTDIST_DATA_ROOT at a directory that has MNIST/raw/."]))


@dataclass
class MnistTensors:
    """The whole of MNIST as uint8 images [N, 28, 28] and int64 labels [N]."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor

    def to(self, device: torch.device) -> MnistTensors:
        """The same tensors on ``device``."""
        return MnistTensors(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))


def read_idx(path: Path) -> torch.Tensor:
    """An IDX file of unsigned bytes (checked by ``check_mnist_files``) as a uint8 tensor of the
    header's shape: [N, 28, 28] for images, [N] for labels."""
    with open(path, "rb") as f:
        ndim = f.read(4)[3]  # magic = 0x00 0x00 <type 0x08: unsigned byte> <number of dimensions>
        shape = [int.from_bytes(f.read(4), "big") for _ in range(ndim)]
        values = np.fromfile(f, dtype=np.uint8)  # one copy, straight from the file
    return torch.from_numpy(values).reshape(shape)


def load_tensors(root: str | os.PathLike) -> MnistTensors:
    """Read the verified raw files into the same tensors as torchvision's ``MNIST`` (``.data``
    uint8, ``.targets`` int64; tested): faster, and no ``import torchvision`` before the first
    step (docs/benchmarks.md)."""
    raw = raw_dir(root)
    return MnistTensors(
        read_idx(raw / "train-images-idx3-ubyte"), read_idx(raw / "train-labels-idx1-ubyte").long(),
        read_idx(raw / "t10k-images-idx3-ubyte"), read_idx(raw / "t10k-labels-idx1-ubyte").long(),
    )


def normalize(images_u8: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """uint8 [B, 28, 28] -> float [B, 1, 28, 28], bit-identical to ToTensor() + Normalize()."""
    # Same ops in the same order as torchvision: x.float().div(255), then (x - mean) / std;
    # in place on the new float copy, so normalizing all 60,000 images peaks at one copy.
    return images_u8.unsqueeze(1).to(torch.float32, copy=True).div_(255).sub_(mean).div_(std)


def seed_transform(mean: float, std: float) -> Callable:
    """The seed's per-sample transform."""
    from torchvision import transforms

    return transforms.Compose([transforms.ToTensor(), transforms.Normalize((mean,), (std,))])


VALIDATION_STREAM = 1 << 40
"""Added to ``train.seed`` to seed the validation split: a stream of torch's generator that the
sampler's shuffles (seeded ``train.seed + epoch``) never use."""


@dataclass(frozen=True)
class Split:
    """The training images divided into the images trained on and the validation set, as
    ascending indices into ``MnistTensors.train_images``."""

    train: torch.Tensor
    validation: torch.Tensor


def validation_split(num_items: int, validation_size: int, seed: int) -> Split:
    """Hold ``validation_size`` of the ``num_items`` training images out, chosen by ``seed``
    alone (no rank, no global random state: every rank of every world size draws the same
    split); a ConfigError when nothing would be left to train on."""
    if validation_size >= num_items:
        raise ConfigError(f"data.validation_size: {validation_size} leaves no training images "
                          f"(the training set has {num_items})")
    if validation_size == 0:
        return Split(torch.arange(num_items), torch.arange(0))
    generator = torch.Generator().manual_seed(seed + VALIDATION_STREAM)
    perm = torch.randperm(num_items, generator=generator)
    return Split(perm[validation_size:].sort().values, perm[:validation_size].sort().values)


def repeated_per_epoch(num_items: int, num_replicas: int) -> int:
    """Images the sampler repeats each epoch to give ``num_replicas`` ranks equal shares
    (``DistributedSampler`` with ``drop_last=False`` pads ``num_items`` up to a multiple of
    ``num_replicas`` with its first indices). 0 when ``num_replicas`` divides ``num_items``."""
    return -num_items % num_replicas


class TrainBatches:
    """One rank's training batches, epoch by epoch, in the DistributedSampler's order.

    Why 1 process == N processes: with ``drop_last=False`` the sampler gives rank r the
    indices ``perm[r::N]`` of one permutation seeded by ``seed + epoch`` (the same on every
    rank). Rank r's i-th batch is ``perm[r + N*(i*b + k)]`` for k < b = B/N, so the N ranks'
    i-th batches together are exactly ``perm[i*B:(i+1)*B]``: the single-process batch i.
    (The training set is padded to a multiple of N by repeating the first indices when N does
    not divide it: ``repeated_per_epoch``.)

    ``train_indices`` (default: every training image) are the images trained on, e.g.
    ``validation_split(...).train``: the sampler permutes their positions, and position p is
    image ``train_indices[p]``, so the same argument holds for any subset.
    """

    def __init__(self, cfg: DataConfig, tensors: MnistTensors, per_process_batch_size: int, rank: int,
                 num_replicas: int, seed: int, device: torch.device, train_indices: torch.Tensor | None = None) -> None:
        self.cfg, self.batch_size, self.device = cfg, per_process_batch_size, device
        self.train_indices = torch.arange(len(tensors.train_labels)) if train_indices is None else train_indices.cpu()
        self.sampler = DistributedSampler(range(len(self.train_indices)), num_replicas=num_replicas, rank=rank,
                                          shuffle=True, seed=seed, drop_last=False)  # it only needs len()
        if cfg.pipeline == "tensor":
            # Normalized once and gathered by index: cheaper than normalizing per batch
            # (docs/benchmarks.md), and the same elementwise ops, so the same bits.
            self.images = normalize(tensors.train_images.to(device), cfg.normalize_mean, cfg.normalize_std)
            self.labels = tensors.train_labels.to(device)
        else:
            import torchvision

            transform = seed_transform(cfg.normalize_mean, cfg.normalize_std)
            self.dataset = torchvision.datasets.MNIST(cfg.root, train=True, download=False, transform=transform)

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        return -(-len(self.sampler) // self.batch_size)

    @property
    def num_images(self) -> int:
        """Training images per epoch over all ranks (before the sampler's padding)."""
        return len(self.train_indices)

    @property
    def repeated_per_epoch(self) -> int:
        """Images the sampler repeats per epoch to even out the ranks' shares."""
        return repeated_per_epoch(len(self.train_indices), self.sampler.num_replicas)

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """This rank's sample indices (into the training images) for ``epoch``, in order."""
        self.sampler.set_epoch(epoch)
        return self.train_indices[torch.tensor(list(self.sampler), dtype=torch.long)]

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(images, labels)`` for ``epoch`` from batch ``start_batch`` on (for resume)."""
        indices = self.epoch_indices(epoch)[start_batch * self.batch_size :]
        if self.cfg.pipeline == "tensor":
            indices = indices.to(self.device)
            # (not indices.split(): on an empty tensor it yields one empty batch)
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                # index_select: several times faster than self.images[chunk] on a CPU
                yield self.images.index_select(0, chunk), self.labels.index_select(0, chunk)
        else:
            loader = DataLoader(self.dataset, batch_size=self.batch_size, num_workers=self.cfg.num_workers,
                                sampler=indices.tolist(), pin_memory=self.device.type == "cuda")  # indices: a sampler
            for x, y in loader:
                yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def eval_shard(num_items: int, rank: int, num_replicas: int) -> torch.Tensor:
    """Indices ``rank, rank + N, ...``: every item exactly once over the ranks, no padding."""
    return torch.arange(rank, num_items, num_replicas)
