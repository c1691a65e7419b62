"""`partition_loss`: the task loss of a model on a few batches, for comparing partitions."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ._common import check_model, task_loss
from .batches import Batch, check_batches


def partition_loss(model: nn.Module, batches: Iterable[Batch]) -> float:
    """Mean task loss (router terms excluded) over `batches`, in eval mode and without autograd."""
    model = check_model(model)
    batches = check_batches(batches)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return sum(float(task_loss(model, b, index=i)) for i, b in enumerate(batches)) / len(batches)
    finally:
        model.train(was_training)
