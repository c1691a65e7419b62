"""Checkpoint size: the theory (counted from the module) and the bytes on disk."""

from __future__ import annotations

import os

from torch import nn

from ..core import named_pad_linears
from ..core.pad_weight import PAD_WEIGHT_PARAMETER_NAMES
from .format import LAYOUT_COMPACT, checkpoint_layout, packed_mask_bytes, tied_weight_keys


def theoretical_checkpoint_size(model: nn.Module) -> dict[str, int]:
    """Bytes the PAD checkpoint of `model` needs in theory, counted from the module (not the file):
    per PAD linear ``(E * nnz(M) + numel - nnz(M)) * bytes + E * out * bytes (bias) + scales`` plus
    ``ceil(numel / 8)`` mask bytes (``"compact"``) or ``E * numel * bytes`` (``"moe"``), plus every
    other parameter and persistent buffer (untied) at its own element size."""
    layout = checkpoint_layout(model)
    pad_param_ids = set()
    values = value_bytes = mask_bytes = 0
    for linear in (ref.module for ref in named_pad_linears(model)):
        pad_param_ids.update(id(t) for t in [*linear.parameters(recurse=False), linear.mask])
        size = linear.dynamic_parameter.element_size()
        numel = linear.mask.numel()
        if layout == LAYOUT_COMPACT:
            nnz = linear.num_dynamic()
            n = linear.num_experts * nnz + (numel - nnz)
            mask_bytes += packed_mask_bytes(numel)
        else:
            n = linear.num_experts * numel
        for name, p in linear.named_parameters(recurse=False):
            if name not in PAD_WEIGHT_PARAMETER_NAMES:
                values += p.numel()
                value_bytes += p.nbytes
        values += n
        value_bytes += n * size
    other_values = other_bytes = 0
    seen = set()
    state = model.state_dict(keep_vars=True)
    tied = tied_weight_keys(model)
    for key, tensor in state.items():
        if id(tensor) in pad_param_ids or id(tensor) in seen or key in tied:
            continue
        seen.add(id(tensor))
        other_values += tensor.numel()
        other_bytes += tensor.nbytes
    return {
        "layout": layout,
        "pad_values": values,
        "pad_value_bytes": value_bytes,
        "mask_bytes": mask_bytes,
        "non_ffn_values": other_values,
        "non_ffn_bytes": other_bytes,
        "stored_values": values + other_values,
        "total_bytes": value_bytes + mask_bytes + other_bytes,
    }


def checkpoint_file_bytes(directory: str | os.PathLike) -> int:
    """Bytes of all safetensors weight files in `directory` (headers included)."""
    directory = os.fspath(directory)
    return sum(
        os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory) if f.endswith(".safetensors")
    )

