"""Loading a PAD checkpoint through Transformers' own loader.

`from_pretrained(pad_checkpoint)` is `PreTrainedModel.from_pretrained`: the model is built once (on the meta
device), and each stored tensor is read, converted and placed by Transformers (dtype, device map, fp32
router, tied weights, mismatched sizes, load report). What is PAD-specific is declared, not overridden:

- `DecodeCompact`, a weight conversion registered for the `pad_moe` model type, loads the three compact
  tensors of one PAD linear (`mask_packed`, `static_values`, `expert_values`) into the layer in compact storage
  (`expert_values`, `static_values`, `mask`: no dense experts are formed, the dense parameters the model was
  built with are meta tensors that are replaced);
- `ScaleFactorShape` turns the 0-d scale factors of the files into the model's `(1,)` parameters;
- a never-partitioned ("moe" layout) checkpoint stores only the experts: the static weights and masks are
  missing keys, rebuilt by `PADMoEPreTrainedModel.initialize_weights`.

Around that call: the header metadata of the files is checked against the config (format version, layout,
PAD linears), conversion errors become a `PADCheckpointError`, and `config.partition` is checked against
the loaded masks.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn
from transformers import MODEL_MAPPING, AutoModel, PreTrainedConfig
from transformers import initialization as init

from .._compat import (
    ConversionOps,
    WeightConverter,
    register_checkpoint_conversion_mapping,
    set_own_experts_implementation,
)
from ..core.compact import decode_compact, encode_compact, unpack_mask
from ..core.pad_weight import PADWeight, compact_pad_storage, static_from_experts
from ..core.scale_factors import SCALE_FACTOR_INIT, SCALE_FACTOR_NAMES
from ..partition.metadata import verify_partition_metadata
from .format import (
    LAYOUT_MOE,
    METADATA_LINEARS,
    METADATA_VERSION,
    RAW_SUFFIXES,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    add_variant,
    pad_linear_modules,
    pad_prefix_of,
)
from .validate import (
    PADCheckpointError,
    PADCheckpointFilesMissingError,
    check_compact_values,
    check_dense_experts,
    check_file_integrity,
    check_metadata,
    check_no_unexpected,
    check_packed_mask,
    check_saved_linears,
    check_scale_factor,
    require_tensor,
)

_COMPACT = ["mask_packed", "static_values", "expert_values"]
_DENSE = ["expert_weight", "static_weight", "mask"]  # the first target names where the loader reads dtypes


class DecodeCompact(ConversionOps):
    """The compact tensors of one PAD linear -> the layer in compact storage (`expert_values`, `static_values`, `mask`),
    without forming its dense experts; an all-dynamic mask (no static entry) -> dense `expert_weight`, `static_weight`
    and `mask`, the storage such a layer trains in (`compact_pad_storage`)."""

    supports_many_to_many = True

    @torch.no_grad()
    def convert(
        self,
        input_dict,
        source_patterns=None,
        target_patterns=None,
        full_layer_name=None,
        model=None,
        missing_keys=None,
        **kwargs,
    ):
        packed, static_values, expert_values = (input_dict[s][0] for s in _COMPACT)
        prefix = full_layer_name.rsplit(".", 1)[0]
        linear = model.get_submodule(prefix)
        # The loader casts every tensor of a conversion to the dtype of its first target (the float experts):
        # the packed bytes (0..255) survive that exactly, in fp32, bf16 and fp16. (Validated before loading.)
        packed = packed.to(torch.uint8)
        shape = tuple(linear.mask.shape)
        if static_values.numel() == 0:  # all dynamic: the dense layout (nothing to drop)
            dynamic, static, mask = decode_compact(packed, static_values, expert_values, shape)
            return {"expert_weight": dynamic, "static_weight": static, "mask": mask}
        # The model was built dense (on the meta device: no storage). The layer takes the compact parameters of this
        # checkpoint's nnz(M) now, and the loader fills them; the dense names it expected are not missing.
        linear._set_compact_parameters(expert_values.shape[-1])
        if missing_keys is not None:
            missing_keys.difference_update({f"{prefix}.expert_weight", f"{prefix}.static_weight"})
        mask = unpack_mask(packed, linear.mask.numel()).view(shape)
        # Full names: the loader's renaming keeps keys that are not part of the layer name it converted.
        loaded = {"expert_values": expert_values, "static_values": static_values, "mask": mask}
        return {f"{prefix}.{name}": tensor for name, tensor in loaded.items()}

    @property
    def reverse_op(self) -> ConversionOps:
        return EncodeCompact()


class EncodeCompact(ConversionOps):
    """Inverse of `DecodeCompact` (used if Transformers' own writer saves a PAD model in the original format)."""

    supports_many_to_many = True

    @torch.no_grad()
    def convert(self, input_dict, **kwargs):
        dense = {name: input_dict[name][0] for name in _DENSE}
        return encode_compact(dense["expert_weight"], dense["static_weight"], dense["mask"])

    @property
    def reverse_op(self) -> ConversionOps:
        return DecodeCompact()


class ScaleFactorShape(ConversionOps):
    """A stored scale factor (0-d, format version 1, or `(1,)`) -> the model's `(1,)` parameter; reverse: 0-d."""

    def __init__(self, stored: bool = False) -> None:
        self.stored = stored

    def convert(self, input_dict, full_layer_name=None, **kwargs):
        ((_, tensors),) = input_dict.items()
        tensor = check_scale_factor(full_layer_name, tensors[0], torch.empty(1))
        # Returned under the full name: the source pattern is a regex over the three scale-factor names.
        return {full_layer_name: tensor.reshape(()) if self.stored else tensor}

    @property
    def reverse_op(self) -> ConversionOps:
        return ScaleFactorShape(stored=not self.stored)


_SCALE_FACTOR_PATTERN = "(" + "|".join(SCALE_FACTOR_NAMES) + ")"

def register_pad_conversions(model_type: str) -> None:
    """Register the PAD weight conversions (compact decoding, scale-factor shapes) for the PAD `model_type`, so that
    Transformers' loader decodes the PAD modules of its checkpoints (every PAD model type calls this once)."""
    register_checkpoint_conversion_mapping(
        model_type,
        [
            WeightConverter(
                source_patterns=list(_COMPACT), target_patterns=list(_DENSE), operations=[DecodeCompact()]
            ),
            WeightConverter(
                source_patterns=_SCALE_FACTOR_PATTERN, target_patterns=r"\1", operations=[ScaleFactorShape()]
            ),
        ],
        overwrite=True,
    )


register_pad_conversions("pad_moe")

PAD_MODEL_TYPES = {
    "pad_moe": "a PAD-MoE text model: load it with AutoModelForSequenceClassification (or another text Auto class)",
    "pad_dyconv": "a PAD dynamic-convolution vision model: load it with AutoModelForImageClassification or AutoModel",
}
"""The PAD model types of this package and how to load each, for the error when one is loaded as another."""


def check_pad_model_type(cls: type, path: Any, checkpoint_type: str | None) -> None:
    """Raise a `PADCheckpointError` when `path` holds a PAD checkpoint of another kind than `cls` loads (e.g. a
    vision checkpoint given to a text PAD class)."""
    own = cls.config_class.model_type
    if checkpoint_type in PAD_MODEL_TYPES and checkpoint_type != own:
        raise PADCheckpointError(
            f"The checkpoint at {str(path)!r} is a {checkpoint_type!r} checkpoint "
            f"({PAD_MODEL_TYPES[checkpoint_type]}), but {cls.__name__} loads {own!r} checkpoints "
            f"({PAD_MODEL_TYPES.get(own, own)})."
        )


# --------------------------------------------------------------------------------------------- reading
def fetch_checkpoint_file(
    path: str,
    filename: str,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    force_download: bool = False,
    local_files_only: bool = False,
    token: str | bool | None = None,
    **ignored: Any,
) -> str | None:
    """The local path of `filename` in the checkpoint directory or hub repo `path` (downloaded and cached by
    `huggingface_hub`), or None when the checkpoint has no such file. `ignored`: download options
    `huggingface_hub` no longer takes (`proxies`: set `HTTP(S)_PROXY`)."""
    if os.path.isdir(path):
        local = os.path.join(path, subfolder or "", filename)
        return local if os.path.isfile(local) else None
    try:
        return hf_hub_download(
            path,
            filename,
            subfolder=subfolder or None,
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=local_files_only,
            token=token,
            library_name="pad_moe_transformers",
        )
    except EntryNotFoundError:
        return None


def resolve_checkpoint_files(
    path: str | os.PathLike, *, variant: str | None = None, download_kwargs: Mapping[str, Any] | None = None
) -> tuple[list[str], dict | None]:
    """Local paths of the safetensors files of a checkpoint directory or hub repo (downloaded and
    cached through `huggingface_hub.hf_hub_download`), and the parsed shard index if sharded."""
    download_kwargs = {k: v for k, v in (download_kwargs or {}).items() if v is not None}
    path = os.fspath(path)

    def fetch(filename: str) -> str | None:
        return fetch_checkpoint_file(path, filename, **download_kwargs)

    single = fetch(add_variant(WEIGHTS_NAME, variant))
    if single is not None:
        return [single], None
    index_file = fetch(add_variant(WEIGHTS_INDEX_NAME, variant))
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
        if fetch(add_variant(unsafe, variant)) is not None:
            raise PADCheckpointError(
                f"{path!r} holds only {unsafe} (a pickle file). PAD-MoE checkpoints are loaded from safetensors "
                "only; convert it with a trusted loader and `save_pretrained`."
            )
    raise PADCheckpointFilesMissingError(
        f"No {add_variant(WEIGHTS_NAME, variant)} or {add_variant(WEIGHTS_INDEX_NAME, variant)} found in {path!r}."
    )


def read_checkpoint_metadata(files: list[str], index: dict | None = None) -> dict[str, str]:
    """The PAD header metadata of the checkpoint files (read without their tensors), checked to agree across
    shards and, when sharded, with the index; `pad_moe.linears` is merged over the shards."""
    metadata: dict[str, str] | None = None
    location: dict[str, str] = {}
    linears: dict[str, Any] = {}
    for path in files:
        name = os.path.basename(path)
        check_file_integrity(path)
        try:
            with safe_open(path, framework="pt") as f:
                file_metadata = dict(f.metadata() or {})
                for key in f.keys():
                    if key in location:
                        raise PADCheckpointError(f"Tensor {key!r} appears in both {location[key]} and {name}.")
                    location[key] = name
        except SafetensorError as error:
            raise PADCheckpointError(f"Checkpoint file {name} cannot be read as safetensors: {error}") from None
        try:
            linears.update(json.loads(file_metadata.pop(METADATA_LINEARS, "{}")))
        except ValueError:
            raise PADCheckpointError(
                f"Checkpoint file {name}: metadata field {METADATA_LINEARS!r} is not JSON."
            ) from None
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
        missing = sorted(set(weight_map) - set(location))
        if missing:
            raise PADCheckpointError(
                f"The shard index lists tensor {missing[0]!r}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + f", which no shard holds ({weight_map[missing[0]]} lacks it)."
            )
    return metadata


# --------------------------------------------------------------------------------------------- loading
# `from_pretrained` keyword arguments that Transformers' loader consumes itself, before the config sees the rest
# (and every keyword starting with "_": the loader-private ones an Auto class passes, `_from_auto` &c.).
_LOADER_KWARGS = (
    "dtype", "torch_dtype", "device_map", "max_memory", "offload_folder", "offload_buffers", "output_loading_info",
    "attn_implementation", "experts_implementation", "tqdm_class",
    "ignore_mismatched_sizes", "weights_only", "low_cpu_mem_usage", "trust_remote_code", "key_mapping",
    "adapter_kwargs", "adapter_name", "distributed_config", "device_mesh", "tp_plan", "tp_size", "use_kernels",
    "kernel_config", "allow_all_kernels", "generation_config", "variant", "use_safetensors", "state_dict",
)
_DOWNLOAD_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")


def _is_base(cls: type) -> bool:
    return cls._auto_class_for_head is AutoModel


def _cross_head_key_mapping(cls: type, checkpoint_config: Mapping[str, Any], config: Any) -> dict[str, str] | None:
    """Key renaming between a checkpoint of the base model (`model.embeddings...`) and a head class
    (`model.bert.embeddings...`), in either direction, as Transformers does one level up for plain models."""
    architectures = checkpoint_config.get("architectures") or []
    base_class = MODEL_MAPPING.get(cls.config_class, None)  # the PAD base-model class of this config
    saved_base = base_class is not None and base_class.__name__ in architectures
    family_prefix = MODEL_MAPPING[type(config.base_config)].base_model_prefix
    if _is_base(cls) and not saved_base:
        return {rf"^model\.{family_prefix}\.": "model."}
    if not _is_base(cls) and saved_base:
        return {rf"^model\.(?!{family_prefix}\.)": f"model.{family_prefix}."}
    return None


def load_pad_checkpoint(
    cls: type,
    path: str | os.PathLike,
    checkpoint_config: Mapping[str, Any],
    model_args: tuple,
    config: Any,
    kwargs: dict[str, Any],
    base_from_pretrained: Callable[..., Any],
):
    """`from_pretrained` of a PAD checkpoint: Transformers' loader with the PAD conversions, then the checks."""
    kwargs = dict(kwargs)
    path = os.fspath(path)
    if kwargs.get("use_safetensors") is False:
        raise PADCheckpointError("PAD-MoE checkpoints are safetensors only; `use_safetensors=False` is not supported.")
    for unsupported in ("gguf_file", "quantization_config"):
        if kwargs.get(unsupported) is not None:
            raise ValueError(f"`{unsupported}` is not supported when loading a PAD-MoE checkpoint from {path!r}.")
    download_kwargs = {k: kwargs[k] for k in _DOWNLOAD_KWARGS if k in kwargs}
    files, index = resolve_checkpoint_files(path, variant=kwargs.get("variant"), download_kwargs=download_kwargs)
    metadata = read_checkpoint_metadata(files, index)
    if config is None:
        # Config overrides (`num_labels=5`, `hidden_dropout_prob=0.3`) are applied here, as Transformers does
        # (the config is needed before loading, to validate the tensors); loader options are not config fields.
        loader_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in _LOADER_KWARGS or k.startswith("_")}
        config, kwargs = cls.config_class.from_pretrained(path, return_unused_kwargs=True, **kwargs)
        kwargs.update(download_kwargs, **loader_kwargs)
    mapping = _cross_head_key_mapping(cls, checkpoint_config, config)
    # Files written by Transformers' own writer (the PEFT / distributed / quantized fallback of `save_pretrained`)
    # carry no PAD metadata and store every tensor under its own name: Transformers' loader reads them as is.
    if METADATA_VERSION in metadata:
        validate_pad_tensors(cls, config, files, metadata, mapping)
    if mapping is not None:
        kwargs["key_mapping"] = {**mapping, **(kwargs.get("key_mapping") or {})}
    want_info = kwargs.pop("output_loading_info", False)
    model, info = base_from_pretrained(path, *model_args, config=config, output_loading_info=True, **kwargs)

    verify_partition_metadata(model)
    # A partitioned model trains and runs in compact storage (only what eq. 4 reads is a parameter). The PAD files
    # load into it directly (`DecodeCompact`); files of Transformers' own writer store dense tensors under their own
    # names, which are converted here, one layer at a time.
    compact_pad_storage(model)
    return (model, info) if want_info else model


