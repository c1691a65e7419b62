"""Inference without re-forming eq. 4 in every forward: merged PAD layers, and `merged_pad_weights()` for a scope.

A PAD layer forms its eq. 4 weights ``W = l_d*M*W_k + l_s*(1-M)*W_static`` in every forward, because training
changes them after every step. At inference that merge is pure overhead (at batch 1 it costs more than the
matmuls). Two ways avoid it:

- A *merged* layer (`PADWeight.merge()`, `model.merge_pad_weights()`; a PAD model merges when put in eval mode
  and unmerges in train mode) keeps its eq. 4 weights, formed on first use, with a fingerprint of the tensors they
  were formed from. Every forward checks it: when a source changed it forms them again (see below). Without grad
  (`torch.no_grad()`, `torch.inference_mode()`, as `pipeline` and `Trainer.predict` run) the stored weights are
  used as they are; where autograd records (eval mode with grad) a `PADWeight` returns them through
  `eq4.pad_merge_stored`, whose backward is eq. 4's, so gradients are exact (a neuron-structured layer forms its
  slices as usual there).
- Inside ``with merged_pad_weights():`` every PAD layer forms its weights once per block, merged or not, for forwards
  without grad; the values live in a `ContextVar` (as the routing records do), so another thread or code after the
  block never sees them. They are checked the same way.

Freshness. The fingerprint of a source tensor is its identity, storage address, dtype, device, shape and autograd
version counter (``tensor._version``, which every in-place write through the tensor bumps: ``copy_``,
``load_state_dict``, a mask written by a partition, ``fill_`` on a scale factor), and a global count of optimizer
steps (a `torch.optim` step-post hook; fused optimizers do not bump version counters). ``.to()`` drops the stored
values (`PADWeight._apply`); ``param.data = new`` or a new `nn.Parameter` changes the storage. Any change forms the
weights again on the next forward (re-merge rather than raise: it is cheap, always correct, and what a user who
edited a merged model wants). The one edit PyTorch gives no trace of is an in-place write *through* ``.data``
(``p.data.mul_(2)``), which bypasses the version counter as it bypasses autograd: after one, call
``model.unmerge_pad_weights(); model.merge_pad_weights()`` (or write under ``torch.no_grad()`` without ``.data``).

`torch.compile` cannot read the fingerprints or the `ContextVar`: code being compiled forms eq. 4 itself (the
compiler fuses it), except inside `pad_moe_transformers.export.frozen_pad_weights`, whose values are buffers a
graph holds as constants (`frozen_value`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook

from .._compat import CompileableContextVar

T = TypeVar("T")

_merged_values = CompileableContextVar("pad_merged_weights")

MERGE_CACHE = "_pad_merge_cache"
"""Attribute of a merged module holding ``(fingerprint, value)`` (one tuple, replaced atomically: threads share it)."""
FROZEN_PREFIX = "_pad_frozen_"
"""Prefix of the non-persistent buffers `freeze` registers (one tensor: ``_pad_frozen_weight``; a dict: per key)."""
FROZEN_KEYS = "_pad_frozen_keys"

_optimizer_steps = [0]


def _count_optimizer_step(optimizer: Any, args: Any, kwargs: Any) -> None:
    _optimizer_steps[0] += 1


register_optimizer_step_post_hook(_count_optimizer_step)


def fingerprint(sources: Sequence[Tensor | None]) -> tuple | None:
    """What identifies the current contents of `sources`, or None when it cannot be told (inference tensors keep no
    version counter). Holds a detached alias of each source, so the storage address cannot be reused while stored."""
    entries: list[Any] = [_optimizer_steps[0]]
    try:
        for tensor in sources:
            if tensor is None:
                entries.append(None)
                continue
            entries.append(
                (
                    id(tensor),
                    tensor.detach(),
                    tensor.data_ptr(),
                    tensor._version,
                    tensor.dtype,
                    tensor.device,
                    tensor.shape,
                )
            )
    except RuntimeError:  # "Inference tensors do not track version counter"
        return None
    return tuple(entries)


def is_fresh(stored: tuple, sources: Sequence[Tensor | None]) -> bool:
    """Whether `sources` are unchanged since `stored` (a `fingerprint`) was taken."""
    if stored[0] != _optimizer_steps[0] or len(stored) != len(sources) + 1:
        return False
    try:
        for entry, tensor in zip(stored[1:], sources):
            if entry is None or tensor is None:
                if entry is not tensor:
                    return False
                continue
            key, _, pointer, version, dtype, device, shape = entry
            if (
                key != id(tensor)
                or pointer != tensor.data_ptr()
                or version != tensor._version
                or dtype != tensor.dtype
                or device != tensor.device
                or shape != tensor.shape
            ):
                return False
    except RuntimeError:
        return False
    return True


def _detached(value: T) -> T:
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, dict):
        return {key: _detached(item) for key, item in value.items()}
    return value


@contextlib.contextmanager
def merged_pad_weights() -> Iterator[None]:
    """Within the block, every PAD module forms its eq. 4 weights once (on first use, without grad) and reuses them
    in later forwards that run without grad, forming them again if a source tensor changes (see the module doc).
    Nested blocks share the outer block's values."""
    if _merged_values.get() is not None:
        yield
        return
    token = _merged_values.set({})
    try:
        yield
    finally:
        _merged_values.reset(token)


