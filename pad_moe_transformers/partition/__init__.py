"""Mode partition of PAD-MoE models (paper sec. 4.2): scores, IMP / MP / Random / MoE-P, post-processing.

Usable without the Trainer::

    from pad_moe_transformers.partition import partition_model
    result = partition_model(model, batches, method="imp", dynamic_ratio=0.5, num_batches=10)
    result.dynamic_ratios  # {"layer.0.fc_in": 0.5, ...}; model.config.partition holds the metadata

With ``config.partition_granularity="neuron"`` whole FFN intermediate neurons are partitioned
(``result.neuron_masks``: ``{"layer.0": (I,) bool}``). Linears are named by
`PADLinearRef.short_name` (``"layer.{i}.fc_in"``) of `core.named_pad_linears`.

Module map: `options` (names, defaults, argument validation), `batches` (bounded reading, checks),
`units` (linears / neurons by name), `scores` (eqs. 7-8), `warmup` (the ways out of the upcycling tie),
`selection` (eq. 9, the IMP schedule), `algorithms` (`partition_model`), `postprocess` (`apply_partition`,
MoE-P), `metadata` (what `config.partition` records and `verify_partition_metadata`), `result`.
The package does not import the modeling module.

See ``docs/partition.md`` for the scores, the upcycling tie ("trap") and the measured comparison.
"""

from .algorithms import partition_model
from .evaluation import partition_loss
from .metadata import verify_partition_metadata
from .options import (
    DEFAULT_NUM_BATCHES,
    DEFAULT_ROUNDS,
    DEFAULT_SCORE,
    DEFAULT_WARMUP_LR,
    PARTITION_METHODS,
    SCOPES,
    SCORES,
)
from .postprocess import apply_partition, attach_moe_p_constraints, moe_p_prune
from .result import PartitionResult
from .scores import (
    connection_sensitivity,
    expert_weight_gradients,
    mask_direction,
    mask_gradients,
    neuron_mask_gradients,
    neuron_sums,
    normalize_scores,
    soft_masks,
)
from .selection import imp_schedule, select_masks
from .units import linear_masks_of_neurons, neuron_masks
from .warmup import expert_warmup, perturb_experts

__all__ = [
    "DEFAULT_NUM_BATCHES",
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
    "mask_direction",
    "mask_gradients",
    "moe_p_prune",
    "neuron_mask_gradients",
    "neuron_masks",
    "neuron_sums",
    "normalize_scores",
    "partition_loss",
    "partition_model",
    "perturb_experts",
    "select_masks",
    "soft_masks",
    "verify_partition_metadata",
]
