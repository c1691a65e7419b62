"""Router decisions travel from the MoE layers to the model through a context-local record, not module state.

The family's own layer code calls the FFN with the hidden states only, so a MoE layer cannot return its
routing decision to the model through its return value. Instead the PAD model opens a record around its
forward (`recording_routing()`), and each MoE layer appends its decision to the record of the current
context (`record_routing`). The record is a `ContextVar` (Transformers' `CompileableContextVar`, as its
own output capturing uses), so:

- two threads running the same model have separate records;
- a layer recomputed by gradient checkpointing during backward runs outside any record and appends
  nothing (each call is counted once);
- nothing is left on a module after a forward, whether it returned or raised (deepcopy, pickling).

Why not Transformers' `_can_record_outputs` + `capture_outputs` (as Mixtral records its router logits): the
routers live inside the wrapped family model (a `PreTrainedModel` of its own, e.g. `BertModel`). Transformers
installs the hooks below a nested `PreTrainedModel` from *that* model's `_can_record_outputs`, and the nested
model's own `capture_outputs` sets a new collector for the length of its forward, which hides the wrapper's.
A `router_logits` entry declared on the PAD model would therefore never see a router; declaring it would only
make Transformers' `test_moe_models_record_router_logits` pass without recording anything.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from ._compat import CompileableContextVar
from .router import RoutingDecision

_active_record = CompileableContextVar("pad_moe_routing_record")


@dataclass
class RoutingRecord:
    """One call of one MoE layer."""

    layer: nn.Module
    decision: RoutingDecision


@contextlib.contextmanager
def recording_routing() -> Iterator[list[RoutingRecord]]:
    """Collect the routing decisions of the MoE layers called inside the block, in call order."""
    records: list[RoutingRecord] = []
    # A dict of named outputs, as Transformers' own `capture_outputs` stores in its context variable.
    token = _active_record.set({"pad_moe_routing": records})
    try:
        yield records
    finally:
        _active_record.reset(token)


def record_routing(layer: nn.Module, decision: RoutingDecision) -> None:
    """Append `decision` to the active record, if any (none outside a PAD model's forward, e.g. on recompute)."""
    active = _active_record.get()
    if active is not None:
        active["pad_moe_routing"].append(RoutingRecord(layer, decision))
