"""Mode partition algorithms: IMP (iterative, paper sec. 4.2), MP (one-shot), Random, and MoE-P (Table 5).

    result = partition_model(model, batches, method="imp", dynamic_ratio=0.5)   # sets masks + metadata

IMP runs ``rounds`` rounds; round ``t`` (1-based) keeps ``kappa ** (t / rounds)`` of the elements
dynamic (exponential schedule, eq. 9 thresholding), re-scoring with the current mask each round.
Only dynamic elements can become static. MP is IMP with one round; Random draws a seeded random
mask at the same ratio. `scope="linear"` keeps exactly ``round(kappa * n)`` elements of each linear,
`scope="global"` uses one threshold over all linears.

With ``config.partition_granularity="neuron"`` the unit is an FFN intermediate neuron instead of an
element: the neuron score is eq. 7 for one mask variable per neuron (the signed element derivatives
summed over fc_in row ``j`` and fc_out column ``j``, plus the fc_in bias term; see
`neuron_mask_gradients`), `scope="linear"` keeps exactly ``round(kappa * I)`` neurons of each MoE
layer, `scope="global"` uses one threshold over all layers, and the masks are set with
`PADMoEFeedForward.set_neuron_mask`, so they are exactly structured.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from transformers.utils import logging

from ..modeling_pad_moe import PADMoEPreTrainedModel
from ..pad_linear import PADExpertLinear
from ..moe import PADMoEFeedForward
from ._common import (
    ZERO_BATCHES_MESSAGE,
    Batch,
    agree_on_batch_count,
    batch_list,
    broadcast_masks,
    check_model,
    check_not_sharded,
    is_main_process,
    linear_masks_of_neurons,
    materialize_batches,
    neuron_masks,
    pad_layers,
    pad_linears,
    partition_granularity,
    round_count,
    world_size,
)
from .postprocess import apply_partition, format_ratios, moe_p_prune
from .scores import (
    connection_sensitivity,
    expert_warmup,
    mask_gradients,
    neuron_mask_gradients,
    neuron_sums,
    normalize_scores,
)

logger = logging.get_logger(__name__)

PARTITION_METHODS = ("imp", "mp", "random", "moe_p")
SCORES = ("warmup_grad", "grad", "connection")
SCOPES = ("linear", "global")
DEFAULT_SCORE = "warmup_grad"
"""Chosen on real RTE batches, see docs/partition.md."""
DEFAULT_ROUNDS = 5
DEFAULT_WARMUP_LR = 1e-4


@dataclass
class PartitionResult:
    """What a partition did. `masks` are the final bool masks `(out, in)` (True = dynamic) by linear name."""

    masks: dict[str, Tensor]
    dynamic_ratios: dict[str, float]
    """Achieved dynamic ratio per linear (for MoE-P: kept fraction of the expert entries)."""
    metadata: dict[str, Any]
    """The dict stored in `model.config.partition`."""
    seconds: float = 0.0
    forward_backward_passes: int = 0
    round_dynamic_counts: list[int] = field(default_factory=list)
    """Dynamic units over all linears (elements) or all layers (neurons, granularity "neuron") after each round."""
    neuron_masks: dict[str, Tensor] | None = None
    """Granularity "neuron" only: the final `(I,)` bool neuron masks by layer name (``"layer.0"``, ...)."""
    neuron_dynamic_ratios: dict[str, float] | None = None
    """Granularity "neuron" only: achieved fraction of dynamic neurons per layer."""


def imp_schedule(dynamic_ratio: float, rounds: int) -> list[float]:
    """Target dynamic ratio after each round: ``kappa ** (t / rounds)`` for ``t = 1..rounds``."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}.")
    return [dynamic_ratio ** (t / rounds) for t in range(1, rounds + 1)]


