"""Parameter and FLOP counts of vision models as the paper counts them (`vision.complexity`)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn
from transformers import AutoModelForImageClassification, ResNetConfig, ResNetForImageClassification

import pad_moe_transformers  # noqa: F401
from pad_moe_transformers.core import named_pad_linears
from pad_moe_transformers.vision import PADDyConvConfig
from pad_moe_transformers.vision.complexity import count_flops, count_parameters

K = 4
CONFIG = ResNetConfig(layer_type="basic", depths=[1, 1], hidden_sizes=[8, 16], embedding_size=8, num_labels=5)


def pad_model(dynamic_ratio: float = 1.0):
    torch.manual_seed(0)
    config = PADDyConvConfig.from_base(CONFIG, num_kernels=K, dynamic_ratio=dynamic_ratio)
    return AutoModelForImageClassification.from_config(config)


def set_masks(model, kappa: float) -> list[tuple[int, int]]:
    """Random masks with round(kappa * W) dynamic entries per convolution; returns [(W, nnz)]."""
    sizes = []
    for ref in named_pad_linears(model):
        mask = ref.module.mask
        flat = torch.zeros(mask.numel(), dtype=torch.bool)
        flat[torch.randperm(mask.numel())[: round(kappa * mask.numel())]] = True
        mask.copy_(flat.view_as(mask))
        sizes.append((mask.numel(), int(flat.sum())))
    return sizes


def conv_and_linear_macs(model: nn.Module, image_size: int) -> int:
    """Multiply-adds of the plain convolutions and linears, from their output shapes (independent of FlopCounter)."""
    total = 0

    def hook(module, args, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += output.numel() * (module.in_channels // module.groups) * kh * kw
        else:
            total += output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, image_size, image_size))
    for handle in handles:
        handle.remove()
    return total


def test_static_model_counts_every_parameter_and_its_macs():
    model = ResNetForImageClassification(CONFIG)
    count = count_parameters(model)
    assert count.total == model.num_parameters()
    assert count.dynamic == count.static == count.attention == 0
    assert count.classifier == 16 * 5 + 5
    flops = count_flops(model, image_size=32)
    assert flops.macs == conv_and_linear_macs(model, 32)
    assert flops.flops == 2 * flops.macs and flops.aggregation_macs == 0 and flops.macs_paper == flops.macs


def test_dyconv_and_pad_counts_follow_the_mask():
    model = pad_model(1.0)  # never partitioned: DY-Conv
    dy = count_parameters(model)
    entries = sum(ref.module.mask.numel() for ref in named_pad_linears(model))
    assert dy.dynamic == K * entries and dy.static == 0
    assert dy.attention == sum(p.numel() for ref in named_pad_linears(model) for p in ref.module.attention.parameters())
    sizes = set_masks(model, 0.3)
    pad = count_parameters(model)
    assert pad.dynamic == sum(K * nnz for _, nnz in sizes)
    assert pad.static == sum(w - nnz for w, nnz in sizes)
    assert pad.total == dy.total - dy.dynamic + pad.dynamic + pad.static
    assert pad.total < dy.total
    assert set(pad.layers) == {ref.name for ref in named_pad_linears(model)}


def test_pad_flops_count_the_aggregation_over_dynamic_entries_only():
    model = pad_model(1.0)
    entries = sum(ref.module.mask.numel() for ref in named_pad_linears(model))
    dense = count_flops(model, image_size=32)
    assert dense.aggregation_macs == K * entries  # one (1, K) @ (K, W) product per convolution and image
    assert dense.macs_paper == dense.macs
    sizes = set_masks(model, 0.3)
    pad = count_flops(model, image_size=32)
    assert pad.macs == dense.macs
    assert pad.macs_paper == pad.macs - K * entries + sum(K * nnz for _, nnz in sizes)


@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="needs timm (pip install --no-deps timm)")
def test_condconv_counts_its_experts_and_routing():
    from pad_moe_transformers.vision.condconv import CondConvWrapper, convert_convs_to_condconv

    model = convert_convs_to_condconv(ResNetForImageClassification(CONFIG), num_experts=8)
    count = count_parameters(model)
    wrappers = [m for m in model.modules() if isinstance(m, CondConvWrapper)]
    assert count.dynamic == sum(w.conv.weight.numel() for w in wrappers)
    assert count.attention == sum(w.in_channels * 8 + 8 for w in wrappers)
    assert count.total == model.num_parameters()
