"""Shared helpers of the partition code: PAD linears by name, batches, the task loss, DDP collectives."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..modeling_pad_moe import PADMoEPreTrainedModel
from ..moe import PADMoEFeedForward
from ..pad_linear import PADExpertLinear

Batch = Mapping[str, Any]
"""One mini-batch as the model's forward takes it (`input_ids`, `attention_mask`, `labels`, ...)."""

_LABEL_KEYS = ("labels", "start_positions")

GRANULARITIES = ("element", "neuron")
"""What one mask decision covers: one weight element, or one FFN intermediate neuron (a row of fc_in and
the matching column of fc_out, plus its fc_in bias)."""


def partition_granularity(model: PADMoEPreTrainedModel) -> str:
    return getattr(model.config, "partition_granularity", "element")


def check_model(model: Any) -> PADMoEPreTrainedModel:
    """Return `model` (or the PAD model it wraps, e.g. under DDP) or raise a `TypeError` saying what to pass."""
    for candidate in (model, getattr(model, "module", None)):
        if isinstance(candidate, PADMoEPreTrainedModel):
            granularity = partition_granularity(candidate)
            if granularity not in GRANULARITIES:
                raise ValueError(
                    f"Mode partition supports partition_granularity in {list(GRANULARITIES)}; this model has "
                    f"partition_granularity={granularity!r}."
                )
            return candidate
    raise TypeError(
        f"Mode partition needs a PAD-MoE model (a PADMoEPreTrainedModel, e.g. built with "
        f"`AutoModelForSequenceClassification.from_pretrained(dense_path, config=PADMoEConfig.from_base(dense_path))`), "
        f"got {type(model).__name__}."
    )


def fsdp_classes() -> tuple[type, ...]:
    """The FSDP module classes of this torch build (FSDP1 wrapper, FSDP2 `fully_shard` modules)."""
    classes = []
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel

        classes.append(FullyShardedDataParallel)
    except ImportError:  # pragma: no cover - torch without distributed
        pass
    try:
        from torch.distributed.fsdp import FSDPModule

        classes.append(FSDPModule)
    except ImportError:  # pragma: no cover - torch < 2.6
        pass
    return tuple(classes)


def check_not_sharded(model: Any) -> None:
    """Raise a `ValueError` if `model` (or a submodule) is sharded with FSDP: the partition reads and writes
    whole expert weights, which FSDP only materialises inside its own forward."""
    classes = fsdp_classes()
    if classes and isinstance(model, torch.nn.Module) and any(isinstance(m, classes) for m in model.modules()):
        raise ValueError(
            "Mode partition needs the full (unsharded) weights, but this model is sharded with FSDP. Partition "
            "before wrapping: run partition_model on the plain model (or load a partitioned checkpoint), then "
            "wrap it and train; IMPTrainerCallback skips a model whose masks are already partitioned. "
            "See docs/distributed.md."
        )


def pad_linears(model: PADMoEPreTrainedModel) -> dict[str, PADExpertLinear]:
    """All partitioned linears of the model in order, named ``"layer.{i}.fc_in"`` / ``"layer.{i}.fc_out"``."""
    return {
        f"layer.{index}.{name}": linear
        for index, moe in model.named_pad_layers()
        for name, linear in moe.pad_linears().items()
    }


def pad_layers(model: PADMoEPreTrainedModel) -> dict[str, PADMoEFeedForward]:
    """All PAD-MoE layers of the model in order, named ``"layer.{i}"`` (the prefix of their linears' names)."""
    return {f"layer.{index}": moe for index, moe in model.named_pad_layers()}


def neuron_masks(model: PADMoEPreTrainedModel) -> dict[str, Tensor]:
    """The current `(I,)` bool neuron masks by layer name (True = dynamic); raises if a mask is not structured."""
    return {name: moe.neuron_mask().clone() for name, moe in pad_layers(model).items()}


def linear_masks_of_neurons(model: PADMoEPreTrainedModel, neurons: dict[str, Tensor]) -> dict[str, Tensor]:
    """Expand `{layer name: (I,) bool}` to the `(out, in)` masks of its linears (fc_in rows, fc_out columns)."""
    masks = {}
    for name, moe in pad_layers(model).items():
        n = neurons[name].to(device=moe.fc_in.mask.device, dtype=torch.bool)
        masks[f"{name}.fc_in"] = n.unsqueeze(1).expand_as(moe.fc_in.mask).clone()
        masks[f"{name}.fc_out"] = n.unsqueeze(0).expand_as(moe.fc_out.mask).clone()
    return masks


@contextlib.contextmanager
def element_path(model: PADMoEPreTrainedModel) -> Iterator[None]:
    """Run every MoE layer through the generic eq. 4 path while active (restored on exit).

    The neuron fast path reads the binary mask only, so the float relaxation of eq. 7
    (`PADExpertLinear.soft_mask`) would have no effect there. For neuron-structured binary masks both
    paths compute the same function; for element models this is a no-op.
    """
    layers = list(pad_layers(model).values())
    before = [moe.partition_granularity for moe in layers]
    try:
        for moe in layers:
            moe.partition_granularity = "element"
        yield
    finally:
        for moe, granularity in zip(layers, before):
            moe.partition_granularity = granularity


