"""Checks that refuse a bad checkpoint with a `PADCheckpointError` naming the file, tensor or config
field at fault: file integrity, header metadata against the config, and the stored tensors against
the model the config builds."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any, NoReturn

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from .._version import __version__
from ..core.pad_weight import PADWeight
from .format import (
    COMPACT_SUFFIXES,
    FORMAT_VERSION,
    LAYOUT_MOE,
    LAYOUTS,
    METADATA_CONFIG,
    METADATA_LAYOUT,
    METADATA_LINEARS,
    METADATA_VERSION,
    RAW_SUFFIXES,
    linear_shape,
    packed_mask_bytes,
    pad_config_fingerprint,
    pad_prefix_of,
    popcount,
)


class PADCheckpointError(ValueError):
    """A PAD-MoE checkpoint is malformed or does not match the model config. The message names the
    tensor, file or config field at fault."""


class PADCheckpointFilesMissingError(PADCheckpointError, OSError):
    """No weights file of the checkpoint (or of the requested variant) was found: an `OSError`, as Transformers
    raises for a plain model."""


def fail(message: str) -> NoReturn:
    raise PADCheckpointError(message)


# --------------------------------------------------------------------------------------------- files
def check_file_integrity(path: str) -> None:
    """Raise a `PADCheckpointError` unless `safetensors` can open the file: a header it can parse whose tensors
    cover the file's bytes exactly (a truncated or padded file, a corrupt header are refused)."""
    try:
        with safe_open(path, framework="pt"):
            pass
    except (SafetensorError, OSError) as error:
        fail(f"Checkpoint file {os.path.basename(path)} is truncated or corrupt ({error}).")


# --------------------------------------------------------------------------------------------- metadata
def check_metadata(metadata: Mapping[str, str], config: Any, model: nn.Module | None = None) -> str:
    """Validate the format version, the layout and the config fingerprint; return the layout."""
    version = metadata.get(METADATA_VERSION)
    if version is None:
        fail(
            f"The checkpoint has no {METADATA_VERSION!r} metadata field: it was not written by "
            "pad_moe_transformers' `save_pretrained` (or was re-saved by another tool). Re-save it with "
            "`PADMoE*.save_pretrained`."
        )
    try:
        version_int = int(version)
    except ValueError:
        version_int = None
    if version_int is None or version_int < 1:
        fail(f"Invalid checkpoint metadata field {METADATA_VERSION}={version!r} (expected an integer >= 1).")
    if version_int > FORMAT_VERSION:
        fail(
            f"The checkpoint metadata field {METADATA_VERSION}={version_int} is newer than the formats this "
            f"pad_moe_transformers {__version__} reads (up to {FORMAT_VERSION}). Upgrade pad_moe_transformers."
        )
    layout = metadata.get(METADATA_LAYOUT)
    if layout not in LAYOUTS:
        fail(f"Checkpoint metadata field {METADATA_LAYOUT}={layout!r} is not one of {list(LAYOUTS)}.")
    raw = metadata.get(METADATA_CONFIG)
    if raw is None:
        fail(f"The checkpoint has no {METADATA_CONFIG!r} metadata field.")
    try:
        saved = json.loads(raw)
        assert isinstance(saved, dict)
    except (ValueError, AssertionError):
        fail(f"Checkpoint metadata field {METADATA_CONFIG!r} is not a JSON object: {raw!r}.")
    current = pad_config_fingerprint(model) if model is not None else None
    for key, value in saved.items():
        if current is None or key not in current:
            continue
        if current[key] != value:
            field_name = {"base_model_type": "base_config.model_type", "partitioned": "partition"}.get(key, key)
            if key == "partitioned":
                fail(
                    f"Config field 'partition' does not match the checkpoint: the config says the model is "
                    f"{'' if current[key] else 'not '}partitioned (partition={config.partition!r}) but the tensors "
                    f"were saved from a {'partitioned' if value else 'never-partitioned'} model."
                )
            fail(
                f"Config field {field_name!r} does not match the checkpoint: the config has {current[key]!r}, the "
                f"tensors were written with {value!r}."
            )
    if layout == LAYOUT_MOE and current is not None and current["partitioned"]:
        fail(
            "Config field 'partition' does not match the checkpoint: the config says the model is partitioned but "
            "the tensors are a fully dynamic MoE (layout 'moe', no masks)."
        )
    return layout


def check_saved_linears(metadata: Mapping[str, str], linears: Mapping[str, PADWeight]) -> None:
    """Every PAD linear listed in `pad_moe.linears` exists in the model, with the same `[out, in]`."""
    try:
        saved_linears = json.loads(metadata.get(METADATA_LINEARS, "{}"))
    except ValueError:
        saved_linears = {}
    for name, shape in saved_linears.items():
        linear = linears.get(name + ".")
        if linear is None:
            fail(
                f"The checkpoint has a PAD linear {name!r} that the config does not create (check config fields "
                "'moe_layers' and 'base_config')."
            )
        if list(shape) != linear_shape(linear):
            fail(
                f"PAD linear {name!r} was saved with weight shape {list(shape)} but the config builds "
                f"{linear_shape(linear)} (check the config's hidden/intermediate sizes)."
            )


# --------------------------------------------------------------------------------------------- tensors
def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def require_tensor(tensors: Mapping[str, Tensor], prefix: str, suffix: str, layout: str) -> Tensor:
    """`tensors[prefix + suffix]`, which the `layout` stores for the PAD linear `prefix`."""
    key = prefix + suffix
    if key not in tensors:
        fail(f"Missing tensor {key!r} ({layout} layout) of the PAD linear {prefix[:-1]!r}.")
    return tensors[key]