def select_masks(
    scores: dict[str, Tensor], masks: dict[str, Tensor], ratio: float, scope: str = "linear"
) -> dict[str, Tensor]:
    """Eq. 9: keep the highest-scoring elements dynamic so that `ratio` of all elements stay dynamic.

    Only currently dynamic elements (``masks`` True) are candidates, so static elements stay static.
    Ties are broken by position (stable sort), so the result is deterministic. The units may have any
    shape: `(out, in)` elements of a linear, or `(I,)` neurons of a MoE layer.

    Args:
        scores: `{name: (out, in)}` (or `(I,)`) scores; higher = more important to keep dynamic.
        masks: `{name: same shape}` bool current masks.
        ratio: fraction of each unit group (`scope="linear"`) or of all units (`"global"`) kept dynamic.

    Returns:
        New `{name: same shape}` bool masks, a subset of `masks`.
    """
    _check_scope(scope)
    names = list(scores)
    if scope == "linear":
        groups = [[n] for n in names]
    else:
        groups = [names]
    for name in names:
        candidates = scores[name].detach()[masks[name].to(scores[name].device)]
        if not bool(torch.isfinite(candidates).all()):
            bad = int((~torch.isfinite(candidates)).sum())
            raise ValueError(
                f"The scores of {name} hold {bad} NaN/inf value(s) among its {candidates.numel()} candidates; a mask "
                "chosen from them would be arbitrary. Check the partition batches and the model weights for NaN/inf "
                "(or an fp16 overflow) and partition again."
            )
    new_masks = {}
    for group in groups:
        flat = torch.cat([_candidates(scores[n], masks[n]) for n in group])
        total = sum(masks[n].numel() for n in group)
        available = int(sum(int(masks[n].sum()) for n in group))
        keep = min(round_count(ratio, total), available)
        order = torch.sort(flat, descending=True, stable=True).indices[:keep]
        chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
        chosen[order] = True
        offset = 0
        for n in group:
            size = masks[n].numel()
            new_masks[n] = chosen[offset : offset + size].view_as(masks[n]).to(masks[n].device)
            offset += size
    return new_masks


def _candidates(score: Tensor, mask: Tensor) -> Tensor:
    flat = score.detach().reshape(-1).to(torch.float64)
    return torch.where(mask.reshape(-1).to(flat.device), flat, float("-inf"))


def _check_scope(scope: str) -> None:
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {list(SCOPES)}, got {scope!r}.")


def _experts_equal_static(linear: PADExpertLinear, mask: Tensor) -> bool:
    """True when ``l_d*W_i == l_s*W_static`` on every dynamic entry of every expert (eq. 7 is then 0)."""
    with torch.no_grad():
        l_s, l_d = linear.scale_factors()
        differs = (l_d * linear.expert_weight != l_s * linear.static_weight).any(dim=0)
        return not bool((differs & mask).any())


def _layer_equals_static(moe: PADMoEFeedForward, neurons: Tensor) -> bool:
    """Neuron granularity: True when every dynamic neuron's fc_in row, fc_out column and fc_in bias equal the
    (scaled) static copies in every expert, so the neuron derivative is exactly zero."""
    in_mask = neurons.unsqueeze(1).expand_as(moe.fc_in.mask)
    out_mask = neurons.unsqueeze(0).expand_as(moe.fc_out.mask)
    if not (_experts_equal_static(moe.fc_in, in_mask) and _experts_equal_static(moe.fc_out, out_mask)):
        return False
    fc_in = moe.fc_in
    if fc_in.expert_bias is None or fc_in.static_bias is None:
        return True
    with torch.no_grad():
        return not bool(((fc_in.expert_bias != fc_in.static_bias).any(dim=0) & neurons).any())


def _check_not_tied(
    raw: dict[str, Tensor], masks: dict[str, Tensor], scope: str, score: str, equals_static: Callable[[str], bool]
) -> None:
    """Refuse scores that carry no information over a scope unit: the partition would be arbitrary.

    For the eq. 7 scores the test is structural (`equals_static(name)` for each linear, or each layer
    with neuron granularity): if every expert equals the (scaled) static weight on every dynamic entry,
    the true derivative is exactly zero and what autograd returns is rounding noise (~1e-12: the two
    paths through ``M`` and ``1 - M`` cancel only up to float rounding).
    """
    units = [[n] for n in raw] if scope == "linear" else [list(raw)]
    for unit in units:
        if score == "connection":
            tied = all(not bool((raw[n][masks[n]] != 0).any()) for n in unit)
        else:
            tied = all(equals_static(n) for n in unit)
        if tied:
            where = unit[0] if scope == "linear" else ("all linears" if ".fc_" in unit[0] else "all MoE layers")
            hint = (
                "The experts equal the static weight (upcycled copies with l_s = l_d), so "
                "dW_eff/dM = l_d*W_i - l_s*W_static = 0 and eq. 7 is exactly zero: every score ties. Use "
                "score='warmup_grad' (the default: a short warm-up of the experts before scoring, with "
                "warmup_steps > 0 and warmup_lr > 0), score='connection', or perturb_experts() after upcycling."
                if score != "connection"
                else "Check that the batches reach the loss (labels present) and that the weights are not zero."
            )
            raise ValueError(f"The {score!r} scores of {where} carry no information. {hint}")


