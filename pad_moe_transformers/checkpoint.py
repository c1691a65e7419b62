"""Compact PAD-MoE checkpoints: encode, write, read, validate and decode (format described in
`docs/checkpoint_format.md`).

After mode partition each `PADExpertLinear` uses, of its stored tensors, only the dynamic entries of
every expert (mask ``M = 1``) and the static entries of the shared weight (``M = 0``); the rest are
zeros that eq. 4 never reads. A compact checkpoint stores exactly the used entries:

    <prefix>.mask_packed    uint8  [ceil(out*in/8)]   M bit-packed, row-major, LSB first
    <prefix>.static_values  float  [out*in - nnz(M)]  W_static[~M] in row-major order
    <prefix>.expert_values  float  [E, nnz(M)]        W_e[M] in row-major order, one row per expert
    <prefix>.expert_bias    float  [E, out]           unchanged (if the linear has a bias)
    <prefix>.scale_logit | lambda_static | lambda_dynamic   unchanged 0-d scale factors

A model whose masks are all ones and which was never partitioned (a plain MoE) is stored in the
``"moe"`` layout instead: ``<prefix>.expert_weight [E, out, in]`` plus bias and scales; no mask, no
static weight. Every other tensor of the model is stored under its own state-dict name.

The layout and the format version are in the safetensors header metadata of every file (and in
the shard index): ``pad_moe.format_version``, ``pad_moe.layout``, ``pad_moe.config`` (the config
fields the tensors depend on) and ``pad_moe.linears`` (``{prefix: [out, in]}`` of the PAD linears
in that file). Only safetensors are read or written (no pickle).
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .pad_linear import PADExpertLinear

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
_RAW_SUFFIXES = ("expert_weight", "static_weight", "mask")
_COMPACT_SUFFIXES = ("mask_packed", "static_values", "expert_values")
_BIT_WEIGHTS = [1 << i for i in range(8)]  # bit i of a byte <-> element 8*byte + i (LSB first)
_HEADER_LIMIT = 100 * 1024 * 1024


class PADCheckpointError(ValueError):
    """A PAD-MoE checkpoint is malformed or does not match the model config. The message names the
    tensor, file or config field at fault."""


# --------------------------------------------------------------------------------------------- masks
def pack_mask(mask: Tensor) -> Tensor:
    """Bit-pack a boolean mask: row-major order, 8 entries per byte, entry ``8 * b + i`` in bit ``i``
    (LSB first) of byte ``b``, unused bits of the last byte zero. Same as
    ``numpy.packbits(mask.ravel(), bitorder="little")``."""
    flat = mask.detach().reshape(-1).to(device="cpu", dtype=torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.int32)
    return (flat.view(-1, 8).to(torch.int32) * weights).sum(dim=1).to(torch.uint8)


def unpack_mask(packed: Tensor, numel: int) -> Tensor:
    """Inverse of `pack_mask`: a flat bool tensor of `numel` entries."""
    shifts = torch.arange(8, dtype=torch.int32)
    bits = (packed.reshape(-1).to(torch.int32).unsqueeze(1) >> shifts) & 1
    return bits.reshape(-1)[:numel].bool()


def _popcount(packed: Tensor) -> int:
    shifts = torch.arange(8, dtype=torch.int32)
    return int(((packed.reshape(-1).to(torch.int32).unsqueeze(1) >> shifts) & 1).sum())


# --------------------------------------------------------------------------------------------- model side
def pad_linear_modules(model: nn.Module) -> dict[str, PADExpertLinear]:
    """`{state-dict prefix (ending in '.'): PADExpertLinear}` of every PAD linear of `model`."""
    return {f"{name}.": module for name, module in model.named_modules() if isinstance(module, PADExpertLinear)}


def _pad_config_fingerprint(model: nn.Module) -> dict[str, Any]:
    """The config fields that the tensors of a checkpoint depend on (stored as `pad_moe.config`)."""
    config = model.config
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


def _remove_tied_weights(state_dict: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    try:
        from transformers.modeling_utils import remove_tied_weights_from_state_dict
    except ImportError:  # pragma: no cover - older transformers
        return state_dict
    return remove_tied_weights_from_state_dict(state_dict, model)


def compact_state_dict(
    model: nn.Module, state_dict: Mapping[str, Tensor] | None = None
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Encode `state_dict` (default: `model.state_dict()`) into the tensors of a PAD checkpoint.

    Returns `(tensors, metadata)`: CPU tensors ready for safetensors and the header metadata
    (without `pad_moe.linears`, which is per file). Tied weights are dropped (they are re-tied on load).
    """
    state_dict = dict(model.state_dict() if state_dict is None else state_dict)
    state_dict = _remove_tied_weights(state_dict, model)
    layout = checkpoint_layout(model, state_dict)
    linears = pad_linear_modules(model)
    out: dict[str, Tensor] = {}
    shapes: dict[str, list[int]] = {}
    for prefix, linear in linears.items():
        shapes[prefix[:-1]] = [linear.out_features, linear.in_features]
    encoded: dict[str, dict[str, Tensor]] = {}
    for prefix, linear in linears.items():
        missing = [prefix + s for s in _RAW_SUFFIXES if prefix + s not in state_dict]
        if missing:
            raise PADCheckpointError(f"Cannot save: the state dict lacks {missing} of the PAD linear {prefix[:-1]!r}.")
        expert = state_dict[prefix + "expert_weight"].detach().cpu()
        if layout == LAYOUT_MOE:
            encoded[prefix] = {"expert_weight": expert}
            continue
        mask = state_dict[prefix + "mask"].detach().cpu().bool()
        static = state_dict[prefix + "static_weight"].detach().cpu()
        flat_mask = mask.reshape(-1)
        encoded[prefix] = {
            "mask_packed": pack_mask(mask),
            "static_values": static.reshape(-1)[~flat_mask].contiguous(),
            "expert_values": expert.reshape(expert.shape[0], -1)[:, flat_mask].contiguous(),
        }
    # Keep the state-dict order; each PAD linear's tensors replace its raw tensors in place.
    for key, tensor in state_dict.items():
        prefix = _pad_prefix_of(key, linears)
        if prefix is None:
            out[key] = tensor.detach().cpu().contiguous()
            continue
        suffix = key[len(prefix):]
        if suffix in _RAW_SUFFIXES:
            if prefix in encoded:
                for name, value in encoded.pop(prefix).items():
                    out[prefix + name] = value
            continue
        out[key] = tensor.detach().cpu().contiguous()
    metadata = {
        "format": "pt",
        METADATA_VERSION: str(FORMAT_VERSION),
        METADATA_LAYOUT: layout,
        METADATA_CONFIG: json.dumps(_pad_config_fingerprint(model), sort_keys=True),
    }
    return out, metadata


