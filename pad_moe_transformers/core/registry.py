"""The one enumeration of the PAD modules of a model.

Every place that walks the PAD linears of a model (partition, checkpoint codec, reports, CLI, optimizer
groups) goes through `named_pad_linears`, so they all agree on order and names. The name of a PAD
linear is its module path as it appears in a full state dict (wrapper modules inserted by FSDP or
activation checkpointing are removed), e.g. ``model.bert.encoder.layer.0.intermediate.dense.fc_in``.

The enumeration covers every `PADWeight` (PAD linears of an MoE, PAD convolutions of a vision model);
`named_pad_weights` is the same function under the neutral name.
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
    unit_prefix: str = ""
    """Leading part of `name` that `short_name` drops (the PAD wrapper's attribute, e.g. ``"model."``)."""

    @property
    def short_name(self) -> str:
        """The name used in reports and partition metadata: ``"layer.{i}.{role}"`` in an MoE layer, else the
        module path without the model's `pad_unit_prefix` (a PAD vision model's convolutions:
        ``"resnet.encoder.stages.0.layers.0.layer.0.convolution"``)."""
        if self.layer is None or self.role is None:
            return self.name[len(self.unit_prefix):] if self.name.startswith(self.unit_prefix) else self.name
        return f"layer.{self.layer}.{self.role}"


def _clean(name: str) -> str:
    for wrapper in _WRAPPER_NAMES:
        name = name.replace(wrapper, "")
    return name


def named_pad_linears(model: nn.Module) -> list[PADLinearRef]:
    """Every PAD weight (PAD linear) of `model`, in module order (layer by layer, fc_in before fc_out).

    A module shared by several parents (ALBERT's shared layers) is listed once, under its first name. A model
    with a `pad_unit_prefix` attribute (e.g. ``"model."``) gives short names without it.
    """
    layer_of: dict[int, tuple[int, str]] = {}
    named_layers = getattr(model, "named_pad_layers", None)
    if callable(named_layers):
        for index, moe in named_layers():
            for role in ("fc_in", "fc_out"):
                layer_of[id(getattr(moe, role))] = (index, role)
    prefix = getattr(model, "pad_unit_prefix", "") or ""
    refs = []
    for name, module in model.named_modules():  # named_modules() yields a shared module once
        if isinstance(module, PADWeight):
            layer, role = layer_of.get(id(module), (None, None))
            refs.append(PADLinearRef(_clean(name), layer, role, module, prefix))
    return refs


named_pad_weights = named_pad_linears
"""`named_pad_linears` under a name that fits every PAD module (linears and convolutions)."""
