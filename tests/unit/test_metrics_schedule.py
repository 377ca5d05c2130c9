import json
import math

import pytest
import torch
import torch.nn.functional as F

from mnistdist.metrics import Best, EvalCounts, improves, per_sample_loss
from mnistdist.schedule import lr_at


def test_cross_entropy_matches_torch():
    logits, y = torch.randn(50, 10), torch.randint(0, 10, (50,))
    assert torch.allclose(per_sample_loss(logits, y, "cross_entropy").mean(), F.cross_entropy(logits, y))


def test_mse_is_softmax_vs_one_hot():
    logits, y = torch.randn(50, 10), torch.randint(0, 10, (50,))
    expected = F.mse_loss(logits.softmax(1), F.one_hot(y, 10).float())
    assert torch.allclose(per_sample_loss(logits, y, "mse").mean(), expected)


def test_eval_counts_sum_over_any_split_is_exact():
    torch.manual_seed(0)
    logits, y = torch.randn(1000, 10), torch.randint(0, 10, (1000,))
    whole = EvalCounts.from_batch(logits, y, "cross_entropy")
    for n in (2, 3, 7):
        parts = [EvalCounts.from_batch(logits[r::n], y[r::n], "cross_entropy") for r in range(n)]
        total = sum(parts[1:], parts[0])
        assert torch.equal(total.confusion, whole.confusion)
        assert math.isclose(total.loss_sum, whole.loss_sum, rel_tol=1e-9)
    assert whole.total == 1000
    assert whole.correct == int((logits.argmax(1) == y).sum())
    assert whole.accuracy == whole.correct / 1000
    per_class = whole.per_class_accuracy()
    c = 3
    assert per_class[c] == pytest.approx(float(((logits.argmax(1) == y) & (y == c)).sum() / (y == c).sum()))


def test_pack_unpack_roundtrip():
    counts = EvalCounts(torch.arange(100).view(10, 10), 12.5)
    back = EvalCounts.from_tensor(counts.to_tensor())
    assert torch.equal(back.confusion, counts.confusion) and back.loss_sum == 12.5


def test_constant_schedule():
    assert lr_at(0, 100, 0.1, "constant") == lr_at(99, 100, 0.1, "constant") == 0.1


def test_cosine_schedule_shape():
    total, base = 1000, 0.1
    assert lr_at(0, total, base, "cosine") == pytest.approx(base)
    assert lr_at(500, total, base, "cosine") == pytest.approx(base / 2)
    assert lr_at(total, total, base, "cosine") == pytest.approx(0.0, abs=1e-12)
    lrs = [lr_at(s, total, base, "cosine") for s in range(total)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_cosine_warmup():
    lrs = [lr_at(s, 100, 1.0, "cosine", warmup_steps=10) for s in range(12)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0)  # decay starts after warm-up
    assert lrs[11] < 1.0


def test_unknown_schedule():
    with pytest.raises(ValueError):
        lr_at(0, 10, 0.1, "step")


def test_loss_sums_resume_on_any_number_of_ranks():
    from mnistdist.metrics import LossMeter

    saved = [{"window_sum": 1.5, "window_steps": 3, "epoch_sum": 10.0},
             {"window_sum": 2.5, "window_steps": 3, "epoch_sum": 14.0}]
    # The same world size: each rank its own sums, untouched.
    assert [LossMeter.for_rank(saved, r, 2) for r in range(2)] == saved
    # Another one: what is logged (sum over ranks / number of ranks) is unchanged.
    for world_size in (1, 3, 4, 6):
        resplit = [LossMeter.for_rank(saved, r, world_size) for r in range(world_size)]
        assert all(s["window_steps"] == 3 for s in resplit)
        for key in ("window_sum", "epoch_sum"):
            assert sum(s[key] for s in resplit) / world_size == sum(s[key] for s in saved) / 2
    meter = LossMeter(torch.device("cpu"), torch.float64)
    meter.load_state_dict(LossMeter.for_rank(saved, 0, 3))
    assert meter.window_sum.dtype == torch.float64 and meter.state_dict()["window_sum"] == 6.0


def counts(correct: int, total: int, loss_sum: float) -> EvalCounts:
    """Counts of ``total`` samples (every true class 0), ``correct`` of them predicted right."""
    confusion = torch.zeros(10, 10, dtype=torch.int64)
    confusion[0, 0], confusion[0, 1] = correct, total - correct
    return EvalCounts(confusion, loss_sum)


def test_best_is_the_highest_val_acc_then_the_lowest_val_loss_then_the_earlier():
    first = counts(90, 100, 30.0)
    assert improves(None, first)  # the first evaluation always is the best so far
    best = Best.of(first, step=10, epoch=1)
    assert (best.step, best.epoch, best.val_acc, best.val_loss, best.val_correct, best.val_total) == (
        10, 1, 0.9, 0.3, 90, 100)
    assert improves(best, counts(91, 100, 90.0))  # higher accuracy wins whatever the loss
    assert not improves(best, counts(89, 100, 1.0))
    assert improves(best, counts(90, 100, 29.0))  # a tie: the lower loss wins
    assert not improves(best, counts(90, 100, 30.0))  # a full tie: the earlier stays
    assert not improves(best, counts(90, 100, 31.0))


def test_best_state_dict_round_trips_exactly():
    best = Best.of(counts(97, 100, 1 / 3), step=600, epoch=2)
    state = best.state_dict()
    assert Best.from_state_dict(json.loads(json.dumps(state))) == best
    assert set(state) == {"step", "epoch", "val_acc", "val_loss", "val_correct", "val_total"}


def test_eval_records_name_their_set():
    c = counts(3, 4, 2.0)
    assert c.as_record() == {"test_loss": 0.5, "test_acc": 0.75, "test_correct": 3, "test_total": 4}
    assert c.as_record("val") == {"val_loss": 0.5, "val_acc": 0.75, "val_correct": 3, "val_total": 4}
