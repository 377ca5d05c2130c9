"""Losses and exact evaluation counts (pure functions; reduction happens in distributed.py)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mnistdist.model import NUM_CLASSES


def per_sample_loss(logits: torch.Tensor, targets: torch.Tensor, kind: str) -> torch.Tensor:
    """Loss of each sample, shape [B]: ``cross_entropy`` (-log softmax(logits)[target]) or
    ``mse`` (mean over the classes of (softmax(logits) - one_hot(target))^2, whose batch mean is
    ``F.mse_loss``'s), in the logits' precision (float32 for half-precision logits).

    Never below it: a float64 model's loss and backward (the 1/b of each rank's batch mean) stay
    float64, which makes N ranks equal one rank at any N (in float32, 1/b * 1/N rounds to 1/B
    exactly only when N is a power of two).
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if kind == "cross_entropy":
        return F.cross_entropy(logits, targets, reduction="none")
    if kind == "mse":
        probs = logits.softmax(dim=1)
        one_hot = F.one_hot(targets, NUM_CLASSES).to(probs.dtype)
        return (probs - one_hot).pow(2).mean(dim=1)
    raise ValueError(f"unknown loss {kind!r}")


@dataclass
class EvalCounts:
    """Exact sums over a set of samples: a confusion matrix and the summed loss. Sums (not
    means) are what ranks add, so the result does not depend on how the samples were split."""

    confusion: torch.Tensor  # [10, 10] int64, rows = true class, columns = predicted
    loss_sum: float

    @classmethod
    def zeros(cls) -> EvalCounts:
        return cls(torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64), 0.0)

    @classmethod
    def from_batch(cls, logits: torch.Tensor, targets: torch.Tensor, loss_kind: str) -> EvalCounts:
        flat = (targets * NUM_CLASSES + logits.argmax(dim=1)).cpu()
        confusion = torch.bincount(flat, minlength=NUM_CLASSES * NUM_CLASSES).view(NUM_CLASSES, NUM_CLASSES)
        return cls(confusion, per_sample_loss(logits, targets, loss_kind).double().sum().item())

    def __add__(self, other: EvalCounts) -> EvalCounts:
        return EvalCounts(self.confusion + other.confusion, self.loss_sum + other.loss_sum)

    # One float64 vector, so a single all-reduce carries it all (counts up to 2**53 are exact).
    def to_tensor(self) -> torch.Tensor:
        return torch.cat([self.confusion.flatten().double(), torch.tensor([self.loss_sum], dtype=torch.float64)])

    @classmethod
    def from_tensor(cls, packed: torch.Tensor) -> EvalCounts:
        packed = packed.cpu()
        return cls(packed[:-1].round().long().view(NUM_CLASSES, NUM_CLASSES), float(packed[-1]))

    @property
    def total(self) -> int:
        return int(self.confusion.sum())

    @property
    def correct(self) -> int:
        return int(self.confusion.diagonal().sum())

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else float("nan")

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.total if self.total else float("nan")

    def per_class_accuracy(self) -> list[float]:
        pairs = zip(self.confusion.diagonal().tolist(), self.confusion.sum(dim=1).tolist())
        return [correct / total if total else float("nan") for correct, total in pairs]

    def as_record(self, prefix: str = "test") -> dict:
        """``test_loss``, ``test_acc``, ``test_correct``, ``test_total`` (or ``val_*``) of a
        metrics.jsonl evaluation line."""
        return {f"{prefix}_loss": self.mean_loss, f"{prefix}_acc": self.accuracy,
                f"{prefix}_correct": self.correct, f"{prefix}_total": self.total}


@dataclass(frozen=True)
class Best:
    """The validation result that chose the best model so far (never the test set), and when."""

    step: int  # the optimizer step after which the model was evaluated
    epoch: int  # its epoch, 1-based as in metrics.jsonl
    val_acc: float
    val_loss: float
    val_correct: int
    val_total: int

    @classmethod
    def of(cls, counts: EvalCounts, step: int, epoch: int) -> Best:
        return cls(step, epoch, counts.accuracy, counts.mean_loss, counts.correct, counts.total)

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Best:
        return cls(**{f.name: state[f.name] for f in dataclasses.fields(cls)})


def improves(best: Best | None, counts: EvalCounts) -> bool:
    """Whether validation ``counts`` make a new best model: the first evaluation, a higher
    accuracy, or an equal one with a lower loss (on a full tie the earlier model stays, as
    Lightning's ModelCheckpoint keeps the first of equal scores)."""
    return best is None or (counts.accuracy, -counts.mean_loss) > (best.val_acc, -best.val_loss)


class LossMeter:
    """This rank's training-loss sums (``window_*``: since the last training line; ``epoch_sum``:
    this epoch), kept on the device (no host sync per step) and added to by the step itself;
    checkpointed so logs resume exactly. Updated in place: a CUDA graph holds their addresses."""

    def __init__(self, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        # In the model's precision: a float64 run's logged losses are float64 sums too.
        self.window_sum = torch.zeros((), device=device, dtype=dtype)
        self.window_steps = 0
        self.epoch_sum = torch.zeros((), device=device, dtype=dtype)

    def state_dict(self) -> dict[str, Any]:
        # float32/float64 -> Python float is exact, and back again.
        return {"window_sum": float(self.window_sum), "window_steps": self.window_steps,
                "epoch_sum": float(self.epoch_sum)}

    @staticmethod
    def for_rank(saved: list[dict[str, Any]], rank: int, world_size: int) -> dict[str, Any]:
        """Rank ``rank``'s loss sums to resume with, from every saved rank's ``state_dict()``: its
        own at the same world size (bitwise); at another, the logged mean (sum over ranks / ranks)
        re-split so the next line logs the same value: all on rank 0 (times the new number of
        ranks), zeros on the others (adding zeros is exact)."""
        if len(saved) == world_size:
            return saved[rank]
        scale = world_size / len(saved)
        return {"window_steps": saved[0]["window_steps"],
                **{key: scale * sum(s[key] for s in saved) if rank == 0 else 0.0
                   for key in ("window_sum", "epoch_sum")}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window_sum.fill_(state["window_sum"])
        self.window_steps = state["window_steps"]
        self.epoch_sum.fill_(state["epoch_sum"])
