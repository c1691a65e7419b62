"""CondConv baseline (timm's CondConv2d + sigmoid routing): loader, layer, conversion of ResNet / MobileNetV2."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    BertConfig,
    BertModel,
    MobileNetV2Config,
    MobileNetV2ForImageClassification,
    ResNetConfig,
    ResNetForImageClassification,
)

from pad_moe_transformers.vision import condconv
from pad_moe_transformers.vision.condconv import CondConvWrapper, convert_convs_to_condconv, load_timm_condconv2d

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("timm") is None, reason="needs timm (pip install --no-deps timm)"
)


def tiny_resnet() -> ResNetForImageClassification:
    config = ResNetConfig(
        layer_type="basic",
        depths=[1, 1],
        hidden_sizes=[8, 16],
        embedding_size=8,
        num_labels=3,
        downsample_in_first_stage=True,
    )
    return ResNetForImageClassification(config)


def tiny_mobilenet() -> MobileNetV2ForImageClassification:
    config = MobileNetV2Config(depth_multiplier=0.35, num_labels=3, image_size=32, classifier_dropout_prob=0.0)
    return MobileNetV2ForImageClassification(config)


def test_loader_returns_timms_class_without_timms_package_init():
    cls = load_timm_condconv2d()
    assert cls.__name__ == "CondConv2d"
    private = condconv._load_condconv_module_file()  # the fallback, whichever path the loader took
    assert private.__module__ == f"{condconv._PRIVATE_PACKAGE}.layers.cond_conv2d"
    assert private.__module__ != "timm.layers.cond_conv2d"


def test_missing_timm_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "timm" else real(name, *a))
    with pytest.raises(ImportError, match="pip install --no-deps timm"):
        load_timm_condconv2d.__wrapped__()


@pytest.mark.parametrize(
    "in_channels, out_channels, kernel, stride, padding, dilation, groups, bias",
    [
        (6, 4, 3, 1, 1, 1, 1, False),
        (6, 6, 3, 2, 1, 1, 6, True),
        (4, 8, 1, 2, 0, 1, 1, True),
        (4, 4, 3, 1, 2, 2, 2, False),
    ],
)
def test_layer_matches_per_sample_convolution(
    in_channels, out_channels, kernel, stride, padding, dilation, groups, bias
):
    torch.manual_seed(0)
    layer = CondConvWrapper(in_channels, out_channels, kernel, stride, padding, dilation, groups, bias, num_experts=3)
    nn.init.normal_(layer.routing.weight)
    x = torch.randn(5, in_channels, 9, 9)
    out = layer(x)
    experts = layer.conv.weight.reshape(3, out_channels, in_channels // groups, kernel, kernel)
    for b in range(5):
        r = torch.sigmoid(x[b].mean(dim=(1, 2)) @ layer.routing.weight.T + layer.routing.bias)  # (3,)
        kernel_b = torch.einsum("k,koihw->oihw", r, experts)
        bias_b = r @ layer.conv.bias if bias else None
        ref = F.conv2d(x[b : b + 1], kernel_b, bias_b, stride=stride, padding=padding, dilation=dilation, groups=groups)
        torch.testing.assert_close(out[b : b + 1], ref, rtol=1e-5, atol=1e-5)
    assert out.shape == nn.Conv2d(in_channels, out_channels, kernel, stride, padding, dilation, groups)(x).shape


def test_from_dense_equals_dense_and_experts_can_diverge():
    torch.manual_seed(0)
    dense = nn.Conv2d(6, 5, 3, stride=2, padding=1, bias=True)
    layer = CondConvWrapper.from_dense(dense, num_experts=8)
    x = torch.randn(4, 6, 10, 10)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-5)
    assert layer.stride == dense.stride and layer.kernel_size == dense.kernel_size and layer.dilation == dense.dilation
    layer(x).square().sum().backward()
    routing_grad = layer.routing.weight.grad
    assert routing_grad.abs().sum() > 0
    assert not torch.allclose(routing_grad[0], routing_grad[1])  # the zero-mean perturbations break the symmetry
    assert layer.conv.weight.grad.abs().sum() > 0


def test_wrong_channels_and_unsupported_models_raise():
    layer = CondConvWrapper(4, 4, 3, padding=1, num_experts=2)
    with pytest.raises(ValueError, match=r"\(batch, 4, height, width\)"):
        layer(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="resnet"):
        convert_convs_to_condconv(BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2)))
    with pytest.raises(ValueError, match="integer zero padding"):
        CondConvWrapper.from_dense(nn.Conv2d(2, 2, 3, padding="same"))


@pytest.mark.parametrize("build", [tiny_resnet, tiny_mobilenet])
def test_conversion_keeps_outputs_and_the_stem(build):
    torch.manual_seed(0)
    model = build().eval()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    stem = convs[0]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = model(x).logits
        convert_convs_to_condconv(model, num_experts=8)
        converted = model(x).logits
    scale = reference.abs().max()  # a random MobileNetV2's logits are tiny: compare relative to their size
    assert scale > 0
    torch.testing.assert_close(converted / scale, reference / scale, rtol=1e-4, atol=1e-4)
    wrappers = [m for m in model.modules() if isinstance(m, CondConvWrapper)]
    assert len(wrappers) == len(convs) - 1
    assert [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.__class__ is nn.Conv2d] == [stem]
    assert all(w.num_experts == 8 for w in wrappers)
    model.train()
    model(x, labels=torch.tensor([0, 2])).loss.backward()
    assert all(w.conv.weight.grad is not None and w.routing.weight.grad is not None for w in wrappers)
