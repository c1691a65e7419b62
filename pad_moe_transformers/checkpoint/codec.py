"""Encoding a state dict into the tensors of a PAD checkpoint and decoding them back (validated) into
the dense state dict that `load_state_dict(strict=True)` accepts."""

from __future__ import annotations

import json
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..pad_linear import PADExpertLinear
from .format import (
    COMPACT_SUFFIXES,
    FORMAT_VERSION,
    LAYOUT_COMPACT,
    LAYOUT_MOE,
    METADATA_CONFIG,
    METADATA_LAYOUT,
    METADATA_VERSION,
    RAW_SUFFIXES,
    checkpoint_layout,
    is_scale_factor_key,
    pack_mask,
    pad_config_fingerprint,
    pad_linear_modules,
    pad_prefix_of,
    stored_scale_factor,
    tied_weight_keys,
    unpack_mask,
)
from .validate import (
    PADCheckpointError,
    check_compact_values,
    check_dense_experts,
    check_metadata,
    check_no_missing,
    check_no_unexpected,
    check_packed_mask,
    check_saved_linears,
    check_scale_factor,
    check_state_tensor,
    fail,
    require_tensor,
)


# --------------------------------------------------------------------------------------------- encoding
def _remove_tied_weights(state_dict: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    try:
        from transformers.modeling_utils import remove_tied_weights_from_state_dict
    except ImportError:  # pragma: no cover - older transformers
        return state_dict
    return remove_tied_weights_from_state_dict(state_dict, model)


def encode_linear(prefix: str, state_dict: Mapping[str, Tensor], layout: str) -> dict[str, Tensor]:
    """The stored tensors (by suffix) that replace the raw `expert_weight` / `static_weight` / `mask`
    of the PAD linear `prefix` in the given layout."""
    missing = [prefix + s for s in RAW_SUFFIXES if prefix + s not in state_dict]
    if missing:
        raise PADCheckpointError(f"Cannot save: the state dict lacks {missing} of the PAD linear {prefix[:-1]!r}.")
    expert = state_dict[prefix + "expert_weight"].detach().cpu()
    if layout == LAYOUT_MOE:
        return {"expert_weight": expert}
    mask = state_dict[prefix + "mask"].detach().cpu().bool()
    static = state_dict[prefix + "static_weight"].detach().cpu()
    flat_mask = mask.reshape(-1)
    return {
        "mask_packed": pack_mask(mask),
        "static_values": static.reshape(-1)[~flat_mask].contiguous(),
        "expert_values": expert.reshape(expert.shape[0], -1)[:, flat_mask].contiguous(),
    }


def compact_state_dict(
    model: nn.Module, state_dict: Mapping[str, Tensor] | None = None
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Encode `state_dict` (default: `model.state_dict()`) into the tensors of a PAD checkpoint.

    Returns `(tensors, metadata)`: CPU tensors ready for safetensors and the header metadata
    (without `pad_moe.linears`, which is per file). Tied weights are dropped (they are re-tied on load).
    The `(1,)` scale-factor parameters are stored 0-d, as format version 1 specifies.
    """
    state_dict = dict(model.state_dict() if state_dict is None else state_dict)
    state_dict = _remove_tied_weights(state_dict, model)
    layout = checkpoint_layout(model, state_dict)
    linears = pad_linear_modules(model)
    encoded = {prefix: encode_linear(prefix, state_dict, layout) for prefix in linears}
    # Keep the state-dict order; each PAD linear's tensors replace its raw tensors in place.
    out: dict[str, Tensor] = {}
    for key, tensor in state_dict.items():
        prefix = pad_prefix_of(key, linears)
        if prefix is not None and key[len(prefix):] in RAW_SUFFIXES:
            if prefix in encoded:
                for name, value in encoded.pop(prefix).items():
                    out[prefix + name] = value
            continue
        tensor = tensor.detach().cpu()
        if is_scale_factor_key(key, linears):
            tensor = stored_scale_factor(tensor)
        out[key] = tensor.contiguous()
    metadata = {
        "format": "pt",
        METADATA_VERSION: str(FORMAT_VERSION),
        METADATA_LAYOUT: layout,
        METADATA_CONFIG: json.dumps(pad_config_fingerprint(model), sort_keys=True),
    }
    return out, metadata


# --------------------------------------------------------------------------------------------- decoding
def decode_linear(
    prefix: str,
    linear: PADExpertLinear,
    tensors: Mapping[str, Tensor],
    layout: str,
    target: dict[str, Tensor],
) -> None:
    """Validate the stored tensors of one PAD linear and write its dense tensors into `target`."""
    num_experts, out_features, in_features = linear.num_experts, linear.out_features, linear.in_features
    numel = out_features * in_features

    if layout == LAYOUT_MOE:
        expert = require_tensor(tensors, prefix, "expert_weight", layout)
        check_dense_experts(prefix, linear, expert)
        target[prefix + "expert_weight"] = expert
        # Never partitioned: the static weight is unused (M = 1 everywhere). It is rebuilt as the experts'
        # mean, which is exactly the dense weight they were upcycled from while they are still equal.
        if bool((expert == expert[:1]).all()):
            static = expert[0].clone()
        else:
            static = expert.float().mean(dim=0).to(expert.dtype)
        target[prefix + "static_weight"] = static
        target[prefix + "mask"] = torch.ones(out_features, in_features, dtype=torch.bool)
        return

    packed = require_tensor(tensors, prefix, "mask_packed", layout)
    nnz = check_packed_mask(prefix, linear, packed)
    static_values = require_tensor(tensors, prefix, "static_values", layout)
    expert_values = require_tensor(tensors, prefix, "expert_values", layout)
    check_compact_values(prefix, linear, nnz, static_values, expert_values)
    flat_mask = unpack_mask(packed, numel)
    expert = torch.zeros(num_experts, numel, dtype=expert_values.dtype)
    expert[:, flat_mask] = expert_values
    static = torch.zeros(numel, dtype=static_values.dtype)
    static[~flat_mask] = static_values
    target[prefix + "expert_weight"] = expert.view(num_experts, out_features, in_features)
    target[prefix + "static_weight"] = static.view(out_features, in_features)
    target[prefix + "mask"] = flat_mask.view(out_features, in_features)


def decode_checkpoint(
    model: nn.Module, tensors: Mapping[str, Tensor], metadata: Mapping[str, str]
) -> dict[str, Tensor]:
    """Validate the tensors of a checkpoint against `model` (a skeleton built from the config, e.g. on
    the meta device) and return the dense state dict that `load_state_dict(strict=True)` accepts
    (minus tied weights, which the model re-ties)."""
    layout = check_metadata(metadata, model.config, model)
    linears = pad_linear_modules(model)
    check_saved_linears(metadata, linears)
    expected = model.state_dict(keep_vars=True)
    dense: dict[str, Tensor] = {}
    for prefix, linear in linears.items():
        decode_linear(prefix, linear, tensors, layout, dense)
    stored_suffixes = COMPACT_SUFFIXES if layout == LAYOUT_COMPACT else ("expert_weight",)
    allowed_pad = {prefix + s for prefix in linears for s in stored_suffixes}
    unexpected = []
    for key, tensor in tensors.items():
        if key in allowed_pad:
            continue
        if key not in expected or (pad_prefix_of(key, linears) and key.rsplit(".", 1)[1] in RAW_SUFFIXES):
            unexpected.append(key)
            continue
        if is_scale_factor_key(key, linears):
            tensor = check_scale_factor(key, tensor, expected[key])
        check_state_tensor(key, tensor, expected[key])
        dense[key] = tensor
    check_no_unexpected(unexpected, linears)
    check_no_missing(expected, dense, tied_weight_keys(model))
    return dense


def expand_compact_entries(model: nn.Module, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Replace the compact / plain-MoE entries of the PAD linears found in `state_dict` by their dense
    tensors (for `load_state_dict` on a checkpoint read by other code, e.g. Trainer's resume). Other
    entries pass through; a partially present compact group raises."""
    linears = pad_linear_modules(model)
    out = dict(state_dict)
    for prefix, linear in linears.items():
        present = [s for s in COMPACT_SUFFIXES if prefix + s in state_dict]
        if present:
            missing = [prefix + s for s in COMPACT_SUFFIXES if s not in present]
            if missing:
                fail(f"The state dict has {prefix}{present[0]} but lacks {missing} to decode it.")
            layout, stored = LAYOUT_COMPACT, COMPACT_SUFFIXES
        elif prefix + "expert_weight" in state_dict and not any(
            prefix + s in state_dict for s in ("static_weight", "mask")
        ):
            layout, stored = LAYOUT_MOE, ()  # plain-MoE entry: the decoded expert_weight replaces it
        else:
            continue
        dense: dict[str, Tensor] = {}
        decode_linear(prefix, linear, state_dict, layout, dense)
        for s in stored:
            del out[prefix + s]
        out.update(dense)
    return out
