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
layer, `scope="global"` uses one threshold over all layers, and the masks are written as whole fc_in
rows and fc_out columns, so they are exactly structured.

`partition_model` reads at most `num_batches` batches of its input (`itertools.islice`), so any
iterable works, an unbounded one included; it ends with `verify_partition_metadata`, so what
`config.partition` records is what the masks are.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from transformers.utils import logging

from ..core.pad_weight import compact_pad_storage, dense_pad_storage
from ._common import (
    agree_on_batch_count,
    broadcast_masks,
    check_model,
    check_not_sharded,
    is_main_process,
    partition_granularity,
    world_size,
)
from .batches import ZERO_BATCHES_MESSAGE, Batch, check_batches, read_batches, sized_length
from .options import (
    DEFAULT_NUM_BATCHES,
    DEFAULT_ROUNDS,
    DEFAULT_SCORE,
    DEFAULT_WARMUP_LR,
    as_bool,
    as_ratio,
    check_options,
)
from .postprocess import apply_partition, format_ratios, moe_p_prune
from .result import PartitionResult
from .scores import connection_sensitivity, mask_gradients, neuron_mask_gradients, neuron_sums, normalize_scores
from .selection import (
    check_not_tied,
    check_reachable,
    experts_equal_static,
    imp_schedule,
    layer_equals_static,
    select_masks,
)
from .units import current_masks, layer_linears, linear_masks_of_neurons, linears_by_name, neuron_masks, write_masks
from .warmup import expert_warmup

logger = logging.get_logger(__name__)


