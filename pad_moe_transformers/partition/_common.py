"""Shared helpers of the partition code: the model check, the task loss, scoring mode, DDP collectives.

The partition code knows a PAD model by its config (`PADMoEConfig`, or any config class marked
`is_pad_config = True`, e.g. `PADDyConvConfig`) and its PAD weights (`core.named_pad_linears`: PAD linears or
PAD convolutions); it does not import the modeling modules, so the checkpoint loader can use
`partition.metadata` without an import cycle.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..configuration_pad_moe import PADMoEConfig
from ..core import named_pad_linears
from .batches import Batch, to_device
from .options import GRANULARITIES


def partition_granularity(model: nn.Module) -> str:
    return getattr(model.config, "partition_granularity", "element")


def is_pad_config(config: Any) -> bool:
    """Whether `config` is the config of a PAD model of this package (`PADMoEConfig`, or a class that declares
    `is_pad_config = True`, as `PADDyConvConfig` does)."""
    return isinstance(config, PADMoEConfig) or bool(getattr(type(config), "is_pad_config", False))


def check_model(model: Any) -> nn.Module:
    """Return `model` (or the PAD model it wraps, e.g. under DDP) or raise a `TypeError` saying what to pass."""
    for candidate in (model, getattr(model, "module", None)):
        if is_pad_config(getattr(candidate, "config", None)) and named_pad_linears(candidate):
            granularity = partition_granularity(candidate)
            if granularity not in GRANULARITIES:
                raise ValueError(
                    f"Mode partition supports partition_granularity in {list(GRANULARITIES)}; this model has "
                    f"partition_granularity={granularity!r}."
                )
            return candidate
    raise TypeError(
        "Mode partition needs a PAD model: a PAD-MoE model (a PADMoEPreTrainedModel, e.g. built with "
        "`AutoModelForSequenceClassification.from_pretrained(dense_path, "
        "config=PADMoEConfig.from_base(dense_path))`) or a PAD dynamic-convolution model (a "
        f"PADDyConvPreTrainedModel), got {type(model).__name__}."
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


@contextlib.contextmanager
def element_path(model: nn.Module) -> Iterator[None]:
    """Run every MoE layer through the generic eq. 4 path while active (restored on exit).

    The neuron fast path reads the binary mask only, so the float relaxation of eq. 7
    (`PADExpertLinear.soft_mask`) would have no effect there. For neuron-structured binary masks both
    paths compute the same function; for element models and models without MoE layers (a PAD vision
    model) this is a no-op.
    """
    named_layers = getattr(model, "named_pad_layers", None)
    layers = [moe for _, moe in named_layers()] if callable(named_layers) else []
    before = [moe.partition_granularity for moe in layers]
    try:
        for moe in layers:
            moe.partition_granularity = "element"
        yield
    finally:
        for moe, granularity in zip(layers, before):
            moe.partition_granularity = granularity


def task_loss(model: nn.Module, batch: Batch, *, index: int = 0) -> Tensor:
    """The task loss of one batch (the model loss without the router auxiliary terms), a 0-d tensor.

    The router losses do not belong to eq. 5 (the paper's L is the task loss), so their weighted
    values are subtracted again (a PAD-MoE output carries them whenever it has a loss, i.e. with labels;
    a PAD vision model returns the task loss alone). Raises a `ValueError` for a non-finite loss.
    """
    device = next(model.parameters()).device
    out = model(**{"return_dict": True, **to_device(batch, device)})
    if out.loss is None:
        raise ValueError(f"Partition batch {index}: the model returned no loss; pass batches with labels.")
    loss = out.loss
    aux_loss, z_loss = out.get("aux_loss"), out.get("z_loss")
    if aux_loss is not None:
        loss = loss - model.config.router_aux_loss_coef * aux_loss.to(loss.dtype)
    if z_loss is not None and model.config.router_z_loss_coef > 0:
        loss = loss - model.config.router_z_loss_coef * z_loss.to(loss.dtype)
    if not torch.isfinite(loss):
        raise ValueError(
            f"Non-finite task loss ({loss.item()}) on partition batch {index}: the scores would be NaN/inf. "
            f"{_non_finite_source(model, batch)}"
        )
    return loss


def _non_finite_source(model: nn.Module, batch: Batch) -> str:
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
def scoring_mode(model: nn.Module) -> Iterator[None]:
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
