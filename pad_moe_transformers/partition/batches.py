"""The partition batches: reading a bounded number of them, and checking that they can be scored."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sized
from typing import Any

import torch
from torch import Tensor

Batch = Mapping[str, Any]
"""One mini-batch as the model's forward takes it (`input_ids`, `attention_mask`, `labels`, ...)."""

_LABEL_KEYS = ("labels", "start_positions")
IGNORE_INDEX = -100
"""The label the families' cross-entropy losses skip (PyTorch's `ignore_index` default)."""

ZERO_BATCHES_MESSAGE = (
    "Mode partition got zero batches. Pass at least one labelled mini-batch of training data "
    "(the paper uses 10), e.g. the first batches of the training dataloader."
)


def _refuse_non_iterables(batches: Any) -> None:
    if batches is None:
        raise ValueError(f"batches is None. {ZERO_BATCHES_MESSAGE}")
    if isinstance(batches, Mapping):
        raise ValueError(
            f"batches is a single batch (a {type(batches).__name__} with keys {sorted(batches)}); pass a list of "
            "batches, e.g. `[batch]`."
        )


def read_batches(batches: Iterable[Batch], num_batches: int) -> list[Batch]:
    """The first `num_batches` batches of `batches`, read one by one (`itertools.islice`).

    Nothing past the `num_batches`-th batch is read, so an unbounded iterator (an endless generator, a
    streaming dataloader) is fine. A shorter iterable gives all it has (possibly none: the caller decides).
    """
    _refuse_non_iterables(batches)
    return list(itertools.islice(batches, num_batches))


def sized_length(batches: Any) -> int | None:
    """`len(batches)` for a sized collection (a list, a map-style DataLoader), None for an iterator or a
    loader whose length is unknown (e.g. over an `IterableDataset`)."""
    if isinstance(batches, Mapping) or not isinstance(batches, Sized):
        return None
    try:
        return len(batches)
    except TypeError:
        return None


def check_batches(batches: Iterable[Batch]) -> list[Batch]:
    """`batches` as a list, checked usable for scoring (non-empty, mappings, labelled, not all padding).

    The scoring functions read every batch (several times for IMP), so `batches` must be a finite,
    sized collection (a list, a tuple, a map-style DataLoader). An iterator of unknown length is refused
    rather than read to its end; `partition_model(..., num_batches=n)` reads the first `n` of any iterable.
    """
    _refuse_non_iterables(batches)
    if sized_length(batches) is None:
        raise ValueError(
            f"batches is a {type(batches).__name__} of unknown length; the scoring functions read all of it. "
            "Pass a list of batches, e.g. `list(itertools.islice(loader, 10))`, or call "
            "`partition_model(model, loader, num_batches=10)`, which reads only the first batches."
        )
    batches = list(batches)
    if not batches:
        raise ValueError(ZERO_BATCHES_MESSAGE)
    for index, batch in enumerate(batches):
        if not isinstance(batch, Mapping):
            raise ValueError(
                f"Partition batch {index} is a {type(batch).__name__}; each batch must be a mapping of model "
                "inputs (as a Trainer / DataCollator produces), e.g. {'input_ids': ..., 'labels': ...}."
            )
        if not any(batch.get(key) is not None for key in _LABEL_KEYS):
            raise ValueError(
                f"Partition batch {index} has no labels (keys: {sorted(batch)}). The scores are derivatives "
                "of the task loss, so every batch needs 'labels' (or 'start_positions'/'end_positions' for QA); "
                "make sure the dataset keeps its label column."
            )
        empty = [key for key, value in batch.items() if isinstance(value, Tensor) and value.dim() and not len(value)]
        if empty:
            raise ValueError(
                f"Partition batch {index} is empty ({empty[0]} has shape {tuple(batch[empty[0]].shape)}): a batch of "
                "no examples carries no information for the scores (its mean task loss is 0/0). Drop empty batches, "
                "e.g. with DataLoader(..., drop_last=True) or by filtering the dataset."
            )
        attention_mask = batch.get("attention_mask")
        if isinstance(attention_mask, Tensor) and attention_mask.numel() and not bool(attention_mask.any()):
            raise ValueError(
                f"Partition batch {index} is all padding (its attention_mask is all 0): it holds no real token, so "
                "it carries no score. Check the collator / tokenizer output, or drop empty examples."
            )
    _check_labelled(batches)
    return batches


def _check_labelled(batches: list[Batch]) -> None:
    """Refuse batches whose class labels are all the ignore index: the families' cross-entropy averages over the
    labelled positions, so such a batch has a 0/0 (NaN) task loss, which would otherwise surface as a non-finite
    loss blamed on an overflow."""
    unlabelled = []
    for index, batch in enumerate(batches):
        labels = batch.get("labels")
        if isinstance(labels, Tensor) and not labels.is_floating_point() and not bool((labels != IGNORE_INDEX).any()):
            unlabelled.append(index)
    if not unlabelled:
        return
    advice = (
        "Pass batches with labelled positions: for token classification, check that the label alignment labels "
        "the first sub-token of each word; for masked language modelling, that the collator masks tokens "
        "(mlm_probability > 0); otherwise, that the dataset's label column is not all -100."
    )
    if len(unlabelled) == len(batches):
        raise ValueError(
            f"No partition batch has a single labelled token: every label is {IGNORE_INDEX} (the ignore index) in "
            f"all {len(batches)} batches, so the task loss is 0/0 and the scores are undefined. {advice}"
        )
    raise ValueError(
        f"Partition batches {unlabelled} have no labelled token (every label is {IGNORE_INDEX}, the ignore index): "
        f"their task loss is 0/0 (NaN). Drop them from the partition batches. {advice}"
    )


def to_device(batch: Batch, device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.items()}
