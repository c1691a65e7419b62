"""The one enumeration of the PAD modules of a model.

Every place that walks the PAD linears of a model (partition, checkpoint codec, reports, CLI, optimizer
groups) goes through `named_pad_linears`, so they all agree on order and names. The name of a PAD
linear is its module path as it appears in a full state dict (wrapper modules inserted by FSDP or
activation checkpointing are removed), e.g. ``model.bert.encoder.layer.0.intermediate.dense.fc_in``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .pad_weight import PADWeight

# Module names that wrappers insert into `named_modules()` but not into the full state-dict keys.
_WRAPPER_NAMES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


@dataclass(frozen=True)
class PADLinearRef:
    """One PAD linear of a model."""

    name: str
    """Module path in the full state dict, without a trailing dot."""
    layer: int | None
    """Index of its transformer layer (as in `config.moe_layers`), None outside a PAD model."""
    role: str | None
    """``"fc_in"`` or ``"fc_out"`` inside its MoE layer, None outside one."""
    module: PADWeight

    @property
    def short_name(self) -> str:
        """``"layer.{i}.{role}"``: the name used in reports and partition metadata."""
        if self.layer is None or self.role is None:
            return self.name
        return f"layer.{self.layer}.{self.role}"


def _clean(name: str) -> str:
    for wrapper in _WRAPPER_NAMES:
        name = name.replace(wrapper, "")
    return name


def named_pad_linears(model: nn.Module) -> list[PADLinearRef]:
    """Every PAD weight (PAD linear) of `model`, in module order (layer by layer, fc_in before fc_out).

    A module shared by several parents (ALBERT's shared layers) is listed once, under its first name.
    """
    layer_of: dict[int, tuple[int, str]] = {}
    named_layers = getattr(model, "named_pad_layers", None)
    if callable(named_layers):
        for index, moe in named_layers():
            for role in ("fc_in", "fc_out"):
                layer_of[id(getattr(moe, role))] = (index, role)
    refs = []
    for name, module in model.named_modules():  # named_modules() yields a shared module once
        if isinstance(module, PADWeight):
            layer, role = layer_of.get(id(module), (None, None))
            refs.append(PADLinearRef(_clean(name), layer, role, module))
    return refs
