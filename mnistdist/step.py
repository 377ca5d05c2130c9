"""One optimizer step: forward, backward, the ranks' stop agreement, update.

``step(x, y, lr, number) -> stop`` takes optimizer step ``number`` (1-based, over the whole
run; the caller counts), adds its loss to the ``LossMeter``'s sums, and returns True when the
ranks agreed to stop after it (every ``check_every``-th step they agree on ``stop_requested()``:
one tiny all-reduce).

``EagerStep`` is the reference. ``GraphedStep`` records the same step once as a CUDA graph and
replays it: on a GPU this tiny model is bound by kernel launches, and a replay launches the
step's kernels at once (1 GPU only).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mnistdist.distributed import Dist
from mnistdist.metrics import LossMeter
from mnistdist.signals import NonFiniteLoss

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _nonfinite_error(number: int) -> NonFiniteLoss:
    return NonFiniteLoss(f"non-finite loss or gradient at step {number}; stopped before the optimizer step; "
                         "lower train.lr or check the data")


class EagerStep:
    """The step as plain PyTorch calls."""

    def __init__(self, dist: Dist, model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn,
                 meter: LossMeter, stop_requested: Callable[[], bool], check_every: int) -> None:
        self.dist, self.model, self.loss_fn = dist, model, loss_fn
        self.stop_requested, self.check_every = stop_requested, check_every
        # accelerate's optimizer wrapper only matters for gradient accumulation and fp16 loss
        # scaling, neither of which we use; the torch optimizer is called directly (the wrapper
        # looks up an optional package on every step(): docs/benchmarks.md).
        self.optimizer = dist.raw_optimizer(optimizer)
        self.params = list(model.parameters())
        self.window_sum, self.epoch_sum = meter.window_sum, meter.epoch_sum
        self._found = torch.zeros(1, device=dist.device)
        self._one = torch.ones((), device=dist.device)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, lr: float, number: int) -> bool:
        """Take optimizer step ``number``; return True if the ranks agreed to stop after it."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = self.loss_fn(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        self.dist.backward(loss)  # DDP averages gradients over ranks here
        # Invariant: after DDP's all-reduce every rank holds bitwise the same gradients, so all
        # reach the same verdict without communicating and a NaN/Inf update is never applied.
        # (A rank's own loss may differ between ranks: the logged, all-reduced one is checked in
        # training.train_record.) One host sync per step; the collective every check_every steps.
        # The check: GradScaler's one fused kernel, "unscaling" by 1.0 (docs/benchmarks.md).
        self._found.zero_()
        torch._amp_foreach_non_finite_check_and_unscale_([p.grad for p in self.params if p.grad is not None],
                                                         self._found, self._one)
        if number % self.check_every == 0:
            nonfinite, stop = self.dist.any_flags([self._found, self.stop_requested()])
        else:
            nonfinite, stop = bool(self._found.item()), False
        if nonfinite:
            raise _nonfinite_error(number)
        self.optimizer.step()
        self.window_sum += loss.detach()
        self.epoch_sum += loss.detach()
        return stop


class GraphedStep:
    """The same step captured once as a CUDA graph and replayed (one GPU, fixed batch size): the
    batch in static buffers, forward, backward, a non-finite check, the fused SGD update (skipped
    in-graph through the optimizer's ``found_inf``, so a NaN step is never applied), the loss
    sums. The lr is a device tensor filled before each replay. A batch of another size (a last
    partial one) takes the eager step."""

    def __init__(self, eager: EagerStep, optimizer: torch.optim.Optimizer, example_x: torch.Tensor,
                 example_y: torch.Tensor, warmup_steps: int = 3) -> None:
        self.eager, self.dist = eager, eager.dist
        self.optimizer = optimizer  # the raw torch optimizer: fused SGD with a tensor lr
        self.x, self.y = example_x.clone(), example_y.clone()  # the graph's static input buffers
        self.lr, self.found_inf, self.nonfinite_seen = (torch.zeros((), device=example_x.device) for _ in range(3))
        for group in optimizer.param_groups:
            group["lr"] = self.lr

        # Warm up on a side stream (as the CUDA-graph docs require) with lr = 0, then put
        # back everything the warm-up touched: weights, momentum, loss sums.
        params = eager.params
        saved_params = [p.detach().clone() for p in params]
        saved_buffers = {p: b.clone() if (b := optimizer.state[p].get("momentum_buffer")) is not None else None
                         for p in params}
        saved_sums = (eager.window_sum.clone(), eager.epoch_sum.clone())
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup_steps):
                optimizer.zero_grad(set_to_none=True)
                self._body()
        torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():
            for p, saved in zip(params, saved_params):
                p.copy_(saved)
            for p, saved in saved_buffers.items():
                buffer = optimizer.state[p].get("momentum_buffer")
                if buffer is not None:
                    # A zero buffer makes the fused update's "later step" formula equal to its
                    # first step exactly (0 * momentum + grad), so a fresh run stays identical.
                    buffer.copy_(saved) if saved is not None else buffer.zero_()
            eager.window_sum.copy_(saved_sums[0])
            eager.epoch_sum.copy_(saved_sums[1])
            self.nonfinite_seen.zero_()

        optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._body()
        # Only the graph may use found_inf: an eager fallback step must not see it.
        del optimizer.found_inf

    def _body(self) -> None:
        # Gradients are None when this is captured, so backward writes them into graph-owned
        # memory, overwritten (not accumulated) by every replay.
        loss = self.eager.loss_fn(self.x, self.y)
        loss.backward()
        flags = [~torch.isfinite(loss.detach())] + [~torch.isfinite(p.grad).all() for p in self.eager.params
                                                    if p.grad is not None]  # no host sync
        self.found_inf.copy_(torch.stack(flags).any().float())
        self.nonfinite_seen.copy_(torch.maximum(self.nonfinite_seen, self.found_inf))
        self.optimizer.found_inf = self.found_inf  # fused SGD skips the update when it is 1
        self.optimizer.step()
        loss = loss.detach()
        self.eager.window_sum.add_(loss)
        self.eager.epoch_sum.add_(loss)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, lr: float, number: int) -> bool:
        if x.shape != self.x.shape:  # the eager step (it sets a float lr), then the lr tensor back
            try:
                return self.eager(x, y, lr, number)
            finally:
                for group in self.optimizer.param_groups:
                    group["lr"] = self.lr
        self.x.copy_(x, non_blocking=True)
        self.y.copy_(y, non_blocking=True)
        self.lr.fill_(lr)
        self.graph.replay()
        if number % self.eager.check_every != 0:
            return False
        nonfinite, stop = self.dist.any_flags([self.nonfinite_seen, self.eager.stop_requested()])
        if nonfinite:
            raise _nonfinite_error(number)
        return stop
