"""Inference without re-forming eq. 4 in every forward: `merged_pad_weights`, a context-local cache.

A PAD layer forms its eq. 4 weights in every forward, because training changes them after every step and a
module-level cache would serve stale weights after any edit it cannot see (`.data` writes, `load_state_dict`,
`.to()`). At inference that merge is pure overhead (at batch 1 it costs more than the matmuls). Inside

    with pmt.merged_pad_weights():
        outputs = model(**batch)          # under torch.no_grad() / torch.inference_mode()

each PAD module forms its weights once, on first use, and reuses them for the rest of the block. The cache lives
in a `ContextVar` (as the routing records do), not on the modules: another thread, or code after the block,
never sees it; it is dropped when the block ends. Where autograd is recording (grad enabled) the modules
compute eq. 4 as usual, so gradients are never taken through cached values; so does code being compiled by
`torch.compile` (which cannot read a `ContextVar`).

Do not edit the weights inside the block: the cached values would not follow (leave the block and enter again).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

from .._compat import CompileableContextVar

T = TypeVar("T")

_merged_values = CompileableContextVar("pad_merged_weights")


@contextlib.contextmanager
def merged_pad_weights() -> Iterator[None]:
    """Within the block, every PAD module forms its eq. 4 weights once (on first use, without grad) and reuses them
    in later forwards that run without grad. Nested blocks share the outer block's values."""
    if _merged_values.get() is not None:
        yield
        return
    token = _merged_values.set({})
    try:
        yield
    finally:
        _merged_values.reset(token)


def inference_value(owner: Any, compute: Callable[[], T]) -> T:
    """`compute()`, or inside `merged_pad_weights()` with grad disabled, the value computed once for `owner`."""
    if torch.compiler.is_compiling():  # dynamo cannot trace `ContextVar.get`; a compiled graph forms eq. 4 itself
        return compute()
    values = _merged_values.get()
    if values is None or torch.is_grad_enabled():
        return compute()
    key = id(owner)
    if key not in values:
        values[key] = (owner, compute())  # holding `owner` keeps its id from being reused inside the block
    return values[key][1]
