"""What `config.partition` records about the masks, and the check that it is what the masks are.

`apply_partition` records `summarize_masks` of the masks it writes; `verify_partition_metadata` recomputes
it from the model's masks and raises a `ValueError` on any contradiction. It runs at the end of every
partition and when a checkpoint is loaded, so a model never carries metadata that its masks contradict.
This module imports only the PAD core (`core`, `pad_linear`, and `partition.units`, which imports only the
core), so the checkpoint loader can use it.

Tolerances: recorded ratios and counts are facts of the masks and must match to 1e-9 (they are exact
fractions, stored as JSON floats). ``target_dynamic_ratio`` is a request; a partition meets it to within
rounding, i.e. to within one unit of the smallest unit group (``1 / numel`` of the smallest linear, or
``1 / intermediate size`` of the smallest layer with neuron granularity), which is the stated tolerance.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..core import named_pad_linears
from .units import neuron_masks_of

RECORDED_TOLERANCE = 1e-9
"""Largest difference between a recorded ratio and the one computed from the masks."""

_FIX = (
    "The masks are what the model computes with, so the metadata is wrong (the masks were changed after the "
    "partition, or config.json belongs to other weights). Record the actual masks with "
    "`pad_moe_transformers.apply_partition(model, masks, metadata)`, or partition again with "
    "`partition_model(model, batches, overwrite=True)`."
)


def summarize_masks(masks: dict[str, Tensor], granularity: str) -> dict[str, Any]:
    """The facts `config.partition` records about `masks` (`{short_name: (out, in) bool}`).

    Returns ``granularity``, ``achieved_dynamic_ratio`` (per linear), ``achieved_dynamic_ratio_total``,
    and with ``granularity="neuron"`` ``neuron_dynamic_ratio``, ``dynamic_neurons``, ``intermediate_size``
    (per layer) and ``neuron_dynamic_ratio_total``. Raises if neuron masks are not neuron-structured.
    """
    counts = {name: int(mask.sum()) for name, mask in masks.items()}
    sizes = {name: mask.numel() for name, mask in masks.items()}
    summary: dict[str, Any] = {
        "granularity": granularity,
        "achieved_dynamic_ratio": {name: counts[name] / sizes[name] for name in masks},
        "achieved_dynamic_ratio_total": sum(counts.values()) / max(sum(sizes.values()), 1),
    }
    if granularity == "neuron":
        neurons = neuron_masks_of(masks)
        dynamic = {name: int(n.sum()) for name, n in neurons.items()}
        size = {name: int(n.numel()) for name, n in neurons.items()}
        summary["neuron_dynamic_ratio"] = {name: dynamic[name] / size[name] for name in neurons}
        summary["dynamic_neurons"] = dynamic
        summary["intermediate_size"] = size
        summary["neuron_dynamic_ratio_total"] = sum(dynamic.values()) / max(sum(size.values()), 1)
    return summary


def check_partition_metadata(
    partition: dict[str, Any] | None,
    masks: dict[str, Tensor],
    *,
    granularity: str = "element",
    dynamic_ratio: float | None = None,
) -> None:
    """Raise a `ValueError` if `partition` (a `config.partition`) contradicts `masks` (`{short_name: mask}`).

    Args:
        granularity: the model's `config.partition_granularity`.
        dynamic_ratio: the model's `config.dynamic_ratio`; it must equal a recorded ``target_dynamic_ratio``.
    """
    if partition is None:
        static = [name for name, mask in masks.items() if not bool(mask.all())]
        if static:
            total = summarize_masks(masks, "element")["achieved_dynamic_ratio_total"]
            raise ValueError(
                f"config.partition is None (the model is recorded as never partitioned), but the masks of "
                f"{_first(static)} have static entries (dynamic ratio {total:.4f} overall). Masks edited by hand "
                "must be recorded: `pad_moe_transformers.apply_partition(model, masks, {'method': 'manual'})`; or "
                "restore the partition metadata that belongs to these masks; or reset the masks to all True."
            )
        return
    if not isinstance(partition, dict):
        raise ValueError(
            f"config.partition must be None or a dict of partition metadata, got {type(partition).__name__}."
        )
    recorded_granularity = partition.get("granularity", "element")
    if recorded_granularity not in ("element", "neuron"):
        raise ValueError(
            f"config.partition['granularity'] must be 'element' or 'neuron', got {recorded_granularity!r}."
        )
    neuron = "neuron" in (recorded_granularity, granularity)
    try:
        actual = summarize_masks(masks, "neuron" if neuron else "element")
    except ValueError as error:
        source = "config.partition records granularity 'neuron'" if recorded_granularity == "neuron" else (
            "config.partition_granularity is 'neuron'"
        )
        raise ValueError(f"{source}, but the masks are not neuron-structured. {error}") from None
    mismatches = []
    for key in (
        "achieved_dynamic_ratio", "achieved_dynamic_ratio_total",
        "neuron_dynamic_ratio", "dynamic_neurons", "intermediate_size", "neuron_dynamic_ratio_total",
    ):
        if key in partition and key in actual:
            mismatches += _differences(key, partition[key], actual[key])
    if mismatches:
        raise ValueError(f"config.partition contradicts the masks: {'; '.join(mismatches[:5])}. {_FIX}")
    _check_target(partition, masks, actual, neuron, dynamic_ratio)


def _check_target(
    partition: dict[str, Any],
    masks: dict[str, Tensor],
    actual: dict[str, Any],
    neuron: bool,
    dynamic_ratio: float | None,
) -> None:
    target = partition.get("target_dynamic_ratio")
    if target is None:
        return
    if dynamic_ratio is not None and abs(float(dynamic_ratio) - float(target)) > RECORDED_TOLERANCE:
        raise ValueError(
            f"config.dynamic_ratio is {dynamic_ratio} but config.partition['target_dynamic_ratio'] is {target}: the "
            f"masks were made for {target}. Set config.dynamic_ratio = {target} (do not override dynamic_ratio when "
            "loading a partitioned model), or partition again with partition_model(..., overwrite=True)."
        )
    if partition.get("method") == "moe_p":
        # MoE-P keeps every mask True and prunes expert entries instead (checked by `verify_partition_metadata`).
        if not all(bool(mask.all()) for mask in masks.values()):
            raise ValueError(
                "config.partition records method 'moe_p' (a pruned, fully dynamic MoE), but some masks have static "
                f"entries. {_FIX}"
            )
        return
    if neuron:
        unit_sizes = list(actual["intermediate_size"].values())
        total, unit = actual["neuron_dynamic_ratio_total"], "neuron"
    else:
        unit_sizes = [mask.numel() for mask in masks.values()]
        total, unit = actual["achieved_dynamic_ratio_total"], "element"
    tolerance = 1.0 / min(unit_sizes, default=1) + RECORDED_TOLERANCE
    if abs(total - float(target)) > tolerance:
        raise ValueError(
            f"config.partition records target_dynamic_ratio={target}, but the masks are {total:.6f} dynamic "
            f"(per {unit}; a partition meets its target to within {tolerance:.2e}). {_FIX}"
        )


def verify_partition_metadata(model: nn.Module) -> None:
    """Raise a `ValueError` if `model.config.partition` contradicts the model's masks; return None if it does not.

    Checked: the recorded per-linear / total (and per-neuron) dynamic ratios against the masks; the recorded
    ``target_dynamic_ratio`` against the achieved ratio (within one unit of the smallest linear / layer) and
    against ``config.dynamic_ratio``; ``config.partition is None`` while some mask has static entries;
    granularity ``"neuron"`` (recorded or configured) while the masks are not neuron-structured; MoE-P
    metadata while masks are partial or more expert entries are non-zero than were kept.
    """
    config = model.config
    refs = named_pad_linears(model)
    masks = {ref.short_name: ref.module.mask for ref in refs}
    partition = getattr(config, "partition", None)
    check_partition_metadata(
        partition,
        masks,
        granularity=getattr(config, "partition_granularity", "element"),
        dynamic_ratio=getattr(config, "dynamic_ratio", None),
    )
    if isinstance(partition, dict) and partition.get("method") == "moe_p" and "kept_expert_entries" in partition:
        nonzero = sum(int((ref.module.dense_expert_weight() != 0).sum()) for ref in refs)
        if nonzero > int(partition["kept_expert_entries"]):
            raise ValueError(
                f"config.partition records a MoE-P model with {partition['kept_expert_entries']} kept expert entries, "
                f"but {nonzero} expert entries are non-zero: the pruned entries were trained (the pruning hooks are "
                "not saved with a model; call `attach_moe_p_constraints(model)` after loading and before training), "
                "or the weights belong to another model. Prune again with partition_model(..., method='moe_p')."
            )


def _differences(key: str, recorded: Any, actual: Any) -> list[str]:
    if isinstance(actual, dict):
        if not isinstance(recorded, dict) or set(recorded) != set(actual):
            keys = sorted(recorded) if isinstance(recorded, dict) else recorded
            return [f"{key} names {keys} in config.partition but the model's units are {sorted(actual)}"]
        out = []
        for name, value in actual.items():
            out += _differences(f"{key}[{name!r}]", recorded[name], value)
        return out
    try:
        close = abs(float(recorded) - float(actual)) <= RECORDED_TOLERANCE
    except (TypeError, ValueError):
        close = False
    return [] if close else [f"{key} is {recorded!r} in config.partition but {actual!r} in the masks"]


def _first(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


__all__ = ["RECORDED_TOLERANCE", "check_partition_metadata", "summarize_masks", "verify_partition_metadata"]
