"""`PartitionResult`: what a partition did (returned by every partition method)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor


@dataclass
class PartitionResult:
    """What a partition did. `masks` are the final bool masks `(out, in)` (True = dynamic) by linear name
    (``"layer.{i}.fc_in"``, ``PADLinearRef.short_name``)."""

    masks: dict[str, Tensor]
    dynamic_ratios: dict[str, float]
    """Achieved dynamic ratio per linear (for MoE-P: kept fraction of the expert entries)."""
    metadata: dict[str, Any]
    """The dict stored in `model.config.partition`."""
    seconds: float = 0.0
    """Wall time of the partition (warm-up, scoring rounds, selection and post-processing)."""
    num_passes: int = 0
    """Forward-backward passes run: warm-up steps plus one per batch and round (0 for Random)."""
    forward_backward_passes: int = 0
    """The same number as `num_passes` (the older name, kept)."""
    round_dynamic_counts: list[int] = field(default_factory=list)
    """Dynamic units over all linears (elements) or all layers (neurons, granularity "neuron") after each round."""
    neuron_masks: dict[str, Tensor] | None = None
    """Granularity "neuron" only: the final `(I,)` bool neuron masks by layer name (``"layer.0"``, ...)."""
    neuron_dynamic_ratios: dict[str, float] | None = None
    """Granularity "neuron" only: achieved fraction of dynamic neurons per layer."""

    def __post_init__(self) -> None:
        # Either name may be given; both then hold the count.
        self.num_passes = self.forward_backward_passes = self.num_passes or self.forward_backward_passes
