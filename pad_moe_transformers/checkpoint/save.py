"""Saving a PAD checkpoint: the safetensors files (sharded so that a PAD linear never straddles two
shards, with byte-identical headers for identical models) and `save_pretrained` (config, weights,
model card, optional upload)."""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from safetensors.torch import save_file
from torch import Tensor, nn

from .codec import compact_state_dict
from .format import (
    METADATA_LAYOUT,
    METADATA_LINEARS,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    add_variant,
    linear_shape,
    pad_linear_modules,
    pad_prefix_of,
    weights_stem,
)


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


def _group_for_sharding(tensors: Mapping[str, Tensor], linear_prefixes: Iterable[str]) -> list[list[str]]:
    """Tensor names grouped so that all tensors of one PAD linear land in the same shard (each shard
    can then be decoded on its own, e.g. by `load_state_dict` shard by shard)."""
    prefixes = set(linear_prefixes)
    groups: list[list[str]] = []
    index_of: dict[str, int] = {}
    for key in tensors:
        prefix = pad_prefix_of(key, prefixes)
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
        size = sum(tensors[k].nbytes for k in group)
        if shards[-1] and shard_bytes + size > limit:
            shards.append([])
            shard_bytes = 0
        shards[-1].extend(group)
        shard_bytes += size

    weights_name = add_variant(WEIGHTS_NAME, variant)
    if len(shards) == 1:
        names = [weights_name]
    else:
        stem = weights_stem(weights_name)
        names = [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    _remove_stale_weight_files(save_directory, weights_name, keep=set(names))

    files = []
    weight_map = {}
    for name, keys in zip(names, shards):
        shard_linears = {
            prefix[:-1]: linear_shape(linears[prefix])
            for prefix in {pad_prefix_of(k, linears) for k in keys} - {None}
        }
        shard_metadata = dict(metadata, **{METADATA_LINEARS: json.dumps(shard_linears, sort_keys=True)})
        path = os.path.join(save_directory, name)
        save_file({k: tensors[k] for k in keys}, path, metadata=shard_metadata)
        _canonicalize_header(path)
        files.append(path)
        weight_map.update(dict.fromkeys(keys, name))

    total_size = sum(t.nbytes for t in tensors.values())
    stored_values = sum(t.numel() for k, t in tensors.items() if not k.endswith(".mask_packed"))
    index_file = None
    if len(shards) > 1:
        index_file = os.path.join(save_directory, add_variant(WEIGHTS_INDEX_NAME, variant))
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
    stem = weights_stem(weights_name)
    pattern = re.compile(re.escape(stem) + r"(-\d{5}-of-\d{5})?\.safetensors")
    index_name = stem + ".safetensors.index.json"
    for filename in os.listdir(directory):
        path = os.path.join(directory, filename)
        if not os.path.isfile(path) or filename in keep:
            continue
        if pattern.fullmatch(filename) or filename == index_name:
            os.remove(path)


# --------------------------------------------------------------------------------------------- save_pretrained
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
        from .hub import create_repo  # hub.py imports this module

        repo_id = create_repo(repo_id, **kwargs)
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
            from ..modelcard import write_model_card

            write_model_card(model, save_directory, repo_id=card_repo_id, layout=saved.layout, **card)

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

