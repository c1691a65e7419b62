"""Two ways out of the upcycling trap (eq. 7 is exactly zero while every expert equals the static weight):
a short Adam warm-up of the experts that is undone afterwards (`expert_warmup`, score ``"warmup_grad"``),
or permanent per-expert noise (`perturb_experts`, then score ``"grad"``). See docs/partition.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from ._common import all_reduce_sum, check_model, requires_grad, scoring_mode, task_loss, world_size
from .batches import Batch, check_batches
from .units import linears_by_name


@contextlib.contextmanager
def expert_warmup(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    steps: int,
    lr: float = 1e-4,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    progress: Any | None = None,
) -> Iterator[None]:
    """Option (a): train only the expert weights for `steps` `torch.optim.Adam` steps, yield, then restore them.

    Step ``s`` uses batch ``s % len(batches)`` and the current masks (static entries get no gradient).
    The gradients are taken with `torch.autograd.grad` and, under DDP, averaged over ranks before the
    step, so every rank warms up identically. On exit (also on error) the expert weights are restored
    bitwise and each parameter's `.grad` is put back as it was; the optimizer is local, so nothing is
    left behind. Costs `steps` forward-backward passes and three copies of the expert weights in memory
    (the two Adam moments, in the weights' dtype, and the backup).
    """
    model = check_model(model)
    batches = check_batches(batches)
    if steps < 0:
        raise ValueError(f"warm-up steps must be >= 0, got {steps}.")
    params = [linear.expert_weight for linear in linears_by_name(model).values()]
    saved = [p.detach().clone() for p in params]
    saved_grads = [p.grad for p in params]
    try:
        if steps:
            optimizer = torch.optim.Adam(params, lr=lr, betas=betas, eps=eps)
            with scoring_mode(model), requires_grad(params):
                for step in range(steps):
                    index = step % len(batches)
                    loss = task_loss(model, batches[index], index=index)
                    grads = [
                        torch.zeros_like(p) if g is None else g
                        for g, p in zip(torch.autograd.grad(loss, params, allow_unused=True), params)
                    ]
                    all_reduce_sum(grads)
                    for p, g in zip(params, grads):
                        p.grad = g.div_(world_size())
                    optimizer.step()
                    if progress is not None:
                        progress.update(1)
            del optimizer
        yield
    finally:
        with torch.no_grad():
            for p, original, grad in zip(params, saved, saved_grads):
                p.copy_(original)
                p.grad = grad


def perturb_experts(model: nn.Module, relative_std: float = 0.01, seed: int = 0) -> None:
    """Option (b): add independent Gaussian noise to every expert weight, in place (it stays in the model).

    The noise of linear ``l`` has std ``relative_std * std(W_static of l)``, drawn from a CPU
    generator seeded with `seed` (the same on every rank). Off by default everywhere: call it right
    after upcycling, before partitioning, if you want eq. 7 at the upcycled point to be non-zero.
    """
    model = check_model(model)
    if relative_std < 0:
        raise ValueError(f"relative_std must be >= 0, got {relative_std}.")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for linear in linears_by_name(model).values():
            weight = linear.expert_weight
            std = float(linear.static_weight.float().std()) * relative_std
            noise = torch.randn(weight.shape, generator=generator, dtype=torch.float32) * std
            weight.add_(noise.to(device=weight.device, dtype=weight.dtype))
