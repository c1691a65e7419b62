"""Eq. 4 of PAD-Net, the one place it is written:

    W_eff_k = l_d * M * W_k + l_s * (1 - M) * W_static

for ``K`` dynamic weights ``W_k`` at once (the experts of an MoE linear; the per-sample kernel mixtures of
a dynamic convolution), one static weight and one mask shared by all ``k``. A boolean mask takes the
fused path below; a float mask (the relaxation IMP scores with) takes plain autograd, so that the mask
itself receives a gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor


class _MergedPADWeights(torch.autograd.Function):
    """Eq. 4 for a boolean mask with a hand-written backward.

    Autograd's own backward of ``where(M, l_d * W, l_s * W_static)`` materialises both branches of the
    ``where`` and the product ``grad * W`` as full `(K, *shape)` temporaries; this one masks the gradient
    once, reduces the scale-factor gradients with dot products and scales in place, which roughly halves
    the memory traffic of the PAD overhead in a training step.
    """

    @staticmethod
    def forward(ctx, dynamic: Tensor, static: Tensor, mask: Tensor, l_s: Tensor, l_d: Tensor) -> Tensor:
        static_term = torch.where(mask, 0.0, static * l_s)
        ctx.save_for_backward(dynamic, static, mask, l_s, l_d)
        if torch.compiler.is_compiling():
            # A traced graph (torch.compile, torch.export) records these ops and an exported program replays them
            # under autograd, which refuses `out=` writes into a tensor that requires grad; one broadcast `where`
            # is the same values (the compiler fuses it, so the cache-sized loop buys nothing there).
            return torch.where(mask, dynamic * l_d, static_term)
        merged = torch.empty_like(dynamic)
        for k in range(dynamic.shape[0]):  # one dynamic weight at a time: temporaries stay cache-sized
            torch.where(mask, dynamic[k] * l_d, static_term, out=merged[k])
        return merged

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _backward(grad, ctx.saved_tensors, ctx.needs_input_grad)


def _backward(grad: Tensor, saved: tuple[Tensor, ...], needs: tuple[bool, ...]) -> tuple[Tensor | None, ...]:
    """The gradients of eq. 4 (boolean mask) w.r.t. ``(dynamic, static, mask, l_s, l_d)``."""
    dynamic, static, mask, l_s, l_d = saved
    grad_dynamic = grad_static = grad_l_s = grad_l_d = None
    if needs[0] or needs[4]:
        dynamic_grad = grad.masked_fill(~mask, 0.0)  # (K, *shape)
        if needs[4]:
            grad_l_d = torch.dot(dynamic_grad.reshape(-1), dynamic.reshape(-1)).reshape(l_d.shape)
        if needs[0]:
            grad_dynamic = dynamic_grad.mul_(l_d)
    if needs[1] or needs[3]:
        static_grad = grad.sum(dim=0).masked_fill_(mask, 0.0)  # (*shape)
        if needs[3]:
            grad_l_s = torch.dot(static_grad.reshape(-1), static.reshape(-1)).reshape(l_s.shape)
        if needs[1]:
            grad_static = static_grad.mul_(l_s)
    return grad_dynamic, grad_static, None, grad_l_s, grad_l_d


class _StoredPADWeights(torch.autograd.Function):
    """Eq. 4 whose value is already formed (a merged layer's stored weights, `core.inference`): the forward returns
    it (a view, no computation), the backward is eq. 4's own, so gradients are those of `pad_merge`."""

    @staticmethod
    def forward(ctx, stored: Tensor, dynamic: Tensor, static: Tensor, mask: Tensor, l_s: Tensor, l_d: Tensor) -> Tensor:
        ctx.save_for_backward(dynamic, static, mask, l_s, l_d)
        return stored.view_as(stored)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return (None, *_backward(grad, ctx.saved_tensors, ctx.needs_input_grad[1:]))


def pad_merge_stored(stored: Tensor, dynamic: Tensor, static: Tensor, mask: Tensor, l_s: Tensor, l_d: Tensor) -> Tensor:
    """`pad_merge(dynamic, static, mask, l_s, l_d)` for a boolean mask when its value `stored` is already formed (and
    current): that value, with eq. 4's gradient w.r.t. the other arguments."""
    return _StoredPADWeights.apply(stored, dynamic, static, mask, l_s, l_d)


def pad_merge(dynamic: Tensor, static: Tensor, mask: Tensor, l_s: Tensor, l_d: Tensor) -> Tensor:
    """Eq. 4: `dynamic` `(K, *shape)`, `static` `(*shape)`, `mask` `(*shape)` (bool, or float in [0, 1] for
    the IMP relaxation), 0-d scale factors `l_s`, `l_d` -> the effective weights `(K, *shape)`.

    For a boolean mask, values and gradients equal those of ``where(M, l_d * W_k, l_s * W_static)``; the
    entries that eq. 4 does not read (``W_k[~M]``, ``W_static[M]``) get exactly zero gradient.
    """
    if mask.dtype == torch.bool:
        return _MergedPADWeights.apply(dynamic, static, mask, l_s, l_d)
    return l_d * mask * dynamic + (l_s * (1.0 - mask) * static).unsqueeze(0)
