"""Loading a PAD checkpoint through Transformers' own loader.

`from_pretrained(pad_checkpoint)` is `PreTrainedModel.from_pretrained`: the model is built once (on the meta
device), and each stored tensor is read, converted and placed by Transformers (dtype, device map, fp32
router, tied weights, mismatched sizes, load report). What is PAD-specific is declared, not overridden:

- `DecodeCompact`, a weight conversion registered for the `pad_moe` model type, turns the three compact
  tensors of one PAD linear (`mask_packed`, `static_values`, `expert_values`) into its `expert_weight`,
  `static_weight` and `mask`, one linear at a time (no dense copy of all experts beside the model);
- `ScaleFactorShape` turns the 0-d scale factors of the files into the model's `(1,)` parameters;
- a never-partitioned ("moe" layout) checkpoint stores only the experts: the static weights and masks are
  missing keys, rebuilt by `PADMoEPreTrainedModel.initialize_weights`.

Around that call: the header metadata of the files is checked against the config (format version, layout,
PAD linears), conversion errors become a `PADCheckpointError`, and `config.partition` is checked against
the loaded masks.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import ConversionOps, WeightConverter

from ..core.compact import decode_compact, encode_compact
from ..core.registry import named_pad_linears
from ..core.scale_factors import SCALE_FACTOR_NAMES
from .format import METADATA_LINEARS, WEIGHTS_INDEX_NAME, WEIGHTS_NAME, add_variant
from .validate import (
    PADCheckpointError,
    check_compact_values,
    check_file_integrity,
    check_metadata,
    check_packed_mask,
    check_saved_linears,
    check_scale_factor,
    fail,
)

_COMPACT = ["mask_packed", "static_values", "expert_values"]
_DENSE = ["expert_weight", "static_weight", "mask"]  # the first target names where the loader reads dtypes


class DecodeCompact(ConversionOps):
    """The compact tensors of one PAD linear -> its `expert_weight`, `static_weight` and `mask` (validated)."""

    supports_many_to_many = True

    @torch.no_grad()
    def convert(self, input_dict, source_patterns=None, target_patterns=None, full_layer_name=None, model=None, **kwargs):
        prefix = full_layer_name.rsplit(".", 1)[0] + "."
        missing = [s for s in _COMPACT if not input_dict.get(s)]
        if missing:
            fail(f"Missing tensor(s) {[prefix + s for s in missing]} (compact layout) of the PAD linear {prefix[:-1]!r}.")
        packed, static_values, expert_values = (input_dict[s][0] for s in _COMPACT)
        linear = model.get_submodule(prefix[:-1])
        # The loader casts every tensor of a conversion to the dtype of its first target (the float experts):
        # the packed bytes (0..255) survive that exactly, in fp32, bf16 and fp16.
        if packed.is_floating_point():
            if not bool((packed == packed.round()).all()) or bool(((packed < 0) | (packed > 255)).any()):
                fail(f"Tensor {prefix}mask_packed does not hold bytes; the packed mask must be uint8.")
            packed = packed.to(torch.uint8)
        nnz = check_packed_mask(prefix, linear, packed.cpu())
        check_compact_values(prefix, linear, nnz, static_values, expert_values)
        dynamic, static, mask = decode_compact(packed.to(expert_values.device), static_values, expert_values,
                                               tuple(linear.mask.shape))
        return {"expert_weight": dynamic, "static_weight": static, "mask": mask}

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
        (name, tensors), = input_dict.items()
        tensor = check_scale_factor(full_layer_name, tensors[0], torch.empty(1))
        return {name: tensor.reshape(()) if self.stored else tensor}

    @property
    def reverse_op(self) -> ConversionOps:
        return ScaleFactorShape(stored=not self.stored)


register_checkpoint_conversion_mapping(
    "pad_moe",
    [
        WeightConverter(source_patterns=list(_COMPACT), target_patterns=list(_DENSE), operations=[DecodeCompact()]),
        *(WeightConverter(source_patterns=name, target_patterns=name, operations=[ScaleFactorShape()])
          for name in SCALE_FACTOR_NAMES),
    ],
    overwrite=True,
)


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
    raise PADCheckpointError(
        f"No {add_variant(WEIGHTS_NAME, variant)} or {add_variant(WEIGHTS_INDEX_NAME, variant)} found in {path!r}."
    )


def read_checkpoint_metadata(files: list[str]) -> dict[str, str]:
    """The PAD header metadata of the checkpoint files (read without their tensors), checked to agree across
    shards; `pad_moe.linears` is merged over the shards."""
    metadata: dict[str, str] | None = None
    linears: dict[str, Any] = {}
    for path in files:
        name = os.path.basename(path)
        check_file_integrity(path)
        try:
            with safe_open(path, framework="pt") as f:
                file_metadata = dict(f.metadata() or {})
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
    return metadata


# --------------------------------------------------------------------------------------------- loading
_DOWNLOAD_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")


def _is_base(cls: type) -> bool:
    from transformers import AutoModel

    return cls._auto_class_for_head is AutoModel


def _cross_head_key_mapping(cls: type, checkpoint_config: Mapping[str, Any], config: Any) -> dict[str, str] | None:
    """Key renaming between a checkpoint of the base model (`model.embeddings...`) and a head class
    (`model.bert.embeddings...`), in either direction, as Transformers does one level up for plain models."""
    from transformers import AutoModelForSequenceClassification

    architectures = checkpoint_config.get("architectures") or []
    saved_base = any(name == "PADMoEModel" for name in architectures)
    family_prefix = AutoModelForSequenceClassification._model_mapping[type(config.base_config)].base_model_prefix
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
    files, _ = resolve_checkpoint_files(path, variant=kwargs.get("variant"), download_kwargs=download_kwargs)
    metadata = read_checkpoint_metadata(files)
    if config is None:
        # Config overrides (`num_labels=5`, `hidden_dropout_prob=0.3`) are applied here, as Transformers does;
        # the download options are consumed by the config and still needed for the weights.
        config, kwargs = cls.config_class.from_pretrained(path, return_unused_kwargs=True, **kwargs)
        kwargs.update(download_kwargs)
    mapping = _cross_head_key_mapping(cls, checkpoint_config, config)
    if mapping is not None:
        kwargs["key_mapping"] = {**mapping, **(kwargs.get("key_mapping") or {})}
    want_info = kwargs.pop("output_loading_info", False)
    model, info = base_from_pretrained(path, *model_args, config=config, output_loading_info=True, **kwargs)

    check_metadata(metadata, model.config, model)
    linears = {ref.name + ".": ref.module for ref in named_pad_linears(model)}
    if mapping is None:
        check_saved_linears(metadata, linears)
    errors = info.get("conversion_errors") or {}
    if errors:
        key, message = next(iter(errors.items()))
        first_line = [line for line in str(message).splitlines() if line.strip()]
        detail = next((line for line in reversed(first_line) if "PADCheckpointError" in line), first_line[-1] if first_line else "")
        raise PADCheckpointError(f"Could not decode the PAD tensors of {key!r} from {path!r}: {detail}")
    pad_problems = sorted(
        k for k in set(info.get("missing_keys", ())) | set(info.get("unexpected_keys", ()))
        if any(k.startswith(prefix) for prefix in linears) and not k.endswith((".static_weight", ".mask"))
    )
    if pad_problems:
        raise PADCheckpointError(f"The checkpoint at {path!r} does not match the PAD layers of the config: {pad_problems[:5]}")
    from ..partition.metadata import verify_partition_metadata

    verify_partition_metadata(model)
    return (model, info) if want_info else model


def upcycle(cls: type, path, checkpoint_type: str | None, config: Any, model_args: tuple, kwargs: dict[str, Any]):
    """`from_pretrained(dense, config=pad_config)`: load the dense model with its own class, then replace each FFN
    by a PAD-MoE layer whose experts and static weights are copies of it (outputs unchanged)."""
    if checkpoint_type != config.base_model_type:
        raise ValueError(
            f"The checkpoint at {path!r} is a {checkpoint_type!r} model but the PAD config wraps a "
            f"{config.base_model_type!r} config; build the config with PADMoEConfig.from_base({str(path)!r})."
        )
    config.sync_base_config()
    want_info = kwargs.get("output_loading_info", False)
    loaded = cls._auto_class_for_head.from_pretrained(path, *model_args, config=config.base_config, **kwargs)
    dense, info = loaded if want_info else (loaded, None)
    config.base_config = dense.config
    config.dtype = dense.config.dtype
    model = cls(config, base_model=dense)
    model.name_or_path = str(path)
    model.eval()  # like from_pretrained: the model comes back in eval mode
    return (model, info) if want_info else model
