"""The scale factors ``(l_s, l_d)`` of eq. 4 and their five parametrisations (paper Table 4)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

SCALE_FACTOR_MODES = ("sum2", "none", "static_only", "dynamic_only", "free")
"""Ways to scale the dynamic and static parts of eq. 4 (paper Table 4):

- ``"sum2"``: trainable ``l_d = 2 * sigmoid(phi)``, ``l_s = 2 - l_d`` (both 1 at init) -- the paper's choice.
- ``"none"``: ``l_d = l_s = 1``, nothing trainable.
- ``"static_only"``: only ``l_s`` is trainable (init 1), ``l_d = 1``.
- ``"dynamic_only"``: only ``l_d`` is trainable (init 1), ``l_s = 1``.
- ``"free"``: ``l_s`` and ``l_d`` both trainable and unconstrained (init 1).
"""

SCALE_FACTOR_NAMES = ("scale_logit", "lambda_static", "lambda_dynamic")
"""Attribute names of the scale-factor parameters a PAD weight may have (which ones depends on its mode).
Each is a `(1,)` parameter (FSDP refuses 0-d ones); checkpoints store them 0-d."""

SCALE_FACTOR_INIT = {"scale_logit": 0.0, "lambda_static": 1.0, "lambda_dynamic": 1.0}


def scale_factor_names(mode: str) -> tuple[str, ...]:
    """The trainable scale-factor parameters of `mode`."""
    if mode not in SCALE_FACTOR_MODES:
        raise ValueError(f"scale_factor_mode must be one of {list(SCALE_FACTOR_MODES)}, got {mode!r}.")
    return {
        "sum2": ("scale_logit",),
        "none": (),
        "static_only": ("lambda_static",),
        "dynamic_only": ("lambda_dynamic",),
        "free": ("lambda_static", "lambda_dynamic"),
    }[mode]


def register_scale_factors(module: nn.Module, mode: str, device=None, dtype=None) -> None:
    """Add the `(1,)` scale-factor parameters of `mode` to `module`, at their initial values (l_s = l_d = 1)."""
    for name in scale_factor_names(mode):
        module.register_parameter(
            name, nn.Parameter(torch.full((1,), SCALE_FACTOR_INIT[name], device=device, dtype=dtype))
        )


def scale_factors(module: nn.Module, mode: str, values: Mapping[str, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """`(l_s, l_d)` of `module` as 0-d tensors (views of its parameters, so they carry gradients).

    `values` (`{name: tensor}`, `(1,)` or 0-d, e.g. from a full state dict) replaces the module's own
    parameters, which are shards when the module is FSDP-sharded.
    """

    def scale(name: str) -> Tensor:
        tensor = values[name] if values is not None and name in values else getattr(module, name)
        return tensor.reshape(())

    if mode == "sum2":
        l_d = 2.0 * torch.sigmoid(scale("scale_logit"))
        return 2.0 - l_d, l_d
    reference = module.dynamic_parameter
    one = torch.ones((), device=reference.device, dtype=reference.dtype)
    l_s = scale("lambda_static") if mode in ("static_only", "free") else one
    l_d = scale("lambda_dynamic") if mode in ("dynamic_only", "free") else one
    return l_s, l_d
