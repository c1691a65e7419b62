"""The checkpoint format itself: version, metadata keys, layouts, file and tensor names, the bit packing
of masks, and how a model maps onto them (its PAD linears, config fingerprint and layout).

Pure definitions: nothing here reads or writes files or raises `PADCheckpointError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from .. import _compat
from ..core.compact import pack_mask, packed_mask_bytes, popcount, unpack_mask  # noqa: F401
from ..core.pad_weight import PADWeight
from ..core.registry import named_pad_linears
from ..core.scale_factors import SCALE_FACTOR_NAMES

# pack_mask, packed_mask_bytes, popcount, unpack_mask: the mask packing lives in core.compact, re-exported here.

FORMAT_VERSION = 1
"""Version of the compact checkpoint format written by this package (readers accept 1..FORMAT_VERSION)."""

METADATA_VERSION = "pad_moe.format_version"
METADATA_LAYOUT = "pad_moe.layout"
METADATA_CONFIG = "pad_moe.config"
METADATA_LINEARS = "pad_moe.linears"

LAYOUT_COMPACT = "compact"
LAYOUT_MOE = "moe"
LAYOUTS = (LAYOUT_COMPACT, LAYOUT_MOE)

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

# Tensors of a PAD linear that the compact layouts replace.
RAW_SUFFIXES = ("expert_weight", "static_weight", "mask")
COMPACT_SUFFIXES = ("mask_packed", "static_values", "expert_values")
# Scale factors of a PAD linear: `(1,)` parameters in the model (FSDP refuses 0-d ones), 0-d in the files.
SCALE_SUFFIXES = SCALE_FACTOR_NAMES


# --------------------------------------------------------------------------------------------- file names
def add_variant(name: str, variant: str | None) -> str:
    if not variant:
        return name
    stem, ext = name.split(".", 1)
    return f"{stem}.{variant}.{ext}"


def weights_stem(weights_name: str) -> str:
    """`model.x.safetensors` -> `model.x` (the stem of the shard and index names)."""
    return weights_name[: -len(".safetensors")]


# --------------------------------------------------------------------------------------------- model side
def pad_linear_modules(model: nn.Module) -> dict[str, PADWeight]:
    """`{state-dict prefix (ending in '.'): PAD weight}` of every PAD module (`core.named_pad_linears`): the PAD
    linears of an MoE model, the PAD convolutions of a vision model."""
    return {ref.name + ".": ref.module for ref in named_pad_linears(model)}


def pad_prefix_of(key: str, linears: Mapping[str, Any]) -> str | None:
    """The PAD-linear prefix (ending in '.') that the state-dict `key` belongs to, or None."""
    prefix = key.rsplit(".", 1)[0] + "."
    return prefix if prefix in linears else None


def is_scale_factor_key(key: str, linears: Mapping[str, Any]) -> bool:
    """Whether the state-dict `key` is a scale factor (`scale_logit`, `lambda_static`, `lambda_dynamic`)
    of one of the PAD linears `linears` (`{prefix: linear}`)."""
    return pad_prefix_of(key, linears) is not None and key.rsplit(".", 1)[1] in SCALE_SUFFIXES


def stored_scale_factor(tensor: Tensor) -> Tensor:
    """A scale factor as the files store it: 0-d (the model's parameter is `(1,)`)."""
    return tensor.reshape(()) if tensor.dim() == 1 and tensor.numel() == 1 else tensor


def linear_shape(linear: PADWeight) -> list[int]:
    """The shape of one weight of a PAD module, as stored in `pad_moe.linears`: `[out, in]` of a PAD linear,
    `[out, in / groups, kh, kw]` of a PAD convolution (the shape of its mask)."""
    return list(linear.mask.shape)


def tied_weight_keys(model: nn.Module) -> set[str]:
    """State-dict names of the weights tied to another (stored once, re-tied on load)."""
    return _compat.tied_weight_keys(model)


def pad_config_fingerprint(model: nn.Module) -> dict[str, Any]:
    """The config fields that the tensors of a checkpoint depend on (stored as `pad_moe.config`). A config with a
    `checkpoint_fingerprint()` method (the vision config) gives its own; this is the PAD-MoE one."""
    config = model.config
    own = getattr(config, "checkpoint_fingerprint", None)
    if callable(own):
        return own()
    layers = [index for index, _ in model.named_pad_layers()] if hasattr(model, "named_pad_layers") else None
    return {
        "base_model_type": config.base_model_type,
        "num_experts": config.num_experts,
        "scale_factor_mode": config.scale_factor_mode,
        "partition_granularity": getattr(config, "partition_granularity", "element"),
        "moe_layers": layers,
        "partitioned": bool(config.is_partitioned),
    }


def checkpoint_layout(model: nn.Module, state_dict: Mapping[str, Tensor] | None = None) -> str:
    """`"compact"` once the model is partitioned or any mask has a static entry, else `"moe"`."""
    if getattr(model.config, "is_partitioned", False):
        return LAYOUT_COMPACT
    for prefix, linear in pad_linear_modules(model).items():
        mask = state_dict.get(prefix + "mask") if state_dict is not None else None
        mask = linear.mask if mask is None else mask
        if not bool(mask.all()):
            return LAYOUT_COMPACT
    return LAYOUT_MOE
