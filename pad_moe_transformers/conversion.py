"""Upcycling: replace the FFN blocks of a BERT-family base model by PAD-MoE layers copied from them."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from ._compat import mark_initialized
from .architectures import get_layout, get_submodule_parent, iter_layers
from .configuration_pad_moe import PADMoEConfig
from .moe import PADMoEFeedForward


def convert_ffn_to_pad_moe(
    base_model: nn.Module, config: PADMoEConfig, keep_copies: bool = True
) -> list[PADMoEFeedForward]:
    """Replace the FFN of the selected layers of `base_model` (the family's base model) in place.

    Each PAD-MoE layer is upcycled from the FFN it replaces, so the output is unchanged as long
    as the experts are not trained apart. With `keep_copies=False` (a model built from its config alone, whose FFN
    is random) the copies are left for Transformers' init pass to draw, one expert independently of another, as a
    Mixtral built from its config. Returns the new layers in order.
    """
    layout = get_layout(config.base_model_type)
    try:
        layers = list(iter_layers(base_model, layout))
    except (AttributeError, TypeError) as error:
        raise ValueError(
            f"The PAD-MoE FFN layout of {config.base_model_type!r} (layers at {layout.layers!r}) does not match the "
            f"{type(base_model).__name__} it was applied to: {error}. Pass the family's base model "
            "(`model.base_model`) "
            "or fix the `FFNLayout` row in `pad_moe_transformers.architectures.PAD_FFN_LAYOUTS`."
        ) from None
    selected = range(len(layers)) if config.moe_layers is None else config.moe_layers
    out_of_range = [i for i in selected if i >= len(layers)]
    if out_of_range:
        raise ValueError(
            f"moe_layers={config.moe_layers} names layers {out_of_range}, but the "
            f"{config.base_model_type} model has {len(layers)} FFN layers (0..{len(layers) - 1})."
        )
    std = getattr(config.base_config, "initializer_range", 0.02)
    moe_layers = []
    for index in selected:
        layer = layers[index]
        try:
            in_parent, in_name = get_submodule_parent(layer, layout.ffn_in)
            act_parent, act_name = get_submodule_parent(layer, layout.activation)
            out_parent, out_name = get_submodule_parent(layer, layout.ffn_out)
            fc_in, activation, fc_out = (
                getattr(in_parent, in_name),
                getattr(act_parent, act_name),
                getattr(out_parent, out_name),
            )
        except AttributeError as error:
            raise ValueError(
                f"Layer {index} ({type(layer).__name__}) has no FFN at the paths of the {config.base_model_type!r} "
                f"layout ({layout.ffn_in!r}, {layout.activation!r}, {layout.ffn_out!r}): {error}. Fix the `FFNLayout` "
                "row in `pad_moe_transformers.architectures.PAD_FFN_LAYOUTS`."
            ) from None
        if not isinstance(fc_in, nn.Linear) or not isinstance(fc_out, nn.Linear):
            raise TypeError(
                f"Layer {index}: expected nn.Linear at {layout.ffn_in!r} and {layout.ffn_out!r}, found "
                f"{type(fc_in).__name__} and {type(fc_out).__name__} (already converted?)."
            )
        if not isinstance(activation, nn.Module):  # a plain function given as `hidden_act`
            activation = _FunctionModule(activation)
        moe = PADMoEFeedForward.from_dense(
            fc_in,
            activation,
            fc_out,
            num_experts=config.num_experts,
            num_experts_per_tok=config.num_experts_per_tok,
            scale_factor_mode=config.scale_factor_mode,
            router_jitter_noise=float(config.router_jitter_noise),
            router_init_std=std,
            partition_granularity=config.partition_granularity,
            config=config,
        )
        # Transformers' init pass (`post_init`, `_initialize_missing_keys`) skips tensors carrying its
        # `_is_hf_initialized` flag; without it the upcycled copies would be re-drawn at random. Transformers
        # has no public way to mark a tensor initialised. On the meta device (a model built to be loaded into)
        # there are no copies: the tensors stay unmarked, so the loader sees them as missing until loaded.
        if keep_copies and fc_in.weight.device.type != "meta":
            for tensor in list(moe.parameters()) + list(moe.buffers()):
                mark_initialized(tensor)
        setattr(in_parent, in_name, moe)
        setattr(act_parent, act_name, nn.Identity())
        setattr(out_parent, out_name, nn.Identity())
        moe_layers.append(moe)
    return moe_layers


class _FunctionModule(nn.Module):
    """A plain activation function (a `hidden_act` given as a callable) as a module."""

    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)
