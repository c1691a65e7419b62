"""Importance scores of the dynamic elements (paper eqs. 6-8) and the ways to break the upcycling tie.

Eq. 7 relaxes the binary mask ``M`` of every PAD linear to a float tensor and takes ``g = dL/dM``
by autograd, one forward-backward per mini-batch, summed over the batches. For expert ``i`` the
computational weight is ``W_eff_i = l_d*M*W_i + l_s*(1-M)*W_static``, so

    g = sum_i  dL/dW_eff_i  *  (l_d*W_i - l_s*W_static)                      (out, in)

Right after upcycling every ``W_i`` equals ``W_static`` and ``l_s = l_d = 1``: ``g`` is exactly
zero everywhere and every score ties (the "trap"). Three ways out, compared in ``docs/partition.md``
(the first two in `partition.warmup`):

- `expert_warmup`: a few Adam steps of the expert weights of the fully dynamic MoE on the partition
  batches, so the experts diverge from the static copy; eq. 7 is then taken at the warmed-up point
  and the weights are restored afterwards (score ``"warmup_grad"``, the default);
- `perturb_experts`: small per-expert noise at upcycling, which stays in the model (score ``"grad"``);
- `expert_weight_gradients` -> connection sensitivity ``sum_i |W_i * dL/dW_i|`` (score ``"connection"``).

With ``partition_granularity="neuron"`` one mask variable ``m_j`` covers a whole intermediate neuron
(row ``j`` of fc_in, column ``j`` of fc_out and the fc_in bias), so by the chain rule

    dL/dm_j = sum_k g_in[j, k] + sum_k g_out[k, j] + sum_i dL/db_i[j] * (b_i[j] - b_static[j])

(`neuron_mask_gradients`; the signed sum is taken before any magnitude). `neuron_sums` sums
element scores (e.g. the connection saliency) the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ..pad_linear import PADExpertLinear
from ._common import all_reduce_sum, check_model, element_path, scoring_mode, task_loss
from .batches import Batch, check_batches
from .units import layer_linears, linears_by_name, neuron_masks


def _accumulator(tensor: Tensor) -> Tensor:
    """A zero tensor like `tensor` in at least fp32 (bf16/fp16 models accumulate in fp32)."""
    dtype = torch.promote_types(tensor.dtype, torch.float32) if tensor.is_floating_point() else torch.float32
    return torch.zeros(tensor.shape, dtype=dtype, device=tensor.device)


@contextlib.contextmanager
def only_requires_grad(model: nn.Module, tensors: Iterable[Tensor]) -> Iterator[None]:
    """While active, the parameters of `model` in `tensors` require grad and no other parameter does
    (restored on exit, also for parameters a user froze).

    A scoring or warm-up pass needs the gradient of a few tensors only. A parameter that requires grad
    makes autograd keep the input of every op that reads it (the activations its weight gradient needs),
    so freezing the others shrinks what each pass holds; the gradients asked for are computed by the
    same backward formulas, so they do not change.
    """
    keep = {id(t) for t in tensors}
    params = list(model.parameters())
    before = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(id(p) in keep)
        yield
    finally:
        for p, flag in zip(params, before):
            p.requires_grad_(flag)


def mask_direction(linear: PADExpertLinear, expert: int | None = None) -> Tensor:
    """``dW_eff/dM`` of eq. 4 for every expert, `(E, out, in)` (for one `expert`: `(1, out, in)`), without autograd.

    Eq. 4 is affine in ``M``, so the derivative is ``W_eff(M=1) - W_eff(M=0) = l_d*W_i - l_s*W_static``;
    both ends are `PADExpertLinear.effective_weight` with the relaxed mask set to ones / zeros, which
    multiply exactly (no rounding). It is exactly zero where the expert equals the scaled static weight.
    """
    saved = linear.soft_mask
    dtype = linear.dynamic_parameter.dtype
    try:
        with torch.no_grad():
            dynamic = None if expert is None else linear.dense_expert_weight()[expert : expert + 1]
            linear.soft_mask = torch.ones_like(linear.mask, dtype=dtype)
            ones = linear.effective_weight(dynamic)
            linear.soft_mask = torch.zeros_like(linear.mask, dtype=dtype)
            return ones.sub_(linear.effective_weight(dynamic))
    finally:
        linear.soft_mask = saved


@contextlib.contextmanager
def soft_masks(model: nn.Module) -> Iterator[dict[str, Tensor]]:
    """Relax every binary mask to a float leaf tensor that requires grad (eq. 7); yields them by linear name.

    While active, the PAD forward uses ``l_d*M*W_i + l_s*(1-M)*W_static`` with the float ``M``.
    """
    linears = linears_by_name(model)
    relaxed = {}
    try:
        for name, linear in linears.items():
            relaxed[name] = linear.mask.to(linear.dynamic_parameter.dtype).requires_grad_(True)
            linear.soft_mask = relaxed[name]
        yield relaxed
    finally:
        for linear in linears.values():
            linear.soft_mask = None


def _batch_gradients(
    model: nn.Module, batches: list[Batch], inputs: list[Tensor], progress: Any | None
) -> Iterator[tuple[Tensor | None, ...]]:
    """Per batch, ``dL/d inputs`` of the task loss: one forward-backward with `torch.autograd.grad`
    (no parameter `.grad` is written); ticks `progress` once per batch."""
    for index, batch in enumerate(batches):
        loss = task_loss(model, batch, index=index)
        yield torch.autograd.grad(loss, inputs, allow_unused=True)
        if progress is not None:
            progress.update(1)


def mask_gradients(
    model: nn.Module, batches: Iterable[Batch], *, progress: Any | None = None
) -> dict[str, Tensor]:
    """Eq. 7: ``g = dL/dM`` at the current weights and masks, summed over `batches` (and over DDP ranks).

    One forward-backward per batch (`torch.autograd.grad` w.r.t. the relaxed masks only, so no
    parameter `.grad` is written). The model runs in eval mode (no dropout).

    Returns:
        `{linear name: g}`, each `g` of shape `(out, in)` (fp32 or wider), signed. ``g_j`` approximates
        ``L(M) - L(M - t_j)`` of eq. 6 for a dynamic element ``j``.
    """
    model = check_model(model)
    batches = check_batches(batches)
    grads = {name: _accumulator(linear.mask) for name, linear in linears_by_name(model).items()}
    # The neuron fast path ignores the float relaxation; the generic path computes the same function.
    with scoring_mode(model), element_path(model), soft_masks(model) as relaxed, only_requires_grad(model, []):
        names = list(relaxed)
        for batch_grads in _batch_gradients(model, batches, [relaxed[n] for n in names], progress):
            for name, g in zip(names, batch_grads):
                if g is not None:
                    grads[name] += g
    all_reduce_sum(list(grads.values()))
    return grads


def neuron_sums(model: nn.Module, element_scores: dict[str, Tensor]) -> dict[str, Tensor]:
    """Sum `(out, in)` element scores per intermediate neuron: row ``j`` of fc_in plus column ``j`` of fc_out.

    Args:
        element_scores: `{linear name: (out, in)}` (``"layer.{i}.fc_in"``, `PADLinearRef.short_name`).

    Returns:
        `{layer name: (I,)}` (``"layer.{i}"``, as `units.layer_linears` names them).
    """
    return {
        name: element_scores[f"{name}.fc_in"].sum(dim=1) + element_scores[f"{name}.fc_out"].sum(dim=0)
        for name in layer_linears(model)
    }


def neuron_mask_gradients(
    model: nn.Module, batches: Iterable[Batch], *, progress: Any | None = None
) -> dict[str, Tensor]:
    """Eq. 7 for neuron-structured masks: ``dL/dm_j`` of each intermediate neuron, summed over `batches`.

    One relaxed mask variable ``m_j`` per neuron switches row ``j`` of fc_in, column ``j`` of fc_out
    and (when fc_in has a shared static bias) the fc_in bias of neuron ``j`` between the expert and
    the static copies, so ``dL/dm_j`` is the signed sum of the element derivatives of eq. 7 over that
    row and column plus the bias term ``sum_i dL/db_i[j] * (b_i[j] - b_static[j])``. One forward-backward
    per batch, in eval mode, with `torch.autograd.grad` (no `.grad` is written); summed over DDP ranks.

    Returns:
        `{layer name: (I,)}` signed (fp32 or wider). Entries of static neurons are meaningless (not candidates).
    """
    model = check_model(model)
    batches = check_batches(batches)
    fc_ins = {name: fc_in for name, (fc_in, _) in layer_linears(model).items()}
    # Only fc_in's bias is switched by the neuron mask (fc_out's output units are the hidden size).
    biased = [n for n, fc_in in fc_ins.items() if fc_in.expert_bias is not None and fc_in.static_bias is not None]
    bias_params = [fc_ins[n].expert_bias for n in biased]
    grads = {name: _accumulator(fc_in.dense_static_weight()[:, 0]) for name, fc_in in fc_ins.items()}
    dtype = next(iter(grads.values())).dtype if grads else torch.float32
    neuron_masks(model)  # raises for masks that are not neuron-structured
    with scoring_mode(model), element_path(model), soft_masks(model) as relaxed, only_requires_grad(model, bias_params):
        names = list(relaxed)
        for out in _batch_gradients(model, batches, [relaxed[n] for n in names] + bias_params, progress):
            element = {
                n: torch.zeros(relaxed[n].shape, dtype=dtype, device=relaxed[n].device) if g is None else g.to(dtype)
                for n, g in zip(names, out[: len(names)])
            }
            for name, g in neuron_sums(model, element).items():
                grads[name] += g
            for name, g in zip(biased, out[len(names) :]):
                if g is not None:
                    fc_in = fc_ins[name]
                    diff = (fc_in.expert_bias.detach().to(dtype) - fc_in.static_bias.detach().to(dtype))
                    grads[name] += (g.to(dtype) * diff).sum(dim=0)
    all_reduce_sum(list(grads.values()))
    return grads


def expert_weight_gradients(
    model: nn.Module, batches: Iterable[Batch], *, progress: Any | None = None
) -> dict[str, Tensor]:
    """``dL/dW_i`` of every expert weight, summed over `batches` (and DDP ranks); `(E, out, in)` per linear.

    Computed with `torch.autograd.grad`, so no parameter `.grad` is written.
    """
    model = check_model(model)
    batches = check_batches(batches)
    linears = linears_by_name(model)
    names = list(linears)
    params = [linears[n].expert_weight for n in names]
    grads = {name: _accumulator(linears[name].expert_weight) for name in names}
    with scoring_mode(model), only_requires_grad(model, params):
        for batch_grads in _batch_gradients(model, batches, params, progress):
            for name, g in zip(names, batch_grads):
                if g is not None:
                    grads[name] += g
    all_reduce_sum(list(grads.values()))
    return grads


def connection_sensitivity(
    model: nn.Module, batches: Iterable[Batch], *, progress: Any | None = None
) -> dict[str, Tensor]:
    """Option (c): ``sum_i |W_i * dL/dW_i|`` (SNIP's saliency summed over the experts), `(out, in)` per linear."""
    model = check_model(model)
    grads = expert_weight_gradients(model, batches, progress=progress)
    linears = linears_by_name(model)
    return {
        name: (linears[name].expert_weight.detach().to(g.dtype) * g).abs().sum(dim=0) for name, g in grads.items()
    }


def normalize_scores(
    raw: dict[str, Tensor], masks: dict[str, Tensor], scope: str = "linear"
) -> dict[str, Tensor]:
    """Eq. 8: ``s_j = |g_j| / |sum_k g_k|``, the sum over the dynamic elements of the scope.

    `scope="linear"` normalises each linear by its own sum, `scope="global"` by one sum over all
    linears (eq. 8 as written). A zero sum leaves the magnitudes unnormalised. The ranking inside a
    scope, hence the partition, does not depend on this normalisation.

    Args:
        raw: `{name: (out, in)}` signed derivatives (or non-negative saliencies).
        masks: `{name: (out, in)}` bool, True = dynamic (only those enter the sums).
    """
    if scope == "global":
        total = sum(float(raw[n][masks[n]].double().sum()) for n in raw)
        sums = dict.fromkeys(raw, abs(total))
    else:
        sums = {n: abs(float(raw[n][masks[n]].double().sum())) for n in raw}
    return {n: raw[n].abs() / (sums[n] if sums[n] > 0 else 1.0) for n in raw}