def _pad_prefix_of(key: str, linears: Mapping[str, Any]) -> str | None:
    prefix = key.rsplit(".", 1)[0] + "."
    return prefix if prefix in linears else None


# --------------------------------------------------------------------------------------------- writing
@dataclass
class SavedCheckpoint:
    files: list[str]
    """Paths of the safetensors files written, in order."""
    index_file: str | None
    layout: str
    total_size: int
    """Bytes of tensor data (without the safetensors headers)."""
    stored_values: int
    """Number of stored values (every element of every tensor except the packed mask bytes)."""


def _parse_size(size: int | str) -> int:
    from transformers.utils.hub import convert_file_size_to_int

    return convert_file_size_to_int(size)


def _add_variant(name: str, variant: str | None) -> str:
    if not variant:
        return name
    stem, ext = name.split(".", 1)
    return f"{stem}.{variant}.{ext}"


def _group_for_sharding(tensors: Mapping[str, Tensor], linear_prefixes: Iterable[str]) -> list[list[str]]:
    """Tensor names grouped so that all tensors of one PAD linear land in the same shard (each shard
    can then be decoded on its own, e.g. by `load_state_dict` shard by shard)."""
    prefixes = set(linear_prefixes)
    groups: list[list[str]] = []
    index_of: dict[str, int] = {}
    for key in tensors:
        prefix = _pad_prefix_of(key, prefixes)
        if prefix is None:
            groups.append([key])
        elif prefix in index_of:
            groups[index_of[prefix]].append(key)
        else:
            index_of[prefix] = len(groups)
            groups.append([key])
    return groups