def _check_float(key: str, tensor: Tensor) -> None:
    if not tensor.is_floating_point():
        fail(f"Tensor {key!r} has dtype {tensor.dtype}; a floating-point dtype is expected.")


def _experts_shape_error(key: str, found: tuple, expected: tuple, field: str = "num_experts") -> NoReturn:
    if len(found) == len(expected) and found[0] != expected[0]:
        noun = "experts" if field == "num_experts" else "kernels"
        fail(
            f"Tensor {key!r} holds {found[0]} {noun} but config field {field!r} is {expected[0]} "
            f"(shape {list(found)}, expected {list(expected)})."
        )
    fail(
        f"Tensor {key!r} has shape {list(found)}, expected {list(expected)} (check the config's "
        "hidden/intermediate sizes)."
    )


def _count_field(linear: PADWeight) -> str:
    """The config field that sets the number of dynamic weights of `linear` (experts or kernels)."""
    return "num_kernels" if hasattr(linear, "num_kernels") else "num_experts"


def check_dense_experts(prefix: str, linear: PADWeight, expert: Tensor) -> None:
    """The `expert_weight` `[E, out, in]` of a `moe`-layout PAD linear."""
    key = prefix + "expert_weight"
    _check_float(key, expert)
    expected = (linear.num_experts, *linear.mask.shape)
    if _shape(expert) != expected:
        _experts_shape_error(key, _shape(expert), expected, _count_field(linear))


def check_packed_mask(prefix: str, linear: PADWeight, packed: Tensor) -> int:
    """The `mask_packed` of a compact PAD linear: dtype, length, zero padding bits. Returns its set bits."""
    key = prefix + "mask_packed"
    numel = linear.mask.numel()
    if packed.dtype != torch.uint8:
        fail(f"Tensor {key!r} has dtype {packed.dtype}; the packed mask must be uint8.")
    n_bytes = packed_mask_bytes(numel)
    if _shape(packed) != (n_bytes,):
        fail(
            f"Tensor {key!r} has shape {list(packed.shape)}; a {list(linear.mask.shape)} mask packs into "
            f"[{n_bytes}] bytes (check the config's layer sizes)."
        )
    if numel % 8 and int(packed[-1]) >> (numel % 8):
        fail(f"Tensor {key!r} has bits set past the {numel} mask entries (padding bits must be zero).")
    return popcount(packed)


def check_compact_values(
    prefix: str, linear: PADWeight, nnz: int, static_values: Tensor, expert_values: Tensor
) -> None:
    """The `static_values` / `expert_values` of a compact PAD linear whose packed mask has `nnz` set bits."""
    key = prefix + "mask_packed"
    numel = linear.mask.numel()
    _check_float(prefix + "static_values", static_values)
    _check_float(prefix + "expert_values", expert_values)
    if expert_values.dim() != 2 or expert_values.shape[0] != linear.num_experts:
        _experts_shape_error(
            prefix + "expert_values", _shape(expert_values), (linear.num_experts, nnz), _count_field(linear)
        )
    if expert_values.shape[1] != nnz:
        fail(
            f"Tensor {prefix}expert_values stores {expert_values.shape[1]} values per expert but {key} has {nnz} "
            "set bits (dynamic entries); the mask and the values do not belong together."
        )
    if _shape(static_values) != (numel - nnz,):
        fail(
            f"Tensor {prefix}static_values has shape {list(static_values.shape)} but {key} has {numel - nnz} "
            f"unset bits (static entries): expected [{numel - nnz}]."
        )


def check_scale_factor(key: str, tensor: Tensor, want: Tensor) -> Tensor:
    """A stored scale factor: 0-d (format version 1) or `(1,)`; returned in the model's shape (`want`'s)."""
    if tensor.numel() != 1 or tensor.dim() > 1:
        fail(f"Tensor {key!r} has shape {list(tensor.shape)}; a scale factor is stored as [] (or [1]).")
    return tensor.reshape(want.shape)


def check_state_tensor(key: str, tensor: Tensor, want: Tensor) -> None:
    """A tensor stored under its own state-dict name: same shape, same kind of dtype as the model's."""
    if _shape(tensor) != _shape(want):
        fail(f"Tensor {key!r} has shape {list(tensor.shape)}, the config builds {list(want.shape)}.")
    if tensor.is_floating_point() != want.is_floating_point() or (
        not want.is_floating_point() and tensor.dtype != want.dtype
    ):
        fail(f"Tensor {key!r} has dtype {tensor.dtype}, the model expects {want.dtype}.")


def check_no_unexpected(unexpected: list[str], linears: Mapping[str, PADWeight]) -> None:
    """Refuse tensors that the model does not have (e.g. PAD tensors of a layer the config does not convert)."""
    if not unexpected:
        return
    hint = ""
    pad_suffixes = COMPACT_SUFFIXES + RAW_SUFFIXES
    if any(pad_prefix_of(k, linears) is None and k.rsplit(".", 1)[-1] in pad_suffixes for k in unexpected):
        hint = " (PAD tensors of a layer the config does not convert: check config field 'moe_layers')"
    more = " ..." if len(unexpected) > 5 else ""
    fail(f"Unexpected tensor(s) in the checkpoint{hint}: {sorted(unexpected)[:5]}" + more)


def check_no_missing(expected: Iterable[str], found: Mapping[str, Tensor], tied: set[str]) -> None:
    """Every state-dict entry of the model, except tied weights, is in `found`."""
    missing = sorted(k for k in expected if k not in found and k not in tied)
    if missing:
        more = f" (and {len(missing) - 1} more)." if len(missing) > 1 else "."
        fail(f"Missing tensor {missing[0]!r} in the checkpoint" + more)
