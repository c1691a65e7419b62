"""Parameters and FLOPs of static / CondConv / DY-Conv / PAD vision models, counted as the paper counts
(Table 2).

    from pad_moe_transformers.vision.complexity import count_flops, count_parameters
    count_parameters(model).total, count_flops(model, image_size=224).macs_paper

**Parameters.** A PAD convolution with ``K`` kernels of ``W`` entries and ``nnz(M) = kappa * W`` dynamic
entries counts ``K * nnz(M)`` dynamic and ``W - nnz(M)`` static parameters (the masked-out kernel entries
and the unused static entries are not stored: the compact checkpoint holds exactly these), i.e.
``kappa * K * W + (1 - kappa) * W``; an unpartitioned model (``M = 1``, DY-Conv) counts ``K * W``. The kernel
attention, the scale factors, the biases (``K * out``, mixed by the attention) and every other tensor (stem,
BatchNorm, classifier) count as stored. A CondConv layer counts its ``k`` expert kernels and its routing FC.

**FLOPs.** `torch.utils.flop_counter.FlopCounterMode` counts 2 FLOPs per multiply-add of convolutions and
matrix products (element-wise ops, BatchNorm, activations and pooling are not counted). The paper's Table 2
(copied from DY-Conv's, Chen et al. 2020) reports multiply-adds (MAdds: ResNet-18 1.81G, whose convolutions
are 1.8G multiply-adds), so `FlopCount.macs = flops / 2` is what compares with it. The per-sample kernel
aggregation ``sum_i pi_i Theta_i`` is a `(1, K) @ (K, W)` product per sample and convolution: counted densely
as implemented (`macs`), and over the dynamic entries only, as the paper's sec. 5.4 counts PAD
(`macs_paper`: the static entries need no aggregation).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.pad_weight import PAD_WEIGHT_PARAMETER_NAMES, PADWeight
from ..core.scale_factors import SCALE_FACTOR_NAMES

__all__ = ["FlopCount", "ParameterCount", "count_flops", "count_parameters"]

_CLASSIFIER_NAMES = ("classifier",)


def _routing_modules(model: nn.Module) -> set[int]:
    """ids of the modules computing kernel weights from the input: PAD / DY-Conv kernel attention, CondConv routing."""
    from .condconv import CondConvWrapper
    from .dynamic_conv import KernelAttention

    found = set()
    for module in model.modules():
        if isinstance(module, KernelAttention):
            found.update(id(m) for m in module.modules())
        elif isinstance(module, CondConvWrapper):
            found.update(id(m) for m in module.routing.modules())
    return found


@dataclass
class ParameterCount:
    """Parameters of a vision model by kind, counted as the paper counts (module docstring)."""

    total: int = 0
    dynamic: int = 0
    """PAD / DY-Conv: ``K * nnz(M)`` kernel entries; CondConv: its ``k`` expert kernels (and biases)."""
    static: int = 0
    """PAD: ``W - nnz(M)`` static entries per convolution (0 for DY-Conv)."""
    attention: int = 0
    """Kernel attention (PAD / DY-Conv) or routing FC (CondConv)."""
    scale_factors: int = 0
    kernel_bias: int = 0
    """Biases of PAD / DY-Conv convolutions (``K * out``)."""
    classifier: int = 0
    """The classification head (`classifier`), 0 for a base model."""
    other: int = 0
    """Everything else: the stem and other plain convolutions, BatchNorm, ..."""
    layers: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per PAD convolution (module path): ``{"dynamic", "static", "entries", "num_kernels"}``."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def count_parameters(model: nn.Module) -> ParameterCount:
    """Parameters of `model` by kind, PAD convolutions counted as ``K * nnz(M) + (W - nnz(M))``."""
    from .condconv import CondConvWrapper

    count = ParameterCount()
    routing = _routing_modules(model)
    condconv_kernels = {id(m.conv) for m in model.modules() if isinstance(m, CondConvWrapper)}
    heads = [child for name, child in model.named_modules() if name.rpartition(".")[2] in _CLASSIFIER_NAMES]
    classifier = {id(m) for head in heads for m in head.modules()}
    seen: set[int] = set()
    for name, module in model.named_modules():
        for pname, parameter in module.named_parameters(recurse=False):
            if id(parameter) in seen:  # tied / shared tensors count once
                continue
            seen.add(id(parameter))
            n = parameter.numel()
            if isinstance(module, PADWeight) and pname in PAD_WEIGHT_PARAMETER_NAMES:
                nnz = module.num_dynamic()
                if pname in ("expert_weight", "expert_values"):
                    count.dynamic += module.num_experts * nnz
                    count.layers[name] = {
                        "dynamic": module.num_experts * nnz,
                        "static": module.mask.numel() - nnz,
                        "entries": module.mask.numel(),
                        "num_kernels": module.num_experts,
                    }
                else:
                    count.static += module.mask.numel() - nnz
            elif isinstance(module, PADWeight) and pname in SCALE_FACTOR_NAMES:
                count.scale_factors += n
            elif isinstance(module, PADWeight):
                count.kernel_bias += n
            elif id(module) in routing:
                count.attention += n
            elif id(module) in condconv_kernels:
                count.dynamic += n
            elif id(module) in classifier:
                count.classifier += n
            else:
                count.other += n
    count.total = (
        (count.dynamic + count.static + count.attention + count.scale_factors + count.kernel_bias)
        + count.classifier
        + count.other
    )
    return count


@dataclass
class FlopCount:
    """FLOPs of one forward pass per image (`count_flops`)."""

    image_size: int
    flops: int
    """As `FlopCounterMode` counts them: 2 per multiply-add of convolutions and matrix products."""
    macs: int
    """Multiply-adds (``flops / 2``): the paper's (and DY-Conv's) FLOPs unit."""
    aggregation_macs: int
    """Of `macs`: the per-sample kernel aggregation ``sum_i pi_i Theta_i`` of PAD / DY-Conv convolutions, dense."""
    macs_paper: int
    """`macs` with the aggregation counted over the dynamic entries only (``K * nnz(M)`` per convolution)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def count_flops(model: nn.Module, image_size: int = 224, in_channels: int = 3) -> FlopCount:
    """FLOPs of `model` on one `(1, in_channels, image_size, image_size)` image (eval mode, no autograd).

    The aggregation of a PAD convolution is the matrix product (``aten.mm`` / ``aten.bmm``) the module runs
    outside its attention; its dense count is scaled by ``nnz(M) / W`` for `macs_paper`.
    """
    from torch.utils.flop_counter import FlopCounterMode

    pads = {name: module for name, module in model.named_modules() if isinstance(module, PADWeight)}
    parameter = next(model.parameters())
    pixel_values = torch.randn(1, in_channels, image_size, image_size, device=parameter.device, dtype=parameter.dtype)
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            model(pixel_values)
    finally:
        model.train(was_training)
    by_module = counter.get_flop_counts()
    products = (torch.ops.aten.mm, torch.ops.aten.bmm)
    aggregation = sparse = 0
    for name, module in pads.items():
        counts = _module_counts(by_module, name)
        attention_counts = {
            op: n
            for child, _ in module.named_children()
            for op, n in _module_counts(by_module, f"{name}.{child}").items()
        }
        dense = sum(counts.get(op, 0) - attention_counts.get(op, 0) for op in products) // 2
        aggregation += dense
        sparse += dense * module.num_dynamic() // module.mask.numel()
    macs = counter.get_total_flops() // 2
    return FlopCount(image_size, counter.get_total_flops(), macs, aggregation, macs - aggregation + sparse)


def _module_counts(by_module: dict[str, dict[Any, int]], name: str) -> dict[Any, int]:
    """The op counts `FlopCounterMode` recorded for the module at path `name` (its keys start at "Global")."""
    for key in (f"Global.{name}", name):
        if key in by_module:
            return by_module[key]
    for key, value in by_module.items():  # the recorded path may carry a prefix of the outer module
        if key.endswith(f".{name}"):
            return value
    return {}
