"""Encoding a state dict into the tensors of a PAD checkpoint (decoding is `core.compact.decode_compact`, run by
Transformers' loader through `checkpoint.load.DecodeCompact` and by `PADWeight._load_from_state_dict`)."""

from __future__ import annotations

import json
from collections.abc import Mapping

from torch import Tensor, nn

from ..core.compact import encode_compact, pack_mask
from .format import (
    FORMAT_VERSION,
    LAYOUT_MOE,
    METADATA_CONFIG,
    METADATA_LAYOUT,
    METADATA_VERSION,
    RAW_SUFFIXES,
    checkpoint_layout,
    is_scale_factor_key,
    pad_config_fingerprint,
    pad_linear_modules,
    pad_prefix_of,
    stored_scale_factor,
    tied_weight_keys,
)
from .validate import PADCheckpointError

COMPACT_STORAGE_SUFFIXES = ("expert_values", "static_values")
"""The parameters of a PAD weight in compact storage (`PADWeight.compact_storage_`), stored as they are."""


# --------------------------------------------------------------------------------------------- encoding
def _remove_tied_weights(state_dict: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Drop the weights tied to another one (stored once, re-tied on load), as Transformers' writer does."""
    tied = tied_weight_keys(model)
    return {k: v for k, v in state_dict.items() if k not in tied}


def encode_linear(prefix: str, state_dict: Mapping[str, Tensor], layout: str) -> dict[str, Tensor]:
    """The stored tensors (by suffix) that replace the raw `expert_weight` / `static_weight` / `mask`
    of the PAD linear `prefix` in the given layout."""
    if prefix + "expert_values" in state_dict:  # compact storage: already the stored values, only the mask to pack
        if layout == LAYOUT_MOE:
            raise PADCheckpointError(f"Cannot save {prefix[:-1]!r} in the 'moe' layout: it stores compact values.")
        values = {s: state_dict[prefix + s].detach().cpu().contiguous() for s in ("static_values", "expert_values")}
        return {"mask_packed": pack_mask(state_dict[prefix + "mask"]), **values}
    missing = [prefix + s for s in RAW_SUFFIXES if prefix + s not in state_dict]
    if missing:
        raise PADCheckpointError(f"Cannot save: the state dict lacks {missing} of the PAD linear {prefix[:-1]!r}.")
    expert = state_dict[prefix + "expert_weight"].detach().cpu()
    if layout == LAYOUT_MOE:
        return {"expert_weight": expert}
    return encode_compact(expert, state_dict[prefix + "static_weight"], state_dict[prefix + "mask"])


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
        if prefix is not None and key[len(prefix) :] in (*RAW_SUFFIXES, *COMPACT_STORAGE_SUFFIXES):
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
