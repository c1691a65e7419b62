"""Keeping an optimizer built before a partition bound to the model's parameters.

A partition gives the partitioned PAD layers compact storage: new, smaller parameters (`expert_values`,
`static_values`) replace `expert_weight` / `static_weight` (`PADWeight.compact_storage_`). An optimizer built
before (the Trainer builds its optimizer before `on_train_begin`, where `IMPTrainerCallback` partitions) still
holds the old tensors: it would step tensors the model no longer reads and never the ones it does, silently.
`storage_replacements` records which parameter replaces which, and `rebind_optimizer` puts the new ones in the
old ones' places (same parameter group: same learning rate and weight decay).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .core.pad_weight import COMPACT_STORAGE, PADWeight

_DENSE_TO_COMPACT = {"expert_weight": "expert_values", "static_weight": "static_values"}


def dense_parameters(model: nn.Module) -> dict[PADWeight, dict[str, nn.Parameter]]:
    """The dense-storage parameters of every PAD weight of `model`, by layer (taken before a partition)."""
    return {
        module: {name: module._parameters[name] for name in _DENSE_TO_COMPACT}
        for module in model.modules()
        if isinstance(module, PADWeight) and module.storage != COMPACT_STORAGE
    }


def storage_replacements(before: dict[PADWeight, dict[str, nn.Parameter]]) -> dict[int, nn.Parameter]:
    """`{id(old parameter): new parameter}` for the layers of `before` (`dense_parameters`) now in compact storage."""
    replaced: dict[int, nn.Parameter] = {}
    for module, parameters in before.items():
        if module.storage == COMPACT_STORAGE:
            for dense, compact in _DENSE_TO_COMPACT.items():
                replaced[id(parameters[dense])] = module._parameters[compact]
    return replaced


def rebind_optimizer(optimizer: Any, replaced: dict[int, nn.Parameter]) -> int:
    """Put each replacement parameter where its old parameter is in `optimizer`'s parameter groups (a torch optimizer,
    or a wrapper exposing its `param_groups`, as Accelerate's). Returns how many were re-bound.

    Raises:
        RuntimeError: if the optimizer already has state (moments) for a replaced parameter: those belong to the dense
            tensor and have no meaning for the compact one. Partition before the first optimizer step.
    """
    if not replaced:
        return 0
    state = getattr(optimizer, "state", {})
    stepped = [p for group in optimizer.param_groups for p in group["params"] if id(p) in replaced and p in state]
    if stepped:
        raise RuntimeError(
            f"The optimizer already holds state for {len(stepped)} PAD parameters that the partition replaced by their "
            "compact storage. Partition before the first optimizer step (IMPTrainerCallback does, in "
            "on_train_begin), or keep the parameters this optimizer holds: "
            "`partition_model(..., compact_storage=False)` (dense storage)."
        )
    count = 0
    for group in optimizer.param_groups:
        params = list(group["params"])
        for index, parameter in enumerate(params):
            if id(parameter) in replaced:
                params[index] = replaced[id(parameter)]
                count += 1
        group["params"] = params
    return count


def check_optimizer_bound(model: nn.Module, optimizer: Any) -> None:
    """Raise a `RuntimeError` if `optimizer` holds a parameter that `model` no longer has (e.g. a PAD weight's dense
    tensor after its layer took compact storage), or state whose shape is not its parameter's."""
    own = {id(p) for p in model.parameters()}
    stale = [p for group in optimizer.param_groups for p in group["params"] if id(p) not in own]
    if stale:
        shapes = sorted({tuple(p.shape) for p in stale})[:3]
        raise RuntimeError(
            f"The optimizer holds {len(stale)} parameters the model no longer has (shapes {shapes}...): a PAD layer "
            "took compact storage after the optimizer was built. Build the optimizer after partitioning, or re-bind "
            "it with `pad_moe_transformers.optimizer.rebind_optimizer`."
        )
    state = getattr(optimizer, "state", {})
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            moments = state.get(parameter, {}) if hasattr(state, "get") else {}
            for name, value in moments.items():
                if hasattr(value, "shape") and value.dim() > 0 and value.shape != parameter.shape:
                    raise RuntimeError(
                        f"The optimizer state {name!r} of a parameter of shape {tuple(parameter.shape)} has shape "
                        f"{tuple(value.shape)}: it was saved for another storage of the model (a resumed checkpoint "
                        "of a compact model loaded into dense storage, or the reverse). Load the checkpoint's weights "
                        "before building the optimizer (Trainer's `resume_from_checkpoint` does)."
                    )
