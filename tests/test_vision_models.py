"""PAD dynamic-convolution models: conversion of tiny ResNet / MobileNetV2 configs, Auto classes, init,
temperature schedule, a bf16 training step and config validation."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    MobileNetV2Config,
    ResNetConfig,
)

import pad_moe_transformers as pmt
from pad_moe_transformers.vision import PADDynamicConv2d, TemperatureScheduleCallback, set_temperature, temperature_at


def tiny_bases() -> dict[str, object]:
    return {
        "resnet_basic": ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"),
        "resnet_bottleneck": ResNetConfig(
            embedding_size=8, hidden_sizes=[16, 32], depths=[2, 1], layer_type="bottleneck"
        ),
        "mobilenet_v2": MobileNetV2Config(depth_multiplier=0.35, image_size=32, initializer_range=0.2),
    }


def dense_and_pad(name: str, tmp_path, **pad_kwargs):
    base = tiny_bases()[name]
    base.num_labels = 3
    torch.manual_seed(0)
    dense = AutoModelForImageClassification.from_config(base).eval()
    dense.save_pretrained(tmp_path / "dense")
    config = pmt.PADDyConvConfig.from_base(str(tmp_path / "dense"), **pad_kwargs)
    pad = AutoModelForImageClassification.from_pretrained(tmp_path / "dense", config=config)
    return dense, pad


@pytest.mark.parametrize("name", list(tiny_bases()))
def test_upcycled_equals_dense_whatever_the_attention_and_mask(name, tmp_path):
    dense, pad = dense_and_pad(name, tmp_path)
    assert isinstance(pad, pmt.PADDyConvForImageClassification) and not pad.training
    dense_convs = [m for m in dense.modules() if isinstance(m, nn.Conv2d)]
    plain = [m for m in pad.modules() if isinstance(m, nn.Conv2d) and not isinstance(m, PADDynamicConv2d)]
    assert len(plain) == 1  # the stem's first convolution stays static
    assert len(pad.pad_convs) == len(dense_convs) - 1
    with torch.no_grad():
        for conv in pad.pad_convs:
            conv.mask.copy_(torch.rand(conv.mask.shape) < 0.5)
            conv.attention.fc2.bias.normal_(std=3.0)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(pad(x).logits, dense(x).logits, atol=1e-5, rtol=1e-4)


def test_stems_and_what_is_converted():
    assert pmt.PAD_DYCONV_STEMS["resnet"] == ("embedder.embedder.convolution",)
    base = tiny_bases()["mobilenet_v2"]
    model = AutoModel.from_config(pmt.PADDyConvConfig.from_base(base))
    names = [ref.short_name for ref in pmt.core.named_pad_weights(model)]
    # the stem's depthwise/projection convs, every expand / depthwise / project conv and the final 1x1 conv
    assert names[:2] == ["conv_stem.conv_3x3.convolution", "conv_stem.reduce_1x1.convolution"]
    assert "layer.0.conv_3x3.convolution" in names and names[-1] == "conv_1x1.convolution"
    depthwise = model.model.get_submodule("layer.0.conv_3x3.convolution")
    assert depthwise.groups == depthwise.in_channels == depthwise.out_channels


def test_unit_names_do_not_depend_on_the_head():
    config = pmt.PADDyConvConfig.from_base(tiny_bases()["resnet_basic"])
    head = AutoModelForImageClassification.from_config(config)
    base = AutoModel.from_config(config)
    assert isinstance(base, pmt.PADDyConvModel)
    names = [r.short_name for r in pmt.core.named_pad_weights(head)]
    assert names == [r.short_name for r in pmt.core.named_pad_weights(base)]
    assert names[0] == "encoder.stages.0.layers.0.layer.0.convolution"


@pytest.mark.parametrize("name", ["resnet_basic", "mobilenet_v2"])
def test_from_config_draws_every_kernel(name):
    torch.manual_seed(0)
    model = AutoModelForImageClassification.from_config(pmt.PADDyConvConfig.from_base(tiny_bases()[name]))
    for conv in model.pad_convs:
        w = conv.expert_weight
        assert not torch.equal(w[0], w[1]) and not torch.equal(w[0], conv.static_weight)
        assert bool(conv.mask.all()) and float(conv.attention.temperature) == 1.0
        torch.testing.assert_close(conv.static_weight, w.mean(dim=0))  # the static weight: the kernels' mean
    if name == "resnet_basic":  # ResNet's Kaiming normal (fan_out) init of every kernel
        conv = model.pad_convs[0]
        expected = (2.0 / (conv.out_channels * 9)) ** 0.5
        assert abs(float(conv.expert_weight.detach().std()) / expected - 1) < 0.2


def test_temperature_schedule_and_callback():
    assert temperature_at(0) == 30.0 and temperature_at(5) == 15.5 and temperature_at(10) == 1.0
    assert temperature_at(50) == 1.0 and temperature_at(3, 10.0, 2.0, 0) == 2.0
    model = AutoModelForImageClassification.from_config(
        pmt.PADDyConvConfig.from_base(tiny_bases()["resnet_basic"], temperature_init=20.0, temperature_epochs=4)
    )
    assert set_temperature(model, 7.0) == len(model.pad_convs)
    assert all(float(c.attention.temperature) == 7.0 for c in model.pad_convs)
    with pytest.raises(ValueError, match="finite number > 0"):
        set_temperature(model, 0.0)
    callback = TemperatureScheduleCallback()
    state = type("State", (), {"epoch": 1.0})()
    callback.on_step_begin(None, state, None, model=model)
    assert float(model.pad_convs[0].attention.temperature) == pytest.approx(20.0 - 19.0 / 4)
    state.epoch = 9.0
    callback.on_epoch_begin(None, state, None, model=model)
    assert float(model.pad_convs[-1].attention.temperature) == 1.0
    assert pmt.TemperatureScheduleCallback is TemperatureScheduleCallback


def test_bf16_autocast_train_step(tmp_path):
    _, model = dense_and_pad("resnet_basic", tmp_path)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(pixel_values=x, labels=y).loss
    loss.backward()
    conv = model.pad_convs[0]
    assert torch.isfinite(loss) and conv.expert_weight.grad is not None
    assert conv.attention.fc1.weight.grad is not None and conv.scale_logit.grad is not None
    before = conv.expert_weight.detach().clone()
    optimizer.step()
    assert not torch.equal(before, conv.expert_weight)


def test_config_validation_and_head_fields():
    base = tiny_bases()["resnet_basic"]
    config = pmt.PADDyConvConfig.from_base(base, num_labels=5, depths=[1, 2])
    assert config.num_labels == config.base_config.num_labels == 5 and config.base_config.depths == [1, 2]
    assert config.dynamic_ratio == 0.3 and config.num_kernels == 4 and not config.is_partitioned
    reloaded = AutoConfig.for_model(**config.to_dict())
    assert isinstance(reloaded, pmt.PADDyConvConfig) and reloaded.base_config.depths == [1, 2]
    bad = [
        ({"dynamic_ratio": 0.0}, r"dynamic_ratio must be in \(0, 1\]"),
        ({"dynamic_ratio": 1.5}, r"dynamic_ratio must be in \(0, 1\]"),
        ({"num_kernels": 0}, "num_kernels must be an integer >= 1"),
        ({"temperature_init": -1.0}, "temperature_init must be > 0"),
        ({"scale_factor_mode": "bogus"}, "scale_factor_mode must be one of"),
        ({"partition_granularity": "neuron"}, "partition_granularity must be 'element'"),
        ({"hidden_dropout_prob": 0.1}, "Unknown argument 'hidden_dropout_prob'"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            pmt.PADDyConvConfig.from_base(base, **kwargs)
    with pytest.raises(ValueError, match="base_config.model_type='bert' has no PAD dynamic-convolution mapping"):
        pmt.PADDyConvConfig(base_config={"model_type": "bert"})
