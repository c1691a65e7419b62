"""Where the feed-forward block lives in each supported model family.

One row per `model_type`: the path from the family's base model (`model.base_model`) to its
transformer layers, and, inside one layer, the FFN's input linear, activation and output linear.
The PAD-MoE layer takes the place of the input linear; the activation and output linear become
`nn.Identity` (the MoE computes the whole FFN), so the family's own residual, dropout and
LayerNorm code runs unchanged around it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class FFNLayout:
    layers: str
    """Dotted path from the base model to the `nn.ModuleList` of layers; `*` iterates a list."""
    ffn_in: str
    """Dotted path inside a layer to the input linear (hidden -> intermediate)."""
    activation: str
    """Dotted path inside a layer to the activation between the two linears."""
    ffn_out: str
    """Dotted path inside a layer to the output linear (intermediate -> hidden)."""


_BERT_LIKE = FFNLayout(
    layers="encoder.layer",
    ffn_in="intermediate.dense",
    activation="intermediate.intermediate_act_fn",
    ffn_out="output.dense",
)

PAD_FFN_LAYOUTS: dict[str, FFNLayout] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "electra": _BERT_LIKE,
    "camembert": _BERT_LIKE,
    # ALBERT shares layers across depth: each distinct layer gets one MoE, reused at every depth it serves.
    "albert": FFNLayout(
        layers="encoder.albert_layer_groups.*.albert_layers",
        ffn_in="ffn",
        activation="activation",
        ffn_out="ffn_output",
    ),
    "distilbert": FFNLayout(
        layers="transformer.layer",
        ffn_in="ffn.lin1",
        activation="ffn.activation",
        ffn_out="ffn.lin2",
    ),
}


def get_layout(model_type: str) -> FFNLayout:
    try:
        return PAD_FFN_LAYOUTS[model_type]
    except KeyError:
        raise ValueError(
            f"Model type {model_type!r} has no PAD-MoE FFN mapping; supported: {sorted(PAD_FFN_LAYOUTS)}. "
            "Add an `FFNLayout` row to `pad_moe_transformers.architectures.PAD_FFN_LAYOUTS` for a new family."
        ) from None


def iter_layers(base_model: nn.Module, layout: FFNLayout) -> Iterator[nn.Module]:
    """Yield the distinct transformer layers of `base_model` in order."""
    modules = [base_model]
    for part in layout.layers.split("."):
        if part == "*":
            modules = [child for module in modules for child in module]
        else:
            modules = [getattr(module, part) for module in modules]
    for module_list in modules:
        yield from module_list


def get_submodule_parent(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    """Return the parent module of `path` and the attribute name of the last component."""
    parent_path, _, name = path.rpartition(".")
    return (root.get_submodule(parent_path) if parent_path else root), name
