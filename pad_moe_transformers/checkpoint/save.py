"""Saving a PAD checkpoint: the safetensors files (sharded so that a PAD linear never straddles two
shards, with byte-identical headers for identical models) and `save_pretrained` (config, weights,
model card, optional upload).

Saves are staged: every file is first written into a fresh hidden directory inside the target
(`.pad_moe_save-*`, same file system) and only moved into place with `os.replace` once all of them
are complete (weights, then the shard index, then `config.json`, then `README.md`); weight files of
an earlier save that this one does not rewrite are removed last. A failure while writing (full
disk, an exception, Ctrl-C) therefore leaves the previous checkpoint in the directory untouched and
loadable, and the staging directory is removed. A hard kill can leave a staging directory behind;
the next successful save into that directory removes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from huggingface_hub import split_state_dict_into_shards_factory
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers.utils.hub import convert_file_size_to_int

from .._compat import has_peft_adapter
from ..modelcard import has_foreign_readme, load_eval_results, write_model_card
from ..partition.metadata import verify_partition_metadata
from .codec import compact_state_dict
from .format import (
    FORMAT_VERSION,
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
from .hub import create_repo, default_commit_message, upload_files


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


def _shard(
    tensors: Mapping[str, Tensor], linears: Mapping[str, Any], max_shard_size: int | str, weights_name: str
) -> dict[str, list[str]]:
    """`{file name: tensor names}`: `huggingface_hub`'s splitter (state-dict order, a new shard when the next entry
    would pass `max_shard_size`, an entry larger than that alone in its own shard) run on one entry per PAD linear
    (all its tensors) or other tensor, so that a PAD linear never straddles two shards and each shard decodes on
    its own (e.g. by `load_state_dict` shard by shard). Sizes are parsed as Transformers parses them."""
    groups: dict[str, list[str]] = {}
    for key in tensors:
        groups.setdefault(pad_prefix_of(key, linears) or key, []).append(key)
    split = split_state_dict_into_shards_factory(
        groups,
        get_storage_size=lambda keys: sum(tensors[k].nbytes for k in keys),
        filename_pattern=weights_stem(weights_name) + "{suffix}.safetensors",
        max_shard_size=convert_file_size_to_int(max_shard_size),
    )
    return {name: [k for e in entries for k in groups[e]] for name, entries in split.filename_to_tensors.items()}


def _sort_header_metadata(path: str) -> None:
    """Sort the `__metadata__` keys of a safetensors file in place (the header keeps its length), so that saving the
    same model twice gives the same bytes (the Hub then sees an unchanged file)."""
    # Raw header bytes: safetensors writes `__metadata__` from a hash map, in random order, and cannot sort it.
    with open(path, "r+b") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        canonical = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(canonical) <= length:
            f.seek(8)
            f.write(canonical.ljust(length, b" "))


# --------------------------------------------------------------------------------------------- staging
STAGING_PREFIX = ".pad_moe_save-"
"""Name prefix of the hidden directory a save is written into before its files are moved into place."""


def _writable_directory(save_directory: str) -> None:
    """Create `save_directory` or raise a `PermissionError`/`OSError` that names it and says what to do."""
    try:
        os.makedirs(save_directory, exist_ok=True)
    except OSError as error:
        raise type(error)(
            error.errno, f"Cannot create the checkpoint directory {save_directory!r} ({error.strerror}); choose a "
            "writable output directory", save_directory
        ) from error


@contextlib.contextmanager
def _staging_directory(save_directory: str) -> Iterator[str]:
    """A fresh hidden directory inside `save_directory`; removed on exit, whatever happens."""
    try:
        staging = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=save_directory)
    except OSError as error:
        raise type(error)(
            error.errno, f"Cannot write a checkpoint into {save_directory!r} ({error.strerror}); the directory must "
            "be writable. Nothing was changed in it", save_directory
        ) from error
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _commit(
    staging: str, save_directory: str, names: list[str], stale_weights: tuple[str, set[str]] | None
) -> list[str]:
    """Move the staged files `names` into `save_directory` (in that order, each with an atomic `os.replace`),
    then remove stale weight files of an earlier save and staging directories left by killed saves.
    Returns the names of every file moved."""
    names = list(names) + sorted(set(os.listdir(staging)) - set(names))  # anything else written there, last
    for name in names:
        os.replace(os.path.join(staging, name), os.path.join(save_directory, name))
    if stale_weights is not None:
        _remove_stale_weight_files(save_directory, stale_weights[0], keep=stale_weights[1])
    for entry in os.listdir(save_directory):
        path = os.path.join(save_directory, entry)
        if entry.startswith(STAGING_PREFIX) and path != staging and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
    return names


def save_checkpoint_files(
    model: nn.Module,
    save_directory: str | os.PathLike,
    *,
    state_dict: Mapping[str, Tensor] | None = None,
    max_shard_size: int | str = "50GB",
    variant: str | None = None,
) -> SavedCheckpoint:
    """Write the weights of `model` as a PAD checkpoint (one file or shards plus an index).

    The files are staged and moved into place only once all are written (see the module docstring);
    weight files of an earlier save in `save_directory` that this save does not rewrite are removed.
    """
    save_directory = os.fspath(save_directory)
    _writable_directory(save_directory)
    with _staging_directory(save_directory) as staging:
        staged = _write_checkpoint_files(
            model, staging, state_dict=state_dict, max_shard_size=max_shard_size, variant=variant
        )
        _commit(staging, save_directory, _names(staged), _stale_rule(staged, variant))
    return _relocated(staged, staging, save_directory)


def _names(saved: SavedCheckpoint) -> list[str]:
    """The weight files in commit order: shards first, then the index that points at them."""
    index = [os.path.basename(saved.index_file)] if saved.index_file else []
    return [os.path.basename(f) for f in saved.files] + index


def _stale_rule(saved: SavedCheckpoint, variant: str | None) -> tuple[str, set[str]]:
    return add_variant(WEIGHTS_NAME, variant), set(_names(saved))


def _relocated(saved: SavedCheckpoint, staging: str, save_directory: str) -> SavedCheckpoint:
    def move(path: str) -> str:
        return os.path.join(save_directory, os.path.relpath(path, staging))

    return SavedCheckpoint(
        [move(f) for f in saved.files], move(saved.index_file) if saved.index_file else None,
        saved.layout, saved.total_size, saved.stored_values,
    )


def _write_checkpoint_files(
    model: nn.Module,
    save_directory: str,
    *,
    state_dict: Mapping[str, Tensor] | None,
    max_shard_size: int | str,
    variant: str | None,
) -> SavedCheckpoint:
    """Write the weight files into `save_directory` (a fresh staging directory)."""
    tensors, metadata = compact_state_dict(model, state_dict)
    linears = pad_linear_modules(model)
    shards = _shard(tensors, linears, max_shard_size, add_variant(WEIGHTS_NAME, variant))
    files = []
    weight_map = {}
    for name, keys in shards.items():
        shard_linears = {
            prefix[:-1]: linear_shape(linears[prefix]) for prefix in {pad_prefix_of(k, linears) for k in keys} - {None}
        }
        shard_metadata = dict(metadata, **{METADATA_LINEARS: json.dumps(shard_linears, sort_keys=True)})
        path = os.path.join(save_directory, name)
        save_file({k: tensors[k] for k in keys}, path, metadata=shard_metadata)
        _sort_header_metadata(path)
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
    """`PADMoEPreTrainedModel.save_pretrained`: config, compact safetensors weights and model card; with
    `push_to_hub=True` the files this save wrote are then committed to the Hub repo `repo_id` (default: the
    directory's name), as `PreTrainedModel.save_pretrained` does (`commit_message`, `create_pr`; the other
    keywords go to `HfApi.create_repo`).

    Extra keywords: `model_card` (default True: write README.md), `base_model`, `eval_results`
    (a `{metric: value}` dict) and `tags` for the card.
    """
    card = {k: kwargs.pop(k) for k in _CARD_KWARGS if k in kwargs}
    if kwargs.pop("safe_serialization", True) is False:
        raise ValueError("PAD-MoE checkpoints are always safetensors; `safe_serialization=False` is not supported.")
    if token is not None:
        kwargs["token"] = token
    save_directory = os.fspath(save_directory)
    if os.path.isfile(save_directory):
        raise ValueError(f"save_pretrained needs a directory, {save_directory!r} is a file.")
    if not is_main_process:
        return None
    _writable_directory(save_directory)

    repo_id = None
    if push_to_hub:
        commit_message = kwargs.pop("commit_message", None) or default_commit_message(model)
        create_pr = kwargs.pop("create_pr", False)
        repo_id = create_repo(kwargs.pop("repo_id", save_directory.rstrip(os.sep).split(os.sep)[-1]), **kwargs)

    card_repo_id = card.pop("card_repo_id", repo_id)
    model.config.dtype = str(model.dtype).split(".")[1]
    model.config.architectures = [type(model).__name__]
    with _staging_directory(save_directory) as staging:
        # Everything is written into `staging` first and moved into place only when complete.
        model.config.save_pretrained(staging)
        staged = _write_checkpoint_files(
            model, staging, state_dict=state_dict, max_shard_size=max_shard_size, variant=variant
        )
        names = _names(staged) + ["config.json"]
        # A README not generated by this package is never overwritten.
        if card.pop("model_card", True) and not has_foreign_readme(save_directory):
            if card.get("eval_results") is None:
                card["eval_results"] = load_eval_results(save_directory)
            write_model_card(
                model, staging, repo_id=card_repo_id, layout=staged.layout, format_version=FORMAT_VERSION,
                state_dict=state_dict, **card,
            )
            names.append("README.md")
        written = _commit(staging, save_directory, names, _stale_rule(staged, variant))
    if push_to_hub:
        upload_files(save_directory, repo_id, written, commit_message=commit_message, token=token, create_pr=create_pr)
    return _relocated(staged, staging, save_directory)


def pad_save_pretrained(
    model: Any, save_directory: str | os.PathLike, args: tuple, kwargs: dict[str, Any], base_save_pretrained: Any
) -> SavedCheckpoint | None:
    """`save_pretrained` of a PAD model: the compact PAD checkpoint (`save_pad_pretrained`) after checking
    `config.partition` against the masks; adapters (PEFT), distributed and quantized checkpoints fall back to
    Transformers' own writer (`base_save_pretrained`), without the model-card options."""
    if (
        kwargs.get("distributed_checkpoint")
        or has_peft_adapter(model)
        or getattr(model, "hf_quantizer", None)
    ):
        for key in _CARD_KWARGS:
            kwargs.pop(key, None)
        return base_save_pretrained(save_directory, *args, **kwargs)
    verify_partition_metadata(model)  # never write a checkpoint whose config.partition contradicts its masks
    return save_pad_pretrained(model, save_directory, *args, **kwargs)
