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

from ._common import all_reduce_sum, check_model, scoring_mode, task_loss, world_size
from .batches import Batch, check_batches
from .scores import only_requires_grad
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
    Under DDP the gradients are averaged over ranks before the step, so every rank warms up identically.
    On exit (also on error) the expert weights are restored bitwise and each parameter's `.grad` and
    `requires_grad` are put back as they were; the optimizer is local, so nothing is left behind.

    Cost: `steps` forward-backward passes. Memory, for expert weights of ``E`` bytes in all: the two Adam
    moments (``2E``, in the weights' dtype) and a backup (``E``), which is skipped when every expert is
    bitwise a copy of the static weight (right after upcycling: the static weight is the backup). Only the
    expert weights require grad during the warm-up (no activation is kept for other parameters' gradients),
    and each linear's Adam step runs in the backward as soon as its gradient is complete, so at most one
    linear's gradient is alive at a time (a single process; under DDP all gradients are reduced first).
    """
    model = check_model(model)
    batches = check_batches(batches)
    if steps < 0:
        raise ValueError(f"warm-up steps must be >= 0, got {steps}.")
    linears = list(linears_by_name(model).values())
    params = [linear.expert_weight for linear in linears]
    saved_grads = [p.grad for p in params]
    # None: restore from the static weight, of which every expert is a bitwise copy.
    saved = [None if _copies_of_static(linear) else linear.expert_weight.detach().clone() for linear in linears]
    try:
        for p in params:
            p.grad = None  # the warm-up's own gradients must not add to a user's
        if steps:
            with scoring_mode(model), only_requires_grad(model, params):
                if world_size() == 1:
                    _warmup_in_backward(model, batches, params, steps, lr, betas, eps, progress)
                else:
                    _warmup_all_reduced(model, batches, params, steps, lr, betas, eps, progress)
        yield
    finally:
        with torch.no_grad():
            for linear, original, grad in zip(linears, saved, saved_grads):
                linear.expert_weight.copy_(linear.static_weight.unsqueeze(0) if original is None else original)
                linear.expert_weight.grad = grad


def _copies_of_static(linear: nn.Module) -> bool:
    """True when every expert is bitwise equal to the static weight (signed zeros and NaN payloads included)."""
    experts, static = linear.expert_weight.detach(), linear.static_weight.detach()
    if experts.dtype != static.dtype or experts.shape[1:] != static.shape:
        return False
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}.get(experts.element_size())
    if bits is None or not experts.is_floating_point():
        return False
    static_bits = static.view(bits)
    return all(torch.equal(expert.view(bits), static_bits) for expert in experts)


def _warmup_in_backward(model, batches, params, steps, lr, betas, eps, progress) -> None:
    """One process: each expert weight takes its Adam step from a post-accumulate-grad hook, then drops its
    gradient, so the gradients of all linears never coexist. A weight's hook runs after every node that reads
    it has run its backward, so updating it in place there cannot change any other gradient of the pass. One
    single-tensor `Adam` per weight computes exactly what one `Adam` over all of them computes."""
    optimizers = [torch.optim.Adam([p], lr=lr, betas=betas, eps=eps) for p in params]

    stepped: set[int] = set()

    def step(index: int):
        def hook(param: torch.Tensor) -> None:
            optimizers[index].step()
            param.grad = None
            stepped.add(index)

        return hook

    handles = [p.register_post_accumulate_grad_hook(step(i)) for i, p in enumerate(params)]
    try:
        for s in range(steps):
            index = s % len(batches)
            stepped.clear()
            task_loss(model, batches[index], index=index).backward(inputs=params)
            for i, (p, optimizer) in enumerate(zip(params, optimizers)):
                if i not in stepped:  # a weight this loss does not reach: a step with a zero gradient, as Adam takes
                    p.grad = torch.zeros_like(p)
                    optimizer.step()
                    p.grad = None
            if progress is not None:
                progress.update(1)
    finally:
        for handle in handles:
            handle.remove()


def _warmup_all_reduced(model, batches, params, steps, lr, betas, eps, progress) -> None:
    """DDP: every rank must run the same collectives, so all gradients are taken, averaged, then stepped."""
    optimizer = torch.optim.Adam(params, lr=lr, betas=betas, eps=eps)
    for s in range(steps):
        index = s % len(batches)
        loss = task_loss(model, batches[index], index=index)
        grads = [
            torch.zeros_like(p) if g is None else g
            for g, p in zip(torch.autograd.grad(loss, params, allow_unused=True), params)
        ]
        del loss
        all_reduce_sum(grads)
        for p, g in zip(params, grads):
            p.grad = g.div_(world_size())
        del grads
        optimizer.step()
        for p in params:
            p.grad = None  # not alive during the next pass
        if progress is not None:
            progress.update(1)


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
            weight = linear.dynamic_parameter  # the dense experts, or the stored dynamic entries (compact storage)
            std = float(linear.dense_static_weight().float().std()) * relative_std
            noise = torch.randn(weight.shape, generator=generator, dtype=torch.float32) * std
            weight.add_(noise.to(device=weight.device, dtype=weight.dtype))