_DTYPES = {
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}


def validate_pad_tensors(
    cls: type, config: Any, files: list[str], metadata: Mapping[str, str], mapping: Mapping[str, str] | None
) -> None:
    """Check the header metadata and every PAD tensor of the files against the model the config builds, before
    Transformers loads anything, so that a bad checkpoint is refused with a `PADCheckpointError` naming the
    tensor or config field at fault. Reads only shapes and dtypes, and the (small) packed masks.

    The model is built on the meta device for its shapes: no storage, no weights.
    """
    with torch.device("meta"):
        skeleton = cls(copy.deepcopy(config))
    layout = check_metadata(metadata, config, skeleton)
    linears = pad_linear_modules(skeleton)
    if mapping is None:
        check_saved_linears(metadata, linears)
    stored: dict[str, Tensor] = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                name = key
                for pattern, replacement in (mapping or {}).items():
                    name = re.sub(pattern, replacement, name)
                if pad_prefix_of(name, linears) is None:
                    continue
                if name.endswith(".mask_packed"):
                    stored[name] = f.get_tensor(key)
                else:
                    piece = f.get_slice(key)
                    stored[name] = torch.empty(piece.get_shape(), dtype=_DTYPES.get(piece.get_dtype()), device="meta")
    for prefix, linear in linears.items():
        if layout == LAYOUT_MOE:
            check_dense_experts(prefix, linear, require_tensor(stored, prefix, "expert_weight", layout))
        else:
            nnz = check_packed_mask(prefix, linear, require_tensor(stored, prefix, "mask_packed", layout))
            static_values = require_tensor(stored, prefix, "static_values", layout)
            check_compact_values(
                prefix, linear, nnz, static_values, require_tensor(stored, prefix, "expert_values", layout)
            )
        for name in SCALE_FACTOR_NAMES:
            parameter = getattr(linear, name, None)
            if parameter is not None:
                check_scale_factor(prefix + name, require_tensor(stored, prefix, name, layout), parameter)
    unexpected = [k for k in stored if k[len(pad_prefix_of(k, linears)) :] in RAW_SUFFIXES and layout != LAYOUT_MOE]
    unexpected += [k for k in stored if k.endswith(tuple("." + s for s in _COMPACT)) and layout == LAYOUT_MOE]
    check_no_unexpected(unexpected, linears)


