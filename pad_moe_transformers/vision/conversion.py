"""Conversion of a dense ResNet / MobileNetV2 into PAD dynamic convolution: every `nn.Conv2d` of the family's
base model except the stem (`PAD_DYCONV_STEMS`) becomes a `PADDynamicConv2d` copied from it."""

from __future__ import annotations

from torch import nn

from .._compat import mark_initialized
from .configuration_pad_dyconv import PAD_DYCONV_STEMS, PADDyConvConfig
from .dynamic_conv import PADDynamicConv2d

__all__ = ["PAD_DYCONV_STEMS", "convert_convs_to_pad_dyconv", "dynamic_conv_names"]


def dynamic_conv_names(base_model: nn.Module, base_model_type: str) -> list[str]:
    """Paths (inside `base_model`) of the convolutions that become dynamic, in module order."""
    stems = PAD_DYCONV_STEMS.get(base_model_type)
    if stems is None:
        raise ValueError(
            f"No PAD dynamic-convolution mapping for model type {base_model_type!r}; supported: "
            f"{sorted(PAD_DYCONV_STEMS)} (add a row to `PAD_DYCONV_STEMS`)."
        )
    convs = [name for name, module in base_model.named_modules() if isinstance(module, (nn.Conv2d, PADDynamicConv2d))]
    missing = [stem for stem in stems if stem not in convs]
    if missing:
        raise ValueError(
            f"The stem convolution(s) {missing} of the {base_model_type!r} mapping are not convolutions of the "
            f"{type(base_model).__name__} this was applied to. Pass the family's base model (`model.base_model`) "
            "or fix the row in `PAD_DYCONV_STEMS`."
        )
    return [name for name in convs if name not in stems]


def convert_convs_to_pad_dyconv(
    base_model: nn.Module, config: PADDyConvConfig, keep_weights: bool = True
) -> list[PADDynamicConv2d]:
    """Replace every convolution of `base_model` (the family's base model, e.g. `ResNetModel`) except the stem by a
    `PADDynamicConv2d` whose kernels and static weight are copies of it (outputs unchanged at conversion), in place.

    With `keep_weights` the copies are marked as initialised, so Transformers' init pass keeps them (upcycling);
    without it they are left for `initialize_weights` to draw (a model built from scratch: every kernel its own
    draw, as DY-Conv). The attention starts at `config.temperature_final` (the inference temperature; the training
    schedule sets its own). Returns the new layers in module order.
    """
    layers = []
    for name in dynamic_conv_names(base_model, config.base_model_type):
        parent_name, _, child = name.rpartition(".")
        parent = base_model.get_submodule(parent_name)
        conv = getattr(parent, child)
        if isinstance(conv, PADDynamicConv2d):
            raise TypeError(f"{name} is already a PADDynamicConv2d (the model was converted twice).")
        layer = PADDynamicConv2d.from_dense(
            conv,
            num_kernels=config.num_kernels,
            scale_factor_mode=config.scale_factor_mode,
            reduction=config.attention_reduction,
            temperature=float(config.temperature_final),
        )
        # Transformers' init pass skips tensors flagged `_is_hf_initialized`: the copies must not be re-drawn
        # (see conversion.py). The attention is new and stays unflagged, so the family's init initialises it.
        # On the meta device (a model built to be loaded into) nothing is flagged: the loader fills it.
        if keep_weights and conv.weight.device.type != "meta":
            for tensor in list(layer.parameters(recurse=False)) + [layer.mask]:
                mark_initialized(tensor)
        setattr(parent, child, layer)
        layers.append(layer)
    return layers
