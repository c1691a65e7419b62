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


# --- eq. 4 on compact storage ------------------------------------------------------------------------------------
# A partitioned PAD weight stores only what eq. 4 reads (`PADWeight.compact_storage_`): `expert_values` `(K, D)`, the
# dynamic entries W_k[M] of every dynamic weight in row-major order, and `static_values` `(S,)`, the static entries
# W_static[~M]; `dynamic_index` `(D,)` / `static_index` `(S,)` are their flat positions (`M.nonzero()`,
# `(~M).nonzero()`).
# Eq. 4 is then a scatter: every row starts as the static term, and the dynamic entries are written over it.


def _compact_forward(
    expert_values: Tensor,
    static_values: Tensor,
    dynamic_index: Tensor,
    static_index: Tensor,
    l_s: Tensor,
    l_d: Tensor,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """`(K, D)`, `(S,)` -> the flat eq. 4 weights `(K, D + S)`, in `out_dtype` if given: the terms are formed in the
    parameters' dtype and rounded once, so the values equal eq. 4's cast to `out_dtype`, without the pass that would
    write the full-precision weights and the pass that would cast them."""
    num = expert_values.shape[0]
    numel = dynamic_index.shape[0] + static_index.shape[0]
    static_term, dynamic_term = static_values * l_s, expert_values * l_d
    if out_dtype is not None:
        static_term, dynamic_term = static_term.to(out_dtype), dynamic_term.to(out_dtype)
    static_row = static_term.new_zeros(numel).index_copy_(0, static_index, static_term)
    return static_row.expand(num, numel).index_copy(1, dynamic_index, dynamic_term)


def _compact_backward(grad: Tensor, saved: tuple[Tensor, ...], needs: tuple[bool, ...]) -> tuple[Tensor | None, ...]:
    """The gradients of compact eq. 4 w.r.t. ``(expert_values, static_values, dynamic_index, static_index, l_s, l_d)``:
    the gathers of `_backward`'s masked gradients (same values, without the zeros of the entries not stored)."""
    expert_values, static_values, dynamic_index, static_index, l_s, l_d = saved
    flat = grad.reshape(grad.shape[0], -1)  # (K, numel), in the dtype the weights were formed in
    dtype = expert_values.dtype  # the gradients are in the parameters' dtype (gathered first: fewer entries to cast)
    grad_values = grad_static = grad_l_s = grad_l_d = None
    if needs[0] or needs[5]:
        dynamic_grad = flat.index_select(1, dynamic_index).to(dtype)  # (K, D)
        if needs[5]:
            grad_l_d = torch.dot(dynamic_grad.reshape(-1), expert_values.reshape(-1)).reshape(l_d.shape)
        if needs[0]:
            grad_values = dynamic_grad.mul_(l_d)
    if needs[1] or needs[4]:
        static_grad = flat.sum(dim=0, dtype=dtype).index_select(0, static_index)  # (S,)
        if needs[4]:
            grad_l_s = torch.dot(static_grad, static_values).reshape(l_s.shape)
        if needs[1]:
            grad_static = static_grad.mul_(l_s)
    return grad_values, grad_static, None, None, grad_l_s, grad_l_d


class _CompactPADWeights(torch.autograd.Function):
    @staticmethod
    def forward(ctx, expert_values, static_values, dynamic_index, static_index, l_s, l_d, out_dtype=None):
        ctx.save_for_backward(expert_values, static_values, dynamic_index, static_index, l_s, l_d)
        return _compact_forward(expert_values, static_values, dynamic_index, static_index, l_s, l_d, out_dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return (*_compact_backward(grad, ctx.saved_tensors, ctx.needs_input_grad), None)


class _StoredCompactPADWeights(torch.autograd.Function):
    """`_StoredPADWeights` for compact storage: the stored flat value, compact eq. 4's backward."""

    @staticmethod
    def forward(ctx, stored, expert_values, static_values, dynamic_index, static_index, l_s, l_d):
        ctx.save_for_backward(expert_values, static_values, dynamic_index, static_index, l_s, l_d)
        return stored.view_as(stored)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return (None, *_compact_backward(grad, ctx.saved_tensors, ctx.needs_input_grad[1:]))


def pad_merge_compact(
    expert_values: Tensor,
    static_values: Tensor,
    dynamic_index: Tensor,
    static_index: Tensor,
    l_s: Tensor,
    l_d: Tensor,
    shape: tuple[int, ...],
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Eq. 4 from compact storage: `expert_values` `(K, D)`, `static_values` `(S,)`, their flat positions, 0-d scale
    factors -> the effective weights `(K, *shape)`; equal (values and gradients) to `pad_merge` of the dense tensors
    they were taken from. `out_dtype` (e.g. the autocast dtype the caller casts to): formed directly in it, equal to
    the full-precision weights cast to it."""
    merged = _CompactPADWeights.apply(expert_values, static_values, dynamic_index, static_index, l_s, l_d, out_dtype)
    return merged.view(expert_values.shape[0], *shape)


def pad_merge_compact_stored(
    stored: Tensor,
    expert_values: Tensor,
    static_values: Tensor,
    dynamic_index: Tensor,
    static_index: Tensor,
    l_s: Tensor,
    l_d: Tensor,
) -> Tensor:
    """`pad_merge_stored` for compact storage: `stored` `(K, *shape)`, already formed and current."""
    return _StoredCompactPADWeights.apply(stored, expert_values, static_values, dynamic_index, static_index, l_s, l_d)