def public_loader_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """`kwargs` without the loader-private keywords (`_from_auto`, `_from_pipeline`, `_commit_hash`, ...) that an Auto
    class hands to the class it resolved: re-entering another Auto class with them passes them twice (Transformers
    5.25 sets `_from_auto` itself), and they describe the outer call, not the inner one."""
    return {k: v for k, v in kwargs.items() if not k.startswith("_")}


def upcycle(cls: type, path, checkpoint_type: str | None, config: Any, model_args: tuple, kwargs: dict[str, Any]):
    """`from_pretrained(dense, config=pad_config)`: load the dense model with its own class, then replace each FFN
    by a PAD-MoE layer whose experts and static weights are copies of it (outputs unchanged)."""
    if checkpoint_type != config.base_model_type:
        raise ValueError(
            f"The checkpoint at {path!r} is a {checkpoint_type!r} model but the PAD config wraps a "
            f"{config.base_model_type!r} config; build the config with "
            f"{type(config).__name__}.from_base({str(path)!r})."
        )
    # The model owns a copy of the config, as Transformers' `from_pretrained` gives it: the caller's object is left
    # as it was (a second upcycle from the same config starts from the same, unpartitioned state).
    config = copy.deepcopy(config)
    kwargs = public_loader_kwargs(kwargs)
    config.sync_base_config()
    if "experts_implementation" in kwargs:  # for the PAD model built below, as Transformers' loader would set it
        # (on the PAD config alone: the public setter would pass it on to the family config, whose model has no experts)
        set_own_experts_implementation(config, kwargs.pop("experts_implementation"))
    want_info = kwargs.get("output_loading_info", False)
    loaded = cls._auto_class_for_head.from_pretrained(path, *model_args, config=config.base_config, **kwargs)
    dense, info = loaded if want_info else (loaded, None)
    config.base_config = dense.config
    config.dtype = dense.config.dtype
    model = cls(config, base_model=dense)
    model.name_or_path = str(path)
    model.eval()  # like from_pretrained: the model comes back in eval mode
    return (model, info) if want_info else model