ZERO_BATCHES_MESSAGE = (
    "Mode partition got zero batches. Pass at least one labelled mini-batch of training data "
    "(the paper uses 10), e.g. the first batches of the training dataloader."
)


def batch_list(batches: Iterable[Batch]) -> list[Batch]:
    """`list(batches)`, refusing the two easy mistakes: `None` and one batch (a mapping) instead of a list of them."""
    if batches is None:
        raise ValueError(f"batches is None. {ZERO_BATCHES_MESSAGE}")
    if isinstance(batches, Mapping):
        raise ValueError(
            f"batches is a single batch (a {type(batches).__name__} with keys {sorted(batches)}); pass a list of "
            "batches, e.g. `[batch]`."
        )
    return list(batches)


def materialize_batches(batches: Iterable[Batch]) -> list[Batch]:
    """Turn `batches` into a list and check that it is usable for scoring (non-empty, labelled, not all padding)."""
    batches = batch_list(batches)
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
        attention_mask = batch.get("attention_mask")
        if isinstance(attention_mask, Tensor) and attention_mask.numel() and not bool(attention_mask.any()):
            raise ValueError(
                f"Partition batch {index} is all padding (its attention_mask is all 0): no token reaches the MoE "
                "layers, so it carries no score. Check the collator / tokenizer output, or drop empty examples."
            )
    return batches


def to_device(batch: Batch, device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.items()}


def task_loss(model: PADMoEPreTrainedModel, batch: Batch, *, index: int = 0) -> Tensor:
    """The task loss of one batch (the model loss without the router auxiliary terms), a 0-d tensor.

    The router losses do not belong to eq. 5 (the paper's L is the task loss), so their weighted
    values are subtracted again. Raises a `ValueError` for a non-finite loss.
    """
    device = next(model.parameters()).device
    out = model(**to_device(batch, device))
    if out.loss is None:
        raise ValueError(f"Partition batch {index}: the model returned no loss; pass batches with labels.")
    loss = out.loss - model.config.router_aux_loss_coef * out.aux_loss.to(out.loss.dtype)
    if model.config.router_z_loss_coef > 0:
        loss = loss - model.config.router_z_loss_coef * out.z_loss.to(out.loss.dtype)
    if not torch.isfinite(loss):
        raise ValueError(
            f"Non-finite task loss ({loss.item()}) on partition batch {index}: the scores would be NaN/inf. "
            f"{_non_finite_source(model, batch)}"
        )
    return loss


def _non_finite_source(model: PADMoEPreTrainedModel, batch: Batch) -> str:
    """Where a NaN/inf comes from: a batch entry, a model weight, or neither (an overflow in the forward)."""
    bad_inputs = [
        key for key, value in batch.items()
        if isinstance(value, Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all())
    ]
    if bad_inputs:
        return f"The batch holds NaN/inf in {bad_inputs}; clean the inputs/labels before partitioning."
    for name, param in model.named_parameters():
        if param.is_floating_point() and not bool(torch.isfinite(param).all()):
            return f"The model weight {name!r} holds NaN/inf; load or re-initialise the weights before partitioning."
    return (
        "The inputs and weights are finite, so the forward overflowed (e.g. fp16 weights or very large "
        "inputs); partition in fp32 or bf16."
    )


@contextlib.contextmanager
def scoring_mode(model: PADMoEPreTrainedModel) -> Iterator[None]:
    """Eval mode (no dropout, no router jitter: deterministic scores) with autograd on; restores the mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def requires_grad(tensors: Iterable[Tensor]) -> Iterator[None]:
    """Temporarily set `requires_grad=True` on `tensors` (for parameters a user froze)."""
    tensors = list(tensors)
    before = [t.requires_grad for t in tensors]
    try:
        for t in tensors:
            t.requires_grad_(True)
        yield
    finally:
        for t, flag in zip(tensors, before):
            t.requires_grad_(flag)


# ------------------------------------------------------------------------------------------- DDP
def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return world_size() == 1 or dist.get_rank() == 0


def all_reduce_sum(tensors: list[Tensor]) -> None:
    """Sum `tensors` over all ranks in place (one flat all-reduce); a no-op without a process group."""
    if world_size() == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def agree_on_batch_count(count: int, device: torch.device) -> int:
    """The smallest batch count over all ranks, so that every rank runs the same number of collectives."""
    if world_size() == 1:
        return count
    value = torch.tensor([count], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return int(value.item())


def broadcast_masks(masks: dict[str, Tensor]) -> None:
    """Make every rank hold rank 0's masks (bitwise), whatever rounding the reductions left."""
    if world_size() == 1:
        return
    for name in sorted(masks):
        as_uint8 = masks[name].to(torch.uint8)
        dist.broadcast(as_uint8, src=0)
        masks[name].copy_(as_uint8.bool())


def round_count(ratio: float, total: int) -> int:
    """`round(ratio * total)` with halves rounded up (not Python's banker's rounding)."""
    return int(math.floor(ratio * total + 0.5))