def partition_model(
    model: PADMoEPreTrainedModel,
    batches: Iterable[Batch],
    *,
    method: str = "imp",
    dynamic_ratio: float | None = None,
    rounds: int = DEFAULT_ROUNDS,
    scope: str = "linear",
    score: str = DEFAULT_SCORE,
    seed: int = 0,
    warmup_steps: int | None = None,
    warmup_lr: float = DEFAULT_WARMUP_LR,
    progress: bool = True,
    overwrite: bool = False,
) -> PartitionResult:
    """Partition every PAD linear of `model` into dynamic and static elements, in place.

    With ``model.config.partition_granularity == "neuron"`` whole FFN intermediate neurons are
    partitioned instead (see the module docstring); `method="moe_p"` is element-only.

    Args:
        model: an unpartitioned PAD-MoE model (fully dynamic, e.g. right after upcycling).
        batches: labelled mini-batches (mappings of model inputs), e.g. the first 10 training batches.
            They are kept in memory and reused by every round.
        method: ``"imp"``, ``"mp"`` (one round), ``"random"`` or ``"moe_p"`` (SNIP-pruned plain MoE
            with the parameter count PAD has at `dynamic_ratio`; see `moe_p_prune`).
        dynamic_ratio: target ``kappa``; defaults to `model.config.dynamic_ratio`.
        rounds: IMP rounds (ignored by the other methods).
        scope: ``"linear"`` (exact ratio per linear; per MoE layer for neurons) or ``"global"`` (one
            threshold over all linears / layers).
        score: ``"warmup_grad"`` (eq. 7 after a short expert warm-up that is undone), ``"grad"``
            (eq. 7 at the current weights) or ``"connection"`` (``sum_i |W_i dL/dW_i|``).
        seed: seed of the random mask (``"random"``); recorded for all methods.
        warmup_steps: Adam steps of the warm-up (``"warmup_grad"`` only); default one per batch.
        warmup_lr: learning rate of the warm-up.
        progress: show a tqdm bar (main process only).
        overwrite: allow re-partitioning a partitioned model (its current masks are kept as the start).

    Returns:
        A `PartitionResult`; the model's masks, zeroed weights and `config.partition` are updated.
        The model's parameters are otherwise unchanged and no `.grad` is left behind.
    """
    check_not_sharded(model)
    model = check_model(model)
    if method not in PARTITION_METHODS:
        raise ValueError(f"method must be one of {list(PARTITION_METHODS)}, got {method!r}.")
    if score not in SCORES:
        raise ValueError(f"score must be one of {list(SCORES)}, got {score!r}.")
    _check_scope(scope)
    granularity = partition_granularity(model)
    if method == "moe_p" and granularity != "element":
        raise ValueError(
            "method='moe_p' (SNIP pruning of single expert entries, paper Table 5) is defined for "
            f"partition_granularity='element' only; this model has partition_granularity={granularity!r}. "
            "Use method='imp', 'mp' or 'random' for neuron-structured PAD, or build the MoE-P baseline from an "
            "element-granularity model."
        )
    if model.config.is_partitioned and not overwrite:
        raise ValueError(
            f"The model is already partitioned ({model.config.partition.get('method')!r}); pass overwrite=True "
            "to partition it again from its current masks."
        )
    kappa = float(model.config.dynamic_ratio if dynamic_ratio is None else dynamic_ratio)
    if not 0.0 < kappa <= 1.0:
        raise ValueError(f"dynamic_ratio must be in (0, 1], got {kappa}.")
    if score == "warmup_grad" and method in ("imp", "mp"):
        if warmup_steps is not None and warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0 (None: one step per batch), got {warmup_steps}.")
        if not warmup_lr > 0:
            raise ValueError(f"warmup_lr must be > 0 for score='warmup_grad', got {warmup_lr}.")
    batches = batch_list(batches)
    # Every rank must take the same branch: a rank without batches raises on all ranks instead of
    # leaving the others waiting in a collective.
    count = agree_on_batch_count(len(batches), next(model.parameters()).device)
    if count == 0:
        raise ValueError(ZERO_BATCHES_MESSAGE if world_size() == 1 else f"{ZERO_BATCHES_MESSAGE} (A rank has no batches.)")
    batches = materialize_batches(batches[:count])
    start = time.perf_counter()
    if method == "moe_p":
        result = moe_p_prune(model, batches, dynamic_ratio=kappa, scope=scope, seed=seed, progress=progress)
        result.seconds = time.perf_counter() - start
        return result

    rounds = 1 if method in ("mp", "random") else rounds
    schedule = imp_schedule(kappa, rounds)
    if warmup_steps is None:
        warmup_steps = len(batches)
    use_warmup = method != "random" and score == "warmup_grad" and warmup_steps > 0
    neuron = granularity == "neuron"
    linears = pad_linears(model)
    layers = pad_layers(model)
    original = {n: lin.mask.clone() for n, lin in linears.items()}
    # The partitioned units: elements of each linear `(out, in)`, or neurons of each MoE layer `(I,)`.
    masks = neuron_masks(model) if neuron else {n: m.clone() for n, m in original.items()}
    passes = (warmup_steps if use_warmup else 0) + (0 if method == "random" else rounds * len(batches))
    bar = logging.tqdm(
        total=passes, desc=f"Mode partition ({method})", unit="batch", disable=not (progress and is_main_process())
    )
    counts: list[int] = []
    try:
        warm = expert_warmup if use_warmup else None
        ctx = warm(model, batches, steps=warmup_steps, lr=warmup_lr, progress=bar) if warm else contextlib.nullcontext()
        with ctx:
            for t, ratio in enumerate(schedule, start=1):
                bar.set_description(f"Mode partition ({method}, round {t}/{rounds}, keep {ratio:.3f})")
                if method == "random":
                    generator = torch.Generator().manual_seed(seed)
                    scores = {n: torch.rand(m.shape, generator=generator, dtype=torch.float64) for n, m in masks.items()}
                else:
                    raw = _raw_scores(model, batches, score, neuron, bar)
                    if neuron:
                        equals_static = lambda n: _layer_equals_static(layers[n], masks[n])  # noqa: E731
                    else:
                        equals_static = lambda n: _experts_equal_static(linears[n], masks[n])  # noqa: E731
                    _check_not_tied(raw, masks, scope, score, equals_static)
                    scores = normalize_scores(raw, masks, scope)
                masks = select_masks(scores, masks, ratio, scope)
                broadcast_masks(masks)
                # The next round scores with the current mask.
                if neuron:
                    for n, moe in layers.items():
                        moe.set_neuron_mask(masks[n])
                else:
                    for n, lin in linears.items():
                        lin.mask.copy_(masks[n])
                counts.append(int(sum(int(m.sum()) for m in masks.values())))
    except BaseException:
        for n, lin in linears.items():
            lin.mask.copy_(original[n])
        raise
    finally:
        bar.close()

    metadata = {
        "method": method,
        "granularity": granularity,
        "score": None if method == "random" else score,
        "scope": scope,
        "target_dynamic_ratio": kappa,
        "rounds": rounds,
        "round_ratios": schedule,
        "num_batches": len(batches),
        "seed": seed,
        "warmup_steps": warmup_steps if use_warmup else 0,
        "warmup_lr": warmup_lr if use_warmup else None,
        "world_size": world_size(),
    }
    final = linear_masks_of_neurons(model, masks) if neuron else masks
    ratios = apply_partition(model, final, metadata)
    meta = dict(model.config.partition)
    if neuron:
        logger.info(
            f"Mode partition ({method}, neurons, kappa={kappa}) done; dynamic neuron ratio per layer:\n"
            f"{format_ratios(meta['neuron_dynamic_ratio'])}"
        )
    else:
        logger.info(f"Mode partition ({method}, kappa={kappa}) done; dynamic ratio per linear:\n{format_ratios(ratios)}")
    return PartitionResult(
        masks={n: m.clone() for n, m in final.items()},
        dynamic_ratios=ratios,
        metadata=meta,
        seconds=time.perf_counter() - start,
        forward_backward_passes=passes,
        round_dynamic_counts=counts,
        neuron_masks={n: m.clone() for n, m in masks.items()} if neuron else None,
        neuron_dynamic_ratios=dict(meta["neuron_dynamic_ratio"]) if neuron else None,
    )


def _raw_scores(
    model: PADMoEPreTrainedModel, batches: list[Batch], score: str, neuron: bool, progress: Any
) -> dict[str, Tensor]:
    """The unnormalised scores of every unit: `{linear: (out, in)}`, or `{layer: (I,)}` for neurons."""
    if score == "connection":
        saliency = connection_sensitivity(model, batches, progress=progress)
        return neuron_sums(model, saliency) if neuron else saliency
    if neuron:
        return neuron_mask_gradients(model, batches, progress=progress)
    return mask_gradients(model, batches, progress=progress)