def pad_from_pretrained(
    cls: type,
    path: Any,
    model_args: tuple,
    config: Any,
    kwargs: dict[str, Any],
    base_from_pretrained: Callable[..., Any],
    dense_model_types: Iterable[str],
):
    """`from_pretrained` of a PAD class (`cls.config_class` a PAD config with `from_base`): upcycle a dense checkpoint
    of one of `dense_model_types` (with the given PAD config, or a default one), load a PAD checkpoint of this
    kind, refuse one of another PAD kind; anything else goes to Transformers' `base_from_pretrained`."""
    if path is not None and kwargs.get("state_dict") is None:
        hub_kwargs = {k: kwargs[k] for k in _DOWNLOAD_KWARGS if k in kwargs}
        checkpoint_config = PreTrainedConfig.get_config_dict(path, **hub_kwargs)[0]
        checkpoint_type = checkpoint_config.get("model_type")
        check_pad_model_type(cls, path, checkpoint_type)
        own = cls.config_class.model_type
        if config is None and checkpoint_type in dense_model_types:  # a dense checkpoint: upcycle, default config
            config = cls.config_class.from_base(path, hub_kwargs=hub_kwargs)
        if isinstance(config, cls.config_class) and checkpoint_type != own:
            return upcycle(cls, path, checkpoint_type, config, model_args, kwargs)
        if checkpoint_type == own:
            return load_pad_checkpoint(cls, path, checkpoint_config, model_args, config, kwargs, base_from_pretrained)
    return base_from_pretrained(path, *model_args, config=config, **kwargs)


