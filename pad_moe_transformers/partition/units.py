"""The units a partition decides on, under the names `config.partition` records.

A PAD linear is named by `PADLinearRef.short_name` (``"layer.{i}.fc_in"``, ``"layer.{i}.fc_out"``); with
neuron granularity the unit is an FFN intermediate neuron ``j`` of a MoE layer ``"layer.{i}"``: row ``j``
of fc_in's mask and column ``j`` of fc_out's mask, switched together. Everything here is derived from
`core.named_pad_linears`, the one enumeration of PAD linears; this module imports only the core.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..core import named_pad_linears
from ..core.pad_weight import PADWeight
from ..pad_linear import PADExpertLinear


def linears_by_name(model: nn.Module) -> dict[str, PADWeight]:
    """`{short_name: PAD weight}` in `named_pad_linears` order (PAD linears, or the PAD convolutions of a
    vision model)."""
    return {ref.short_name: ref.module for ref in named_pad_linears(model)}


def layer_linears(model: nn.Module) -> dict[str, tuple[PADExpertLinear, PADExpertLinear]]:
    """`{"layer.{i}": (fc_in, fc_out)}` for every MoE layer, in order (the neuron units); empty for a model without
    MoE layers (a PAD vision model, whose units are elements only)."""
    roles: dict[str, dict[str, PADExpertLinear]] = {}
    refs = named_pad_linears(model)
    if all(ref.layer is None for ref in refs):
        return {}
    for ref in refs:
        if ref.layer is None or ref.role not in ("fc_in", "fc_out"):
            raise ValueError(
                f"The PAD linear {ref.name} belongs to no MoE layer; neuron units need (fc_in, fc_out) pairs."
            )
        roles.setdefault(f"layer.{ref.layer}", {})[ref.role] = ref.module
    return {name: (pair["fc_in"], pair["fc_out"]) for name, pair in roles.items()}


def layer_of(linear_name: str) -> str:
    """``"layer.3.fc_in"`` -> ``"layer.3"``."""
    return linear_name.rsplit(".", 1)[0]


def structured_neurons(fc_in_mask: Tensor, fc_out_mask: Tensor) -> Tensor | None:
    """The `(I,)` bool neuron mask of one MoE layer, or None if its masks are not neuron-structured
    (fc_in `(I, H)` rows and fc_out `(H, I)` columns each all True or all False, the same per neuron)."""
    m_in, m_out = fc_in_mask.bool(), fc_out_mask.bool().to(fc_in_mask.device)
    neurons = m_in.any(dim=1)
    rows = torch.equal(m_in, neurons.unsqueeze(1).expand_as(m_in))
    return neurons if rows and torch.equal(m_out, neurons.unsqueeze(0).expand_as(m_out)) else None


def neuron_masks_of(masks: dict[str, Tensor]) -> dict[str, Tensor]:
    """`{layer: (I,) bool}` from neuron-structured linear masks `{short_name: mask}`; raises for other masks."""
    layers = dict.fromkeys(layer_of(name) for name in masks)
    neurons = {}
    for layer in layers:
        found = structured_neurons(masks[f"{layer}.fc_in"], masks[f"{layer}.fc_out"])
        if found is None:
            raise ValueError(
                f"The masks of {layer} are not neuron-structured, but the model partitions whole neurons "
                "(partition_granularity='neuron'): each row of fc_in's mask and the matching column of fc_out's "
                "mask must be all True (dynamic neuron) or all False (static neuron). Build them with "
                "`linear_masks_of_neurons`, or use partition_model, which partitions whole neurons for such models."
            )
        neurons[layer] = found
    return neurons


def neuron_masks(model: nn.Module) -> dict[str, Tensor]:
    """The current `(I,)` bool neuron masks by layer name (True = dynamic); raises if a mask is not structured."""
    return {name: n.clone() for name, n in neuron_masks_of(current_masks(model)).items()}


def linear_masks_of_neurons(model: nn.Module, neurons: dict[str, Tensor]) -> dict[str, Tensor]:
    """Expand `{layer name: (I,) bool}` to the `(out, in)` masks of its linears (fc_in rows, fc_out columns)."""
    masks = {}
    for name, (fc_in, fc_out) in layer_linears(model).items():
        n = neurons[name].to(device=fc_in.mask.device, dtype=torch.bool)
        masks[f"{name}.fc_in"] = n.unsqueeze(1).expand_as(fc_in.mask).clone()
        masks[f"{name}.fc_out"] = n.unsqueeze(0).expand_as(fc_out.mask).clone()
    return masks


def current_masks(model: nn.Module) -> dict[str, Tensor]:
    """`{short_name: mask}` (the buffers themselves, not copies)."""
    return {name: linear.mask for name, linear in linears_by_name(model).items()}


def write_masks(model: nn.Module, masks: dict[str, Tensor]) -> None:
    """Copy `{short_name: bool mask}` into the model's mask buffers (only the masks, no weights). A layer in compact
    storage goes back to dense storage first (its stored values belong to its old mask)."""
    linears = linears_by_name(model)
    with torch.no_grad():
        for name, mask in masks.items():
            linears[name].dense_storage_()
            linears[name].mask.copy_(mask.to(device=linears[name].mask.device, dtype=torch.bool))