def frozen_value(owner: Any) -> Any:
    """The values `freeze` gave `owner` (a tensor or a dict of them), or None when it is not frozen."""
    keys = getattr(owner, FROZEN_KEYS, None)
    if keys is None:
        return None
    if keys == ():
        return getattr(owner, FROZEN_PREFIX + "weight")
    return {key: getattr(owner, FROZEN_PREFIX + key) for key in keys}


def freeze(owner: Any, value: Tensor | dict[str, Tensor | None]) -> None:
    """Register `value` as non-persistent buffers of `owner` (a module) that `inference_value` returns, without any
    check, while grad is disabled, compiled code included; `thaw` removes them."""
    if isinstance(value, Tensor):
        owner.register_buffer(FROZEN_PREFIX + "weight", value.detach(), persistent=False)
        keys: tuple[str, ...] = ()
    else:
        keys = tuple(value)
        for key in keys:
            item = value[key]
            owner.register_buffer(FROZEN_PREFIX + key, None if item is None else item.detach(), persistent=False)
    setattr(owner, FROZEN_KEYS, keys)


def thaw(owner: Any) -> None:
    keys = getattr(owner, FROZEN_KEYS, None)
    if keys is None:
        return
    for key in keys or ("weight",):
        owner._buffers.pop(FROZEN_PREFIX + key, None)
    setattr(owner, FROZEN_KEYS, None)


def inference_value(
    owner: Any, compute: Callable[[], T], sources: Callable[[], Sequence[Tensor | None]], merged: bool
) -> T:
    """`compute()`, or with grad disabled a stored value of it: the frozen one (`freeze`), the merged one of a merged
    `owner` (`merged`), or the one of the enclosing `merged_pad_weights()` block; a stored value is used only while
    the tensors `sources()` returns are unchanged since it was formed, else it is formed again."""
    if torch.is_grad_enabled():
        return compute()
    frozen = frozen_value(owner)
    if frozen is not None:
        return frozen
    if torch.compiler.is_compiling():  # dynamo cannot trace the fingerprints or `ContextVar.get`
        return compute()
    if merged:
        entry = getattr(owner, MERGE_CACHE, None)
        tensors = sources()
        if entry is not None and is_fresh(entry[0], tensors):
            return entry[1]
        with torch.inference_mode(False), torch.no_grad():  # a normal tensor: usable later where autograd records
            stamp, value = fingerprint(tensors), _detached(compute())
        object.__setattr__(owner, MERGE_CACHE, None if stamp is None else (stamp, value))
        return value
    values = _merged_values.get()
    if values is None:
        return compute()
    key, tensors = id(owner), sources()
    entry = values.get(key)  # (owner, fingerprint, value); holding `owner` keeps its id from being reused
    if entry is not None and is_fresh(entry[1], tensors):
        return entry[2]
    stamp, value = fingerprint(tensors), _detached(compute())
    if stamp is not None:
        values[key] = (owner, stamp, value)
    return value
