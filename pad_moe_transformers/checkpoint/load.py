"""Loading a PAD checkpoint: find its files (local directory or Hub repo), read and cross-check the
shards, then decode them and let Transformers build the model (`from_pretrained`)."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from .codec import decode_checkpoint
from .format import METADATA_LINEARS, WEIGHTS_INDEX_NAME, WEIGHTS_NAME, add_variant, tied_weight_keys
from .validate import PADCheckpointError, check_file_integrity


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
        check_file_integrity(path)
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
    tied = tied_weight_keys(model)
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

