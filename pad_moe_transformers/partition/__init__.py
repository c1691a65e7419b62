"""Mode partition of PAD-MoE models (paper sec. 4.2): scores, IMP / MP / Random / MoE-P, post-processing.

Usable without the Trainer::

    from pad_moe_transformers.partition import partition_model
    result = partition_model(model, batches, method="imp", dynamic_ratio=0.5)  # batches: labelled dicts
    result.dynamic_ratios  # {"layer.0.fc_in": 0.5, ...}; model.config.partition holds the metadata

With ``config.partition_granularity="neuron"`` whole FFN intermediate neurons are partitioned
(``result.neuron_masks``: ``{"layer.0": (I,) bool}``).

See ``docs/partition.md`` for the scores, the upcycling tie ("trap") and the measured comparison.
"""

from ._common import linear_masks_of_neurons, neuron_masks, pad_layers, pad_linears
from .algorithms import (
    DEFAULT_ROUNDS,
    DEFAULT_SCORE,
    DEFAULT_WARMUP_LR,
    PARTITION_METHODS,
    SCOPES,
    SCORES,
    PartitionResult,
    imp_schedule,
    partition_model,
    select_masks,
)
from .postprocess import apply_partition, attach_moe_p_constraints, moe_p_prune
from .scores import (
    connection_sensitivity,
    expert_warmup,
    expert_weight_gradients,
    mask_gradients,
    neuron_mask_gradients,
    neuron_sums,
    normalize_scores,
    perturb_experts,
    soft_masks,
)
from .evaluation import partition_loss

__all__ = [
    "DEFAULT_ROUNDS",
    "DEFAULT_SCORE",
    "DEFAULT_WARMUP_LR",
    "PARTITION_METHODS",
    "SCOPES",
    "SCORES",
    "PartitionResult",
    "apply_partition",
    "attach_moe_p_constraints",
    "connection_sensitivity",
    "expert_warmup",
    "expert_weight_gradients",
    "imp_schedule",
    "linear_masks_of_neurons",
    "mask_gradients",
    "moe_p_prune",
    "neuron_mask_gradients",
    "neuron_masks",
    "neuron_sums",
    "normalize_scores",
    "pad_layers",
    "pad_linears",
    "partition_loss",
    "partition_model",
    "perturb_experts",
    "select_masks",
    "soft_masks",
]