def save_checkpoint_files(
    model: nn.Module,
    save_directory: str | os.PathLike,
    *,
    state_dict: Mapping[str, Tensor] | None = None,
    max_shard_size: int | str = "50GB",
    variant: str | None = None,
) -> SavedCheckpoint:
    """Write the weights of `model` as a PAD checkpoint (one file or shards plus an index).

    Removes weight files of an earlier save in `save_directory` that this save does not rewrite.
    """
    save_directory = os.fspath(save_directory)
    os.makedirs(save_directory, exist_ok=True)
    tensors, metadata = compact_state_dict(model, state_dict)
    linears = pad_linear_modules(model)
    limit = _parse_size(max_shard_size)
    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for group in _group_for_sharding(tensors, linears):
        size = sum(tensors[k].numel() * tensors[k].element_size() for k in group)
        if shards[-1] and shard_bytes + size > limit:
            shards.append([])
            shard_bytes = 0
        shards[-1].extend(group)
        shard_bytes += size

    weights_name = _add_variant(WEIGHTS_NAME, variant)
    if len(shards) == 1:
        names = [weights_name]
    else:
        stem = weights_name[: -len(".safetensors")]
        names = [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    _remove_stale_weight_files(save_directory, weights_name, keep=set(names))

    files = []
    weight_map = {}
    for name, keys in zip(names, shards):
        shard_linears = {
            prefix[:-1]: [linears[prefix].out_features, linears[prefix].in_features]
            for prefix in {_pad_prefix_of(k, linears) for k in keys} - {None}
        }
        shard_metadata = dict(metadata, **{METADATA_LINEARS: json.dumps(shard_linears, sort_keys=True)})
        path = os.path.join(save_directory, name)
        save_file({k: tensors[k] for k in keys}, path, metadata=shard_metadata)
        _canonicalize_header(path)
        files.append(path)
        weight_map.update(dict.fromkeys(keys, name))

    total_size = sum(t.numel() * t.element_size() for t in tensors.values())
    stored_values = sum(t.numel() for k, t in tensors.items() if not k.endswith(".mask_packed"))
    index_file = None
    if len(shards) > 1:
        index_file = os.path.join(save_directory, _add_variant(WEIGHTS_INDEX_NAME, variant))
        index_metadata = {k: v for k, v in metadata.items() if k != "format"}
        index_metadata.update(total_size=total_size, total_parameters=stored_values)
        with open(index_file, "w", encoding="utf-8") as f:
            json.dump({"metadata": index_metadata, "weight_map": weight_map}, f, indent=2, sort_keys=True)
            f.write("\n")
    return SavedCheckpoint(files, index_file, metadata[METADATA_LAYOUT], total_size, stored_values)


def _canonicalize_header(path: str) -> None:
    """Sort the header metadata keys in place (safetensors writes them in hash order), so that saving
    the same model twice gives the same bytes (the Hub then sees an unchanged file)."""
    with open(path, "r+b") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        raw = f.read(header_len)
        header = json.loads(raw)
        if "__metadata__" in header:
            header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        canonical = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(canonical) <= header_len and raw.rstrip(b" ") != canonical:
            f.seek(8)
            f.write(canonical.ljust(header_len, b" "))


def _remove_stale_weight_files(directory: str, weights_name: str, keep: set[str]) -> None:
    stem = weights_name[: -len(".safetensors")]
    pattern = re.compile(re.escape(stem) + r"(-\d{5}-of-\d{5})?\.safetensors")
    index_name = stem + ".safetensors.index.json"
    for filename in os.listdir(directory):
        path = os.path.join(directory, filename)
        if not os.path.isfile(path) or filename in keep:
            continue
        if pattern.fullmatch(filename) or filename == index_name:
            os.remove(path)


# --------------------------------------------------------------------------------------------- reading
def resolve_checkpoint_files(
    path: str | os.PathLike, *, variant: str | None = None, download_kwargs: Mapping[str, Any] | None = None
) -> tuple[list[str], dict | None]:
    """Local paths of the safetensors files of a checkpoint directory or hub repo (downloaded and
    cached through `transformers.utils.cached_file`), and the parsed shard index if sharded."""
    from transformers.utils import cached_file

    download_kwargs = {k: v for k, v in (download_kwargs or {}).items() if v is not None}
    path = os.fspath(path)

    def fetch(filename: str) -> str | None:
        return cached_file(path, filename, _raise_exceptions_for_missing_entries=False, **download_kwargs)

    single = fetch(_add_variant(WEIGHTS_NAME, variant))
    if single is not None:
        return [single], None
    index_file = fetch(_add_variant(WEIGHTS_INDEX_NAME, variant))
    if index_file is not None:
        try:
            with open(index_file, encoding="utf-8") as f:
                index = json.load(f)
        except (OSError, ValueError) as error:
            raise PADCheckpointError(f"Shard index {index_file} is not valid JSON: {error}") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise PADCheckpointError(f"Shard index {index_file} has no 'weight_map'.")
        files = []
        for shard in sorted(set(weight_map.values())):
            if not isinstance(shard, str) or os.path.basename(shard) != shard:
                raise PADCheckpointError(f"Shard index {index_file} names an invalid shard file {shard!r}.")
            local = fetch(shard)
            if local is None:
                raise PADCheckpointError(
                    f"Shard file {shard!r} listed in {os.path.basename(index_file)} is missing from {path!r}."
                )
            files.append(local)
        return files, index
    for unsafe in ("pytorch_model.bin", "pytorch_model.bin.index.json"):
        if fetch(_add_variant(unsafe, variant)) is not None:
            raise PADCheckpointError(
                f"{path!r} holds only {unsafe} (a pickle file). PAD-MoE checkpoints are loaded from safetensors "
                "only; convert it with a trusted loader and `save_pretrained`."
            )
    raise PADCheckpointError(
        f"No {_add_variant(WEIGHTS_NAME, variant)} or {_add_variant(WEIGHTS_INDEX_NAME, variant)} found in {path!r}."
    )


def _check_file_integrity(path: str) -> None:
    """Raise a `PADCheckpointError` if the file is shorter than its safetensors header says."""
    name = os.path.basename(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise PADCheckpointError(f"Checkpoint file {name} is truncated or empty ({size} bytes).")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > _HEADER_LIMIT or 8 + header_len > size:
            raise PADCheckpointError(
                f"Checkpoint file {name} is truncated or corrupt: its header claims {header_len} bytes but the "
                f"file has {size} bytes."
            )
        try:
            header = json.loads(f.read(header_len))
        except ValueError as error:
            raise PADCheckpointError(f"Checkpoint file {name} has a corrupt safetensors header: {error}") from None
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError):
            raise PADCheckpointError(f"Checkpoint file {name} has a corrupt header entry for tensor {key!r}.") from None
    if 8 + header_len + end != size:
        raise PADCheckpointError(
            f"Checkpoint file {name} is truncated or corrupt: its header needs {8 + header_len + end} bytes, "
            f"the file has {size}."
        )


def read_checkpoint_files(files: list[str], index: dict | None = None) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read every tensor of the checkpoint files; return `(tensors, metadata)`.

    Checks each file's integrity, that the files agree on the PAD metadata, that no tensor appears
    twice and, when sharded, that the index maps every tensor to the file that holds it.
    """
    tensors: dict[str, Tensor] = {}
    location: dict[str, str] = {}
    metadata: dict[str, str] | None = None
    linears: dict[str, Any] = {}
    for path in files:
        name = os.path.basename(path)
        _check_file_integrity(path)
        try:
            with safe_open(path, framework="pt") as f:
                file_metadata = dict(f.metadata() or {})
                for key in f.keys():
                    if key in tensors:
                        raise PADCheckpointError(f"Tensor {key!r} appears in both {location[key]} and {name}.")
                    tensors[key] = f.get_tensor(key)
                    location[key] = name
        except SafetensorError as error:
            raise PADCheckpointError(f"Checkpoint file {name} cannot be read as safetensors: {error}") from None
        try:
            linears.update(json.loads(file_metadata.pop(METADATA_LINEARS, "{}")))
        except ValueError:
            raise PADCheckpointError(f"Checkpoint file {name}: metadata field {METADATA_LINEARS!r} is not JSON.") from None
        shared = {k: v for k, v in file_metadata.items() if k.startswith("pad_moe.")}
        if metadata is None:
            metadata = shared
        elif shared != metadata:
            raise PADCheckpointError(
                f"Checkpoint file {name} has PAD metadata {shared} that differs from {os.path.basename(files[0])}'s "
                f"{metadata}; the shards come from different saves."
            )
    metadata = dict(metadata or {})
    metadata[METADATA_LINEARS] = json.dumps(linears, sort_keys=True)
    if index is not None:
        weight_map = index["weight_map"]
        for key, file in location.items():
            if weight_map.get(key) != file:
                raise PADCheckpointError(
                    f"Tensor {key!r} is in {file} but the shard index maps it to {weight_map.get(key)!r}."
                )
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise PADCheckpointError(
                f"The shard index lists tensor {missing[0]!r} (and {len(missing) - 1} more) that no shard holds."
                if len(missing) > 1
                else f"The shard index lists tensor {missing[0]!r}, which its shard {weight_map[missing[0]]} lacks."
            )
    return tensors, metadata


# --------------------------------------------------------------------------------------------- decoding
def _fail(message: str) -> None:
    raise PADCheckpointError(message)


def check_metadata(metadata: Mapping[str, str], config: Any, model: nn.Module | None = None) -> str:
    """Validate the format version, the layout and the config fingerprint; return the layout."""
    version = metadata.get(METADATA_VERSION)
    if version is None:
        _fail(
            f"The checkpoint has no {METADATA_VERSION!r} metadata field: it was not written by "
            "pad_moe_transformers' `save_pretrained` (or was re-saved by another tool). Re-save it with "
            "`PADMoE*.save_pretrained`."
        )
    try:
        version_int = int(version)
    except ValueError:
        version_int = None
    if version_int is None or version_int < 1:
        _fail(f"Invalid checkpoint metadata field {METADATA_VERSION}={version!r} (expected an integer >= 1).")
    if version_int > FORMAT_VERSION:
        from . import __version__

        _fail(
            f"The checkpoint metadata field {METADATA_VERSION}={version_int} is newer than the formats this "
            f"pad_moe_transformers {__version__} reads (up to {FORMAT_VERSION}). Upgrade pad_moe_transformers."
        )
    layout = metadata.get(METADATA_LAYOUT)
    if layout not in LAYOUTS:
        _fail(f"Checkpoint metadata field {METADATA_LAYOUT}={layout!r} is not one of {list(LAYOUTS)}.")
    raw = metadata.get(METADATA_CONFIG)
    if raw is None:
        _fail(f"The checkpoint has no {METADATA_CONFIG!r} metadata field.")
    try:
        saved = json.loads(raw)
        assert isinstance(saved, dict)
    except (ValueError, AssertionError):
        _fail(f"Checkpoint metadata field {METADATA_CONFIG!r} is not a JSON object: {raw!r}.")
    current = _pad_config_fingerprint(model) if model is not None else None
    for key, value in saved.items():
        if current is None or key not in current:
            continue
        if current[key] != value:
            field_name = {"base_model_type": "base_config.model_type", "partitioned": "partition"}.get(key, key)
            if key == "partitioned":
                _fail(
                    f"Config field 'partition' does not match the checkpoint: the config says the model is "
                    f"{'' if current[key] else 'not '}partitioned (partition={config.partition!r}) but the tensors "
                    f"were saved from a {'partitioned' if value else 'never-partitioned'} model."
                )
            _fail(
                f"Config field {field_name!r} does not match the checkpoint: the config has {current[key]!r}, the "
                f"tensors were written with {value!r}."
            )
    if layout == LAYOUT_MOE and current is not None and current["partitioned"]:
        _fail(
            "Config field 'partition' does not match the checkpoint: the config says the model is partitioned but "
            "the tensors are a fully dynamic MoE (layout 'moe', no masks)."
        )
    return layout


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _decode_linear(
    prefix: str,
    linear: PADExpertLinear,
    tensors: Mapping[str, Tensor],
    layout: str,
    target: dict[str, Tensor],
) -> None:
    """Validate the stored tensors of one PAD linear and write its dense tensors into `target`."""
    name = prefix[:-1]
    num_experts, out_features, in_features = linear.num_experts, linear.out_features, linear.in_features
    numel = out_features * in_features

    def get(suffix: str) -> Tensor:
        key = prefix + suffix
        if key not in tensors:
            _fail(f"Missing tensor {key!r} ({layout} layout) of the PAD linear {name!r}.")
        return tensors[key]

    def check_float(key: str, tensor: Tensor) -> None:
        if not tensor.is_floating_point():
            _fail(f"Tensor {key!r} has dtype {tensor.dtype}; a floating-point dtype is expected.")

    if layout == LAYOUT_MOE:
        expert = get("expert_weight")
        check_float(prefix + "expert_weight", expert)
        if _shape(expert) != (num_experts, out_features, in_features):
            _experts_shape_error(prefix + "expert_weight", _shape(expert), (num_experts, out_features, in_features))
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

    packed = get("mask_packed")
    key = prefix + "mask_packed"
    if packed.dtype != torch.uint8:
        _fail(f"Tensor {key!r} has dtype {packed.dtype}; the packed mask must be uint8.")
    n_bytes = (numel + 7) // 8
    if _shape(packed) != (n_bytes,):
        _fail(
            f"Tensor {key!r} has shape {list(packed.shape)}; a [{out_features}, {in_features}] mask packs into "
            f"[{n_bytes}] bytes (check the config's hidden/intermediate sizes)."
        )
    if numel % 8 and int(packed[-1]) >> (numel % 8):
        _fail(f"Tensor {key!r} has bits set past the {numel} mask entries (padding bits must be zero).")
    nnz = _popcount(packed)
    static_values, expert_values = get("static_values"), get("expert_values")
    check_float(prefix + "static_values", static_values)
    check_float(prefix + "expert_values", expert_values)
    if expert_values.dim() != 2 or expert_values.shape[0] != num_experts:
        _experts_shape_error(prefix + "expert_values", _shape(expert_values), (num_experts, nnz))
    if expert_values.shape[1] != nnz:
        _fail(
            f"Tensor {prefix}expert_values stores {expert_values.shape[1]} values per expert but {key} has {nnz} "
            "set bits (dynamic entries); the mask and the values do not belong together."
        )
    if _shape(static_values) != (numel - nnz,):
        _fail(
            f"Tensor {prefix}static_values has shape {list(static_values.shape)} but {key} has {numel - nnz} "
            f"unset bits (static entries): expected [{numel - nnz}]."
        )
    flat_mask = unpack_mask(packed, numel)
    dtype = expert_values.dtype
    expert = torch.zeros(num_experts, numel, dtype=dtype)
    expert[:, flat_mask] = expert_values
    static = torch.zeros(numel, dtype=static_values.dtype)
    static[~flat_mask] = static_values
    target[prefix + "expert_weight"] = expert.view(num_experts, out_features, in_features)
    target[prefix + "static_weight"] = static.view(out_features, in_features)
    target[prefix + "mask"] = flat_mask.view(out_features, in_features)


def _experts_shape_error(key: str, found: tuple, expected: tuple) -> None:
    if len(found) == len(expected) and found[0] != expected[0]:
        _fail(
            f"Tensor {key!r} holds {found[0]} experts but config field 'num_experts' is {expected[0]} "
            f"(shape {list(found)}, expected {list(expected)})."
        )
    _fail(
        f"Tensor {key!r} has shape {list(found)}, expected {list(expected)} (check the config's "
        "hidden/intermediate sizes)."
    )


def decode_checkpoint(
    model: nn.Module, tensors: Mapping[str, Tensor], metadata: Mapping[str, str]
) -> dict[str, Tensor]:
    """Validate the tensors of a checkpoint against `model` (a skeleton built from the config, e.g. on
    the meta device) and return the dense state dict that `load_state_dict(strict=True)` accepts
    (minus tied weights, which the model re-ties)."""
    layout = check_metadata(metadata, model.config, model)
    linears = pad_linear_modules(model)
    try:
        saved_linears = json.loads(metadata.get(METADATA_LINEARS, "{}"))
    except ValueError:
        saved_linears = {}
    for name, shape in saved_linears.items():
        linear = linears.get(name + ".")
        if linear is None:
            _fail(
                f"The checkpoint has a PAD linear {name!r} that the config does not create (check config fields "
                "'moe_layers' and 'base_config')."
            )
        if list(shape) != [linear.out_features, linear.in_features]:
            _fail(
                f"PAD linear {name!r} was saved with weight shape {list(shape)} but the config builds "
                f"{[linear.out_features, linear.in_features]} (check the config's hidden/intermediate sizes)."
            )
    expected = model.state_dict(keep_vars=True)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    dense: dict[str, Tensor] = {}
    for prefix, linear in linears.items():
        _decode_linear(prefix, linear, tensors, layout, dense)
    allowed_pad = {prefix + s for prefix in linears for s in (_COMPACT_SUFFIXES if layout == LAYOUT_COMPACT else ("expert_weight",))}
    unexpected = []
    for key, tensor in tensors.items():
        if key in allowed_pad:
            continue
        if key not in expected or (_pad_prefix_of(key, linears) and key.rsplit(".", 1)[1] in _RAW_SUFFIXES):
            unexpected.append(key)
            continue
        want = expected[key]
        if _shape(tensor) != _shape(want):
            _fail(f"Tensor {key!r} has shape {list(tensor.shape)}, the config builds {list(want.shape)}.")
        if tensor.is_floating_point() != want.is_floating_point() or (
            not want.is_floating_point() and tensor.dtype != want.dtype
        ):
            _fail(f"Tensor {key!r} has dtype {tensor.dtype}, the model expects {want.dtype}.")
        dense[key] = tensor
    if unexpected:
        hint = ""
        if any(_pad_prefix_of(k, linears) is None and k.rsplit(".", 1)[-1] in _COMPACT_SUFFIXES + _RAW_SUFFIXES for k in unexpected):
            hint = " (PAD tensors of a layer the config does not convert: check config field 'moe_layers')"
        _fail(f"Unexpected tensor(s) in the checkpoint{hint}: {sorted(unexpected)[:5]}" + (" ..." if len(unexpected) > 5 else ""))
    missing = sorted(k for k in expected if k not in dense and k not in tied)
    if missing:
        _fail(f"Missing tensor {missing[0]!r} in the checkpoint" + (f" (and {len(missing) - 1} more)." if len(missing) > 1 else "."))
    return dense


def expand_compact_entries(model: nn.Module, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Replace the compact / plain-MoE entries of the PAD linears found in `state_dict` by their dense
    tensors (for `load_state_dict` on a checkpoint read by other code, e.g. Trainer's resume). Other
    entries pass through; a partially present compact group raises."""
    linears = pad_linear_modules(model)
    out = dict(state_dict)
    for prefix, linear in linears.items():
        present = [s for s in _COMPACT_SUFFIXES if prefix + s in state_dict]
        if present:
            missing = [prefix + s for s in _COMPACT_SUFFIXES if s not in present]
            if missing:
                _fail(f"The state dict has {prefix}{present[0]} but lacks {missing} to decode it.")
            dense: dict[str, Tensor] = {}
            _decode_linear(prefix, linear, state_dict, LAYOUT_COMPACT, dense)
            for s in _COMPACT_SUFFIXES:
                del out[prefix + s]
            out.update(dense)
        elif prefix + "expert_weight" in state_dict and prefix + "mask" not in state_dict and prefix + "static_weight" not in state_dict:
            dense = {}
            _decode_linear(prefix, linear, state_dict, LAYOUT_MOE, dense)
            out.update(dense)
    return out


# --------------------------------------------------------------------------------------------- loading
_DOWNLOAD_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")
# `from_pretrained` keyword arguments that are loader options, not config overrides.
_LOADER_KWARGS = (
    "dtype", "torch_dtype", "device_map", "max_memory", "offload_folder", "offload_buffers", "output_loading_info",
    "attn_implementation", "experts_implementation", "_from_auto", "_from_pipeline", "tqdm_class",
    "ignore_mismatched_sizes", "weights_only", "disable_mmap", "low_cpu_mem_usage", "trust_remote_code",
    "key_mapping", "adapter_kwargs", "adapter_name", "distributed_config", "device_mesh", "tp_plan", "tp_size",
    "use_kernels", "kernel_config", "allow_all_kernels", "fusion_config", "generation_config", "_fast_init",
    "mirror", "from_tf", "from_flax", "offload_state_dict", "_commit_hash",
)


def load_pad_checkpoint(
    cls: type,
    pretrained_model_name_or_path: str | os.PathLike,
    model_args: tuple,
    config: Any,
    kwargs: dict[str, Any],
    base_from_pretrained: Callable[..., Any],
):
    """Load a PAD checkpoint into `cls`: resolve config and files, validate and decode the tensors,
    then let Transformers' own loader build the model from the dense state dict (dtype, device map,
    fp32 router, tied weights) via `base_from_pretrained(None, config=..., state_dict=...)`."""
    kwargs = dict(kwargs)
    path = os.fspath(pretrained_model_name_or_path)
    download_kwargs = {k: kwargs.pop(k) for k in _DOWNLOAD_KWARGS if k in kwargs}
    variant = kwargs.pop("variant", None)
    if kwargs.pop("use_safetensors", None) is False:
        raise PADCheckpointError("PAD-MoE checkpoints are safetensors only; `use_safetensors=False` is not supported.")
    for unsupported in ("gguf_file", "quantization_config", "state_dict"):
        if kwargs.get(unsupported) is not None:
            raise ValueError(f"`{unsupported}` is not supported when loading a PAD-MoE checkpoint from {path!r}.")
        kwargs.pop(unsupported, None)
    loader_kwargs = {k: kwargs.pop(k) for k in _LOADER_KWARGS if k in kwargs}
    if not isinstance(config, cls.config_class):
        config, unused = cls.config_class.from_pretrained(
            config if config is not None else path, return_unused_kwargs=True, **download_kwargs, **kwargs
        )
        kwargs = unused
    else:
        import copy

        config = copy.deepcopy(config)

    files, index = resolve_checkpoint_files(path, variant=variant, download_kwargs=download_kwargs)
    tensors, metadata = read_checkpoint_files(files, index)
    with torch.device("meta"):
        skeleton = cls(config)
    state_dict = decode_checkpoint(skeleton, tensors, metadata)
    del skeleton, tensors

    want_info = loader_kwargs.pop("output_loading_info", False)
    model, info = base_from_pretrained(
        None, *model_args, config=config, state_dict=state_dict, output_loading_info=True, **loader_kwargs, **kwargs
    )
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    problems = {
        "missing": sorted(set(info.get("missing_keys", ())) - tied),
        "unexpected": sorted(info.get("unexpected_keys", ())),
        "mismatched": sorted(str(m) for m in info.get("mismatched_keys", ())),
    }
    if any(problems.values()):
        raise PADCheckpointError(f"Transformers could not load the decoded PAD checkpoint from {path!r}: {problems}")
    # Non-persistent state that Transformers' meta-device init leaves uninitialised.
    if hasattr(model, "reset_expert_usage"):
        model.reset_expert_usage()
    model.name_or_path = path
    model.config._name_or_path = path
    return (model, info) if want_info else model


# --------------------------------------------------------------------------------------------- size theory
def theoretical_checkpoint_size(model: nn.Module) -> dict[str, int]:
    """Bytes the PAD checkpoint of `model` needs in theory, counted from the module (not the file):
    per PAD linear ``(E * nnz(M) + numel - nnz(M)) * bytes + E * out * bytes (bias) + scales`` plus
    ``ceil(numel / 8)`` mask bytes (``"compact"``) or ``E * numel * bytes`` (``"moe"``), plus every
    other parameter and persistent buffer (untied) at its own element size."""
    layout = checkpoint_layout(model)
    linears = pad_linear_modules(model)
    pad_param_ids = set()
    values = value_bytes = mask_bytes = 0
    for linear in linears.values():
        pad_param_ids.update(id(t) for t in [*linear.parameters(recurse=False), linear.mask])
        size = linear.expert_weight.element_size()
        numel = linear.mask.numel()
        if layout == LAYOUT_COMPACT:
            nnz = linear.num_dynamic()
            n = linear.num_experts * nnz + (numel - nnz)
            mask_bytes += (numel + 7) // 8
        else:
            n = linear.num_experts * numel
        for name, p in linear.named_parameters(recurse=False):
            if name not in ("expert_weight", "static_weight"):
                n_other = p.numel()
                values += n_other
                value_bytes += n_other * p.element_size()
        values += n
        value_bytes += n * size
    other_values = other_bytes = 0
    seen = set()
    state = model.state_dict(keep_vars=True)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    for key, tensor in state.items():
        if id(tensor) in pad_param_ids or id(tensor) in seen or key in tied:
            continue
        seen.add(id(tensor))
        other_values += tensor.numel()
        other_bytes += tensor.numel() * tensor.element_size()
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


# --------------------------------------------------------------------------------------------- save / push
def _hf_api():
    try:
        from transformers.utils.hub import hf_api

        return hf_api()
    except ImportError:  # pragma: no cover - transformers without the shared HfApi
        from huggingface_hub import HfApi

        return HfApi()


_CARD_KWARGS = ("model_card", "base_model", "eval_results", "tags", "card_repo_id")


def save_pad_pretrained(
    model: Any,
    save_directory: str | os.PathLike,
    *,
    is_main_process: bool = True,
    state_dict: Mapping[str, Tensor] | None = None,
    push_to_hub: bool = False,
    max_shard_size: int | str = "50GB",
    variant: str | None = None,
    token: str | bool | None = None,
    **kwargs: Any,
) -> SavedCheckpoint | None:
    """`PADMoEPreTrainedModel.save_pretrained`: config, compact safetensors weights and model card,
    then, with `push_to_hub=True`, the upload of the changed files through `huggingface_hub`
    (`create_repo` + `create_commit`), exactly as `PreTrainedModel.save_pretrained` does.

    Extra keywords: `model_card` (default True: write README.md), `base_model`, `eval_results`
    (a `{metric: value}` dict) and `tags` for the card; the rest go to `create_repo` like in Transformers.
    """
    card = {k: kwargs.pop(k) for k in _CARD_KWARGS if k in kwargs}
    if kwargs.pop("safe_serialization", True) is False:
        raise ValueError("PAD-MoE checkpoints are always safetensors; `safe_serialization=False` is not supported.")
    if token is not None:
        kwargs["token"] = token
    save_directory = os.fspath(save_directory)
    if os.path.isfile(save_directory):
        raise ValueError(f"save_pretrained needs a directory, {save_directory!r} is a file.")
    os.makedirs(save_directory, exist_ok=True)

    repo_id = None
    if push_to_hub and is_main_process:
        commit_message = kwargs.pop("commit_message", None)
        repo_id = kwargs.pop("repo_id", save_directory.rstrip(os.sep).split(os.sep)[-1])
        create_pr = kwargs.pop("create_pr", False)
        repo_id = _hf_api().create_repo(repo_id, exist_ok=True, **kwargs).repo_id
        files_timestamps = model._get_files_timestamps(save_directory)

    card_repo_id = card.pop("card_repo_id", repo_id)
    saved = None
    if is_main_process:
        model.config.dtype = str(model.dtype).split(".")[1]
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(save_directory)
        saved = save_checkpoint_files(
            model, save_directory, state_dict=state_dict, max_shard_size=max_shard_size, variant=variant
        )
        if card.pop("model_card", True):
            from .modelcard import write_model_card

            write_model_card(
                model, save_directory, repo_id=card_repo_id, layout=saved.layout, **card
            )

    if push_to_hub and is_main_process:
        model._upload_modified_files(
            save_directory,
            repo_id,
            files_timestamps,
            commit_message=commit_message,
            token=token,
            create_pr=create_pr,
        )
    return saved


def push_pad_to_hub(
    model: Any,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = "50GB",
    tags: list[str] | str | None = None,
    base_model: str | None = None,
    eval_results: Mapping[str, Any] | None = None,
):
    """`PADMoEPreTrainedModel.push_to_hub`: Transformers' `PushToHubMixin.push_to_hub` flow (create the
    repo, `save_pretrained` into a temporary directory, `create_commit` of every file) with the
    compact checkpoint and the generated PAD model card instead of the generic one."""
    import tempfile

    tags = [tags] if isinstance(tags, str) else list(tags or [])
    repo_id = _hf_api().create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp_dir:
        save_pad_pretrained(
            model,
            tmp_dir,
            max_shard_size=max_shard_size or "50GB",
            tags=tags,
            base_model=base_model,
            eval_results=eval_results,
            card_repo_id=repo_id,
        )
        return model._upload_modified_files(
            tmp_dir,
            repo_id,
            files_timestamps={},
            commit_message=commit_message,
            token=token,
            create_pr=create_pr,
            revision=revision,
            commit_description=commit_description,
        )