def initialize_pad_weight(module: PADWeight, init_dynamic: Callable[[Tensor], None]) -> None:
    """Initialise the tensors of one PAD module that Transformers has not marked as loaded (`initialize_weights`):
    `init_dynamic(expert_weight)` draws the dynamic weights, the static weight is derived from them (their mean,
    which is their common value while equal: the convention of a never-partitioned "moe"-layout checkpoint, which
    stores no static weight), the mask is all dynamic, the scale factors at l_s = l_d = 1 and the biases zero.
    Each `transformers.initialization` call skips a tensor flagged as loaded, so loaded and upcycled tensors are
    left alone."""
    if module.storage == "compact":  # a partitioned layer: its mask says which entries the values are
        init_dynamic(module.expert_values)
        init_dynamic(module.static_values)
    else:
        _materialize_derived_tensors(module)
        init_dynamic(module.expert_weight)
        if module.expert_weight.device.type != "meta":  # no values to derive from on the meta device
            init.copy_(module.static_weight, static_from_experts(module.expert_weight.detach()))
        init.ones_(module.mask)
    for name in SCALE_FACTOR_INIT:
        if getattr(module, name, None) is not None:
            init.constant_(getattr(module, name), SCALE_FACTOR_INIT[name])
    for bias in (getattr(module, "expert_bias", None), getattr(module, "static_bias", None)):
        if bias is not None:
            init.zeros_(bias)


def _materialize_derived_tensors(module: PADWeight) -> None:
    """A "moe"-layout checkpoint stores no static weight and no mask: they are ignored missing keys, which
    Transformers leaves on the meta device. Give them real storage beside the loaded experts before init."""
    device = module.expert_weight.device
    if device.type == "meta":
        return
    if module.static_weight.device.type == "meta":
        module.static_weight = nn.Parameter(
            torch.empty_like(module.static_weight, device=device), requires_grad=module.static_weight.requires_grad
        )
    if module.mask.device.type == "meta":
        module.mask = torch.empty_like(module.mask, device=device)
