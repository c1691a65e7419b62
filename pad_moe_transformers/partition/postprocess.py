"""After partition: write the masks, zero what is no longer used, record metadata; the MoE-P baseline.

Post-processing (paper Fig. 2): each expert's entries with ``M = 0`` and the static entries with
``M = 1`` are never used by eq. 4, so they are set to zero. They stay zero in training without any
hook: eq. 4 (`PADExpertLinear.effective_weight`) gives them exactly zero gradient, so Adam/AdamW
(fresh state, decoupled weight decay) leave them at zero. The mask is a persistent buffer, hence saved
with the model; the metadata goes to ``model.config.partition`` (saved in ``config.json``) and is
checked against the masks (`metadata.verify_partition_metadata`) before `apply_partition` returns.

With ``partition_granularity="neuron"`` the masks must be neuron-structured. The fc_in bias then
follows the neuron too: a static neuron reads the shared ``static_bias``, a dynamic neuron its
experts' ``expert_bias``. So the fc_in ``expert_bias`` entries of static neurons and the
``static_bias`` entries of dynamic neurons are unused as well, get exactly zero gradient, and are
zeroed. The metadata records the granularity and the dynamic neuron ratio per layer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from transformers.utils import logging

from ..core.pad_weight import compact_pad_storage, dense_pad_storage
from ..pad_linear import PADExpertLinear
from ._common import (
    broadcast_masks,
    check_model,
    check_not_sharded,
    is_main_process,
    partition_granularity,
    round_count,
    world_size,
)
from .batches import Batch, check_batches
from .metadata import check_partition_metadata, summarize_masks, verify_partition_metadata
from .options import as_bool
from .result import PartitionResult
from .scores import expert_weight_gradients
from .units import layer_linears, linears_by_name, neuron_masks_of

logger = logging.get_logger(__name__)


def apply_partition(
    model: nn.Module,
    masks: dict[str, Tensor],
    metadata: dict[str, Any] | None = None,
    *,
    compact_storage: bool = True,
) -> dict[str, float]:
    """Set the masks, zero the unused expert/static entries and store the metadata in `config.partition`.

    Args:
        masks: `{linear name: (out, in) bool}` for every PAD linear (``"layer.{i}.fc_in"``, as
            `PADLinearRef.short_name`), True = dynamic. For a neuron-granularity model they must be
            neuron-structured (`linear_masks_of_neurons` builds them from `{layer name: (I,)}`); the fc_in
            bias entries of the unused copy are zeroed too.
        metadata: JSON-serialisable facts about how the masks were made (method, seed, ...); the facts of the
            masks themselves (`metadata.summarize_masks`: granularity, achieved ratios per linear, and per
            layer in neurons) are added. `config.dynamic_ratio` is set to ``metadata["target_dynamic_ratio"]``
            if given.
        compact_storage: afterwards keep only what eq. 4 reads (`PADWeight.compact_storage_`: the partitioned
            layers get new, smaller parameters; build the optimizer after, or re-bind it as `IMPTrainerCallback`
            does). False keeps the dense parameters (same outputs and gradients, 1 + 1/K times the trainable
            entries of the plain MoE), e.g. under DDP, whose reducer holds the parameters it was built with.

    Returns:
        The achieved dynamic ratio per linear.

    Raises:
        ValueError: for masks of the wrong names, shapes or values, or metadata that contradicts them
            (e.g. a ``target_dynamic_ratio`` the masks do not have); the model is then left unchanged.
    """
    check_not_sharded(model)
    model = check_model(model)
    linears = linears_by_name(model)
    if set(masks) != set(linears):
        raise ValueError(
            f"Masks must be given for exactly the PAD linears {sorted(linears)}; missing "
            f"{sorted(set(linears) - set(masks))}, unknown {sorted(set(masks) - set(linears))}."
        )
    for name, linear in linears.items():
        if tuple(masks[name].shape) != tuple(linear.mask.shape):
            raise ValueError(
                f"Mask of {name} has shape {tuple(masks[name].shape)}, expected {tuple(linear.mask.shape)}."
            )
        if masks[name].dtype != torch.bool and bool(((masks[name] != 0) & (masks[name] != 1)).any()):
            raise ValueError(
                f"Mask of {name} has dtype {masks[name].dtype} with values other than 0 and 1; masks are binary "
                "(True = dynamic). Threshold scores with `select_masks` instead of passing them as masks."
            )
    granularity = partition_granularity(model)
    masks = {name: masks[name].to(device=linear.mask.device, dtype=torch.bool) for name, linear in linears.items()}
    meta = {**(metadata or {}), **summarize_masks(masks, granularity)}  # raises for unstructured neuron masks
    target = meta.get("target_dynamic_ratio")
    dynamic_ratio = float(target) if target is not None else getattr(model.config, "dynamic_ratio", None)
    check_partition_metadata(meta, masks, granularity=granularity, dynamic_ratio=dynamic_ratio)
    dense_pad_storage(model)  # the masks change: from dense storage (compact values belong to the old masks)
    with torch.no_grad():
        for name, linear in linears.items():
            linear.mask.copy_(masks[name])
            linear.expert_weight.masked_fill_(~masks[name], 0.0)  # (out, in) mask broadcast over the experts
            linear.static_weight.masked_fill_(masks[name], 0.0)
        if granularity == "neuron":
            neurons = neuron_masks_of(masks)
            for name, (fc_in, _) in layer_linears(model).items():
                if fc_in.expert_bias is not None:
                    fc_in.expert_bias.masked_fill_(~neurons[name], 0.0)  # (I,) broadcast over the experts
                if fc_in.static_bias is not None:
                    fc_in.static_bias.masked_fill_(neurons[name], 0.0)
    model.config.partition = meta
    if target is not None:
        model.config.dynamic_ratio = float(target)
    verify_partition_metadata(model)
    if as_bool("compact_storage", compact_storage):
        compact_pad_storage(model)
    return dict(meta["achieved_dynamic_ratio"])


def format_ratios(ratios: dict[str, float]) -> str:
    return "\n".join(f"  {name}: {ratio:.4f}" for name, ratio in ratios.items())


# ----------------------------------------------------------------------------------------- MoE-P
def moe_p_prune(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    dynamic_ratio: float,
    scope: str = "linear",
    seed: int = 0,
    progress: bool = True,
) -> PartitionResult:
    """MoE-P (paper Table 5): SNIP-prune the expert weights of the plain MoE to PAD's parameter count.

    The model stays fully dynamic (``M = 1``, the static weight is unused and zeroed). Each linear
    of ``n = out*in`` entries per expert keeps ``E*k + (n - k)`` of its ``E*n`` expert entries, with
    ``k = round(dynamic_ratio * n)`` -- exactly what the PAD linear holds at that ratio (``E*k``
    dynamic + ``n - k`` static) -- chosen by SNIP's saliency ``|W_i * dL/dW_i|`` (gradient summed
    over `batches`), per linear (`scope="linear"`) or with one threshold over all linears
    (`"global"`). Pruned entries are zeroed and kept at zero by a gradient hook (re-attach it after
    loading with `attach_moe_p_constraints`).
    """
    model = check_model(model)
    linears = linears_by_name(model)
    if not all(bool(lin.mask.all()) for lin in linears.values()):
        raise ValueError("MoE-P prunes a plain (fully dynamic) MoE, but some masks already have static entries.")
    batches = check_batches(batches)
    bar = logging.tqdm(
        total=len(batches), desc="MoE-P (SNIP)", unit="pass", disable=not (progress and is_main_process())
    )
    try:
        grads = expert_weight_gradients(model, batches, progress=bar)
    finally:
        bar.close()
    saliency = {n: (lin.expert_weight.detach().to(grads[n].dtype) * grads[n]).abs() for n, lin in linears.items()}
    keep_counts = {}
    for name, lin in linears.items():
        n, k = lin.mask.numel(), round_count(dynamic_ratio, lin.mask.numel())
        keep_counts[name] = lin.num_experts * k + (n - k)
    units = [[n] for n in linears] if scope == "linear" else [list(linears)]
    keeps: dict[str, Tensor] = {}
    for unit in units:
        flat = torch.cat([saliency[n].reshape(-1).double() for n in unit])
        if not bool(torch.isfinite(flat).all()):
            raise ValueError(
                f"The SNIP saliencies of {unit[0] if scope == 'linear' else 'all linears'} hold NaN/inf; a pruning "
                "chosen from them would be arbitrary. Check the batches and the model weights for NaN/inf."
            )
        if not bool((flat != 0).any()):
            raise ValueError(f"All SNIP saliencies of {unit[0] if scope == 'linear' else 'all linears'} are zero.")
        chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
        chosen[torch.sort(flat, descending=True, stable=True).indices[: sum(keep_counts[n] for n in unit)]] = True
        offset = 0
        for n in unit:
            size = saliency[n].numel()
            keeps[n] = chosen[offset : offset + size].view_as(saliency[n])
            offset += size
    broadcast_masks(keeps)
    with torch.no_grad():
        for name, lin in linears.items():
            lin.expert_weight.masked_fill_(~keeps[name], 0.0)
            lin.static_weight.zero_()
    _attach_hooks(linears, keeps)
    kept = {n: float(keeps[n].float().mean()) for n in linears}
    meta = {
        "method": "moe_p",
        "score": "snip",
        "scope": scope,
        "target_dynamic_ratio": dynamic_ratio,
        "rounds": 1,
        "num_batches": len(batches),
        "seed": seed,
        "world_size": world_size(),
        "kept_expert_ratio": kept,
        "kept_expert_entries": int(sum(int(k.sum()) for k in keeps.values())),
        "pad_equivalent_entries": int(sum(keep_counts.values())),
    }
    apply_partition(model, {n: lin.mask.clone() for n, lin in linears.items()}, meta)
    logger.info(f"MoE-P: kept fraction of the expert entries per linear:\n{format_ratios(kept)}")
    return PartitionResult(
        masks={n: lin.mask.clone() for n, lin in linears.items()},
        dynamic_ratios=kept,
        metadata=dict(model.config.partition),
        num_passes=len(batches),
    )


def _attach_hooks(linears: dict[str, PADExpertLinear], keeps: dict[str, Tensor]) -> None:
    for name, lin in linears.items():
        old = getattr(lin, "_moe_p_hook", None)
        if old is not None:
            old.remove()
        keep = keeps[name].to(lin.expert_weight.device)
        lin._moe_p_keep = keep
        lin._moe_p_hook = lin.expert_weight.register_hook(lambda grad, keep=keep: grad * keep.to(grad.dtype))


def attach_moe_p_constraints(model: nn.Module) -> int:
    """Re-attach the MoE-P gradient hooks after loading a MoE-P checkpoint (pruned = zero entries).

    Returns the number of linears constrained (0 if the model is not a MoE-P model).
    """
    model = check_model(model)
    if not model.config.is_partitioned or model.config.partition.get("method") != "moe_p":
        return 0
    linears = linears_by_name(model)
    _attach_hooks(linears, {n: lin.expert_weight.detach() != 0 for n, lin in linears.items()})
    return len(linears)
