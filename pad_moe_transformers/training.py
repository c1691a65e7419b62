"""Optimizer parameter groups for PAD-MoE fine-tuning with the HF Trainer.

The parameters PAD adds to a pretrained encoder are of two kinds that a single learning rate
serves badly:

- the **router** weights start random (std 0.02), not pretrained;
- the **scale factors** (`l_s`, `l_d`, eq. 4) are scalars whose useful range is O(1): with Adam a
  parameter moves at most about `lr` per step, so at a fine-tuning lr of 1e-4 a scale logit moves
  by < 0.1 in 1000 steps and `l_d = 2 sigmoid(phi)` stays within 1 +- 0.05.

`pad_optimizer_cls_and_kwargs` builds the Trainer's own optimizer (from `TrainingArguments.optim`)
with extra groups for these two kinds, so they can get their own learning rate, and exempts the
scale factors from weight decay (decay would pull a free `l_s`/`l_d` towards 0, not towards 1)::

    trainer = Trainer(
        model, args, ...,
        optimizer_cls_and_kwargs=pad_optimizer_cls_and_kwargs(model, args, scale_learning_rate=1e-2),
    )

The learning-rate scheduler (warm-up, decay) scales every group by the same factor.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from ._compat import decay_parameter_names
from .core import named_pad_linears
from .pad_linear import SCALE_FACTOR_NAMES
from .router import TopKRouter


def _scale_and_router_parameters(model: nn.Module) -> tuple[set[int], set[int]]:
    """Ids of the scale-factor parameters of every PAD linear, and of every router parameter."""
    scale_ids = {
        id(parameter)
        for ref in named_pad_linears(model)
        for parameter in (getattr(ref.module, name, None) for name in SCALE_FACTOR_NAMES)
        if isinstance(parameter, nn.Parameter)
    }
    router_ids = {id(p) for module in model.modules() if isinstance(module, TopKRouter) for p in module.parameters()}
    return scale_ids, router_ids


def pad_optimizer_grouped_parameters(
    model: nn.Module,
    weight_decay: float,
    router_learning_rate: float | None = None,
    scale_learning_rate: float | None = None,
) -> list[dict[str, Any]]:
    """Trainer's decay / no-decay groups, plus a router group and a scale-factor group.

    A group without `"lr"` uses the optimizer's default learning rate. The router group follows
    the Trainer's weight-decay rule; the scale-factor group has no weight decay. Empty groups are
    dropped (a model without scale factors, e.g. `scale_factor_mode="none"`).
    """
    if router_learning_rate is not None and router_learning_rate <= 0:
        raise ValueError(f"router_learning_rate must be > 0 (or None for the default lr), got {router_learning_rate}.")
    if scale_learning_rate is not None and scale_learning_rate <= 0:
        raise ValueError(f"scale_learning_rate must be > 0 (or None for the default lr), got {scale_learning_rate}.")
    decay_names = set(decay_parameter_names(model))
    scale_ids, router_ids = _scale_and_router_parameters(model)
    groups: dict[str, dict[str, Any]] = {
        "decay": {"params": [], "weight_decay": weight_decay},
        "no_decay": {"params": [], "weight_decay": 0.0},
        "router": {"params": [], "weight_decay": weight_decay},
        "scale_factors": {"params": [], "weight_decay": 0.0},
    }
    if router_learning_rate is not None:
        groups["router"]["lr"] = router_learning_rate
    if scale_learning_rate is not None:
        groups["scale_factors"]["lr"] = scale_learning_rate
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if id(parameter) in scale_ids:
            key = "scale_factors"
        elif id(parameter) in router_ids:
            key = "router"
        else:
            key = "decay" if name in decay_names else "no_decay"
        groups[key]["params"].append(parameter)
    return [{"name": key, **group} for key, group in groups.items() if group["params"]]


def pad_optimizer_cls_and_kwargs(
    model: nn.Module,
    args: TrainingArguments,
    router_learning_rate: float | None = None,
    scale_learning_rate: float | None = None,
) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """`optimizer_cls_and_kwargs` for `Trainer`: the optimizer `args.optim` names, with PAD's groups."""
    optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    params = pad_optimizer_grouped_parameters(model, args.weight_decay, router_learning_rate, scale_learning_rate)
    return optimizer_cls, {**optimizer_kwargs, "params": params}
