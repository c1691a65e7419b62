"""`partition_loss`: the task loss of a model on a few batches, for comparing partitions."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..modeling_pad_moe import PADMoEPreTrainedModel
from ._common import Batch, check_model, materialize_batches, task_loss


def partition_loss(model: PADMoEPreTrainedModel, batches: Iterable[Batch]) -> float:
    """Mean task loss (router terms excluded) over `batches`, in eval mode and without autograd."""
    model = check_model(model)
    batches = materialize_batches(batches)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return sum(float(task_loss(model, b, index=i)) for i, b in enumerate(batches)) / len(batches)
    finally:
        model.train(was_training)