def partition_model(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    method: str = "imp",
    dynamic_ratio: float | None = None,
    num_batches: int = DEFAULT_NUM_BATCHES,
    rounds: int = DEFAULT_ROUNDS,
    scope: str = "linear",
    score: str = DEFAULT_SCORE,
    seed: int = 0,
    warmup_steps: int | None = None,
    warmup_lr: float = DEFAULT_WARMUP_LR,
    progress: bool = True,
    overwrite: bool = False,
    compact_storage: bool = True,
) -> PartitionResult:
    """Partition every PAD linear of `model` into dynamic and static elements, in place.

    With ``model.config.partition_granularity == "neuron"`` whole FFN intermediate neurons are
    partitioned instead (see the module docstring); `method="moe_p"` is element-only.

    Args:
        model: a PAD-MoE model; unpartitioned (fully dynamic, e.g. right after upcycling) unless `overwrite`.
        batches: labelled mini-batches (mappings of model inputs), any iterable: a list, a dataloader, an
            endless generator. The first `num_batches` are read (nothing beyond them), kept in memory and
            reused by every round; an iterable with fewer batches gives all it has, and
            ``config.partition["num_batches"]`` records how many were used.
        method: ``"imp"``, ``"mp"`` (one round), ``"random"`` or ``"moe_p"`` (SNIP-pruned plain MoE
            with the parameter count PAD has at `dynamic_ratio`; see `moe_p_prune`).
        dynamic_ratio: target ``kappa`` in (0, 1]; defaults to `model.config.dynamic_ratio`.
        num_batches: how many batches of `batches` to read (the paper uses 10).
        rounds: IMP rounds (ignored by the other methods).
        scope: ``"linear"`` (exact ratio per linear; per MoE layer for neurons) or ``"global"`` (one
            threshold over all linears / layers).
        score: ``"warmup_grad"`` (eq. 7 after a short expert warm-up that is undone), ``"grad"``
            (eq. 7 at the current weights) or ``"connection"`` (``sum_i |W_i dL/dW_i|``).
        seed: seed of the random mask (``"random"``); recorded for all methods.
        warmup_steps: Adam steps of the warm-up (``"warmup_grad"`` only); default one per batch.
        warmup_lr: learning rate of the warm-up.
        progress: show a tqdm bar (main process only).
        overwrite: allow re-partitioning a partitioned model. Its current masks are the start, and a
            partition only makes dynamic units static: a `dynamic_ratio` above the current one is refused.
        compact_storage: keep only what eq. 4 reads afterwards (default; see `apply_partition`): the partitioned
            layers get new parameters, so build the optimizer after the partition (`IMPTrainerCallback` re-binds
            the Trainer's). False keeps the dense parameters.

    Returns:
        A `PartitionResult`; the model's masks, zeroed weights and `config.partition` are updated.
        The model's parameters are otherwise unchanged and no `.grad` is left behind. NumPy scalars are
        accepted for every number and recorded as plain Python numbers.
    """
    check_not_sharded(model)
    model = check_model(model)
    options = check_options(
        method=method, dynamic_ratio=dynamic_ratio, num_batches=num_batches, rounds=rounds, scope=scope, score=score,
        seed=seed, warmup_steps=warmup_steps, warmup_lr=warmup_lr, progress=progress,
    )
    method, scope, score, progress = options["method"], options["scope"], options["score"], options["progress"]
    seed = 0 if options["seed"] is None else options["seed"]
    overwrite = as_bool("overwrite", overwrite)
    warmup_lr = options["warmup_lr"]
    granularity = partition_granularity(model)
    neuron = granularity == "neuron"
    if method == "moe_p" and neuron:
        raise ValueError(
            "method='moe_p' (SNIP pruning of single expert entries, paper Table 5) is defined for "
            f"partition_granularity='element' only; this model has partition_granularity={granularity!r}. "
            "Use method='imp', 'mp' or 'random' for neuron-structured PAD, or build the MoE-P baseline from an "
            "element-granularity model."
        )
    if model.config.is_partitioned:
        recorded = model.config.partition.get("method")
        if not overwrite:
            raise ValueError(
                f"The model is already partitioned ({recorded!r}); pass overwrite=True to partition it again from "
                "its current masks."
            )
        if recorded == "moe_p":
            raise ValueError(
                "The model is a MoE-P baseline (pruned expert entries, all masks dynamic); it cannot be "
                "re-partitioned. Start again from the upcycled model."
            )
    kappa = options["dynamic_ratio"]
    if kappa is None:
        kappa = as_ratio("config.dynamic_ratio", model.config.dynamic_ratio)
    if method != "moe_p":
        units = neuron_masks(model) if neuron else current_masks(model)
        check_reachable(units, kappa, scope, "neuron" if neuron else "element")
    given = sized_length(batches)
    if given is not None and given > options["num_batches"]:
        logger.warning(
            f"Mode partition uses the first {options['num_batches']} of the {given} batches given; pass "
            f"num_batches={given} to use all of them."
        )
    batches = read_batches(batches, options["num_batches"])
    # Every rank must take the same branch: a rank without batches raises on all ranks instead of
    # leaving the others waiting in a collective.
    count = agree_on_batch_count(len(batches), next(model.parameters()).device)
    if count == 0:
        message = f"{ZERO_BATCHES_MESSAGE} (A rank has no batches.)" if world_size() > 1 else ZERO_BATCHES_MESSAGE
        raise ValueError(message)
    if count < options["num_batches"]:
        logger.info(f"Mode partition: {count} batches available (num_batches={options['num_batches']}); using them.")
    batches = check_batches(batches[:count])
    start = time.perf_counter()
    if method == "moe_p":
        result = moe_p_prune(model, batches, dynamic_ratio=kappa, scope=scope, seed=seed, progress=progress)
        result.seconds = time.perf_counter() - start
        return result

    rounds = 1 if method in ("mp", "random") else options["rounds"]
    schedule = imp_schedule(kappa, rounds)
    warmup_steps = len(batches) if options["warmup_steps"] is None else options["warmup_steps"]
    use_warmup = method != "random" and score == "warmup_grad" and warmup_steps > 0
    linears, layers = linears_by_name(model), layer_linears(model)
    original = {n: m.clone() for n, m in current_masks(model).items()}
    was_compact = bool(dense_pad_storage(model))  # scoring reads and writes dense tensors (re-partition)
    # The partitioned units: elements of each linear `(out, in)`, or neurons of each MoE layer `(I,)`.
    masks = neuron_masks(model) if neuron else {n: m.clone() for n, m in original.items()}
    passes = (warmup_steps if use_warmup else 0) + (0 if method == "random" else rounds * len(batches))
    # One tick per forward-backward pass; tqdm shows passes done / planned, the elapsed seconds and s/pass.
    bar = logging.tqdm(
        total=passes, desc=f"Mode partition ({method})", unit="pass", disable=not (progress and is_main_process())
    )
    counts: list[int] = []
    try:
        warm = expert_warmup(model, batches, steps=warmup_steps, lr=warmup_lr, progress=bar) if use_warmup else None
        with warm if warm is not None else contextlib.nullcontext():
            for t, ratio in enumerate(schedule, start=1):
                bar.set_description(f"Mode partition ({method}, round {t}/{rounds}, keep {ratio:.3f})")
                if method == "random":
                    generator = torch.Generator().manual_seed(seed)
                    scores = {
                        n: torch.rand(m.shape, generator=generator, dtype=torch.float64) for n, m in masks.items()
                    }
                else:
                    raw = _raw_scores(model, batches, score, neuron, bar)
                    if neuron:
                        equals_static = lambda n, m=masks: layer_equals_static(*layers[n], m[n])
                    else:
                        equals_static = lambda n, m=masks: experts_equal_static(linears[n], m[n])
                    check_not_tied(raw, masks, scope, score, equals_static)
                    scores = normalize_scores(raw, masks, scope)
                masks = select_masks(scores, masks, ratio, scope)
                broadcast_masks(masks)
                # The next round scores with the current mask.
                write_masks(model, linear_masks_of_neurons(model, masks) if neuron else masks)
                counts.append(int(sum(int(m.sum()) for m in masks.values())))
        metadata = {
            "method": method,
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
        ratios = apply_partition(model, final, metadata, compact_storage=compact_storage)
    except BaseException:
        write_masks(model, original)
        if was_compact and as_bool("compact_storage", compact_storage):
            compact_pad_storage(model)
        raise
    finally:
        bar.close()

    meta = dict(model.config.partition)
    seconds = time.perf_counter() - start
    cost = f"{passes} forward-backward passes in {seconds:.1f} s"
    if neuron:
        logger.info(
            f"Mode partition ({method}, neurons, kappa={kappa}) done, {cost}; dynamic neuron ratio per layer:\n"
            f"{format_ratios(meta['neuron_dynamic_ratio'])}"
        )
    else:
        logger.info(
            f"Mode partition ({method}, kappa={kappa}) done, {cost}; dynamic ratio per linear:\n"
            f"{format_ratios(ratios)}"
        )
    return PartitionResult(
        masks={n: m.clone() for n, m in final.items()},
        dynamic_ratios=ratios,
        metadata=meta,
        seconds=seconds,
        num_passes=passes,
        round_dynamic_counts=counts,
        neuron_masks={n: m.clone() for n, m in masks.items()} if neuron else None,
        neuron_dynamic_ratios=dict(meta["neuron_dynamic_ratio"]) if neuron else None,
    )


def _raw_scores(model: nn.Module, batches: list[Batch], score: str, neuron: bool, progress: Any) -> dict[str, Tensor]:
    """The unnormalised scores of every unit: `{linear: (out, in)}`, or `{layer: (I,)}` for neurons."""
    if score == "connection":
        saliency = connection_sensitivity(model, batches, progress=progress)
        return neuron_sums(model, saliency) if neuron else saliency
    if neuron:
        return neuron_mask_gradients(model, batches, progress=progress)
    return mask_gradients(model, batches, progress=progress)
