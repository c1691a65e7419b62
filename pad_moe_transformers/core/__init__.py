"""The PAD core shared by every dynamic function (MoE experts now, dynamic convolution next).

See docs/architecture.md for the contract.
"""

from .inference import merged_pad_weights
from .pad_weight import (
    compact_pad_storage,
    dense_pad_storage,
    merge_pad_weights,
    pad_weights_merged,
    unmerge_pad_weights,
)
from .registry import PADLinearRef, named_pad_linears, named_pad_weights

__all__ = [
    "PADLinearRef",
    "compact_pad_storage",
    "dense_pad_storage",
    "merge_pad_weights",
    "merged_pad_weights",
    "named_pad_linears",
    "named_pad_weights",
    "pad_weights_merged",
    "unmerge_pad_weights",
]
