"""A PAD DY-Conv model behaves as the plain ResNet / MobileNetV2 where a user touches it (issue 26, part 6):
`to(memory_format=torch.channels_last)`, a batch of 0 images (train and eval), and what the partition does with
an empty batch (it has no plain counterpart: a clear error, since an empty batch carries no information)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import AutoModelForImageClassification, BertConfig, MobileNetV2Config, ResNetConfig

import pad_moe_transformers as pmt
from pad_moe_transformers.partition import partition_model
from pad_moe_transformers.vision import PADDynamicConv2d

NUM_LABELS = 3
BASES = {
    "resnet": ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"),
    "mobilenet_v2": MobileNetV2Config(depth_multiplier=0.35, image_size=32, classifier_dropout_prob=0.0),
}
MODELS = [(family, kind) for family in sorted(BASES) for kind in ("plain", "pad")]
IDS = [f"{family}-{kind}" for family, kind in MODELS]


def build(family: str, kind: str, seed: int = 0) -> nn.Module:
    base = copy.deepcopy(BASES[family])
    base.num_labels = NUM_LABELS
    config = base if kind == "plain" else pmt.PADDyConvConfig.from_base(base, num_kernels=3, temperature_final=0.5)
    torch.manual_seed(seed)
    return AutoModelForImageClassification.from_config(config)


def images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def labels(n: int) -> torch.Tensor:
    return torch.arange(n) % NUM_LABELS


def spatial_weights(model: nn.Module) -> list[torch.Tensor]:
    """The 4-D weights of the 3x3 convolutions (a PAD convolution's static weight; its 5-D kernels are never read
    by the conv as they are and keep their standard layout)."""
    out = []
    for module in model.modules():
        if isinstance(module, PADDynamicConv2d) and module.kernel_size == (3, 3):
            out.append(module.static_weight)
            assert module.expert_weight.is_contiguous()
        elif isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3):
            out.append(module.weight)
    return out


# ----------------------------------------------------------------------------- channels_last
@pytest.mark.parametrize("family,kind", MODELS, ids=IDS)
def test_channels_last_gives_the_contiguous_outputs(family, kind, tmp_path):
    model = build(family, kind).eval()
    x = images(2)
    with torch.no_grad():
        expected = model(pixel_values=x).logits
    fast = copy.deepcopy(model).to(memory_format=torch.channels_last)  # raised on the PAD model's 5-D kernels
    weights = spatial_weights(fast)
    assert weights and all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
    with torch.no_grad():
        out = fast(pixel_values=x.contiguous(memory_format=torch.channels_last)).logits
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    fast.save_pretrained(tmp_path)
    again = AutoModelForImageClassification.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(pixel_values=x).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,kind", MODELS, ids=IDS)
def test_channels_last_gradients_equal_the_contiguous_ones(family, kind):
    """In eval mode (batch statistics of 4 images at MobileNetV2's 1x1 stages make train-mode gradients
    ill-conditioned: the plain model's differ by more than their size between layouts); a train step runs."""
    model = build(family, kind).eval()
    fast = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x, y = images(4), labels(4)
    model(pixel_values=x, labels=y).loss.backward()
    fast(pixel_values=x.contiguous(memory_format=torch.channels_last), labels=y).loss.backward()
    for (name, p), q in zip(model.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5 * float(p.grad.abs().max()), msg=name)
    fast.train()
    loss = fast(pixel_values=x.contiguous(memory_format=torch.channels_last), labels=y).loss
    loss.backward()
    assert bool(torch.isfinite(loss))


@pytest.mark.parametrize(
    "geometry",
    [
        dict(in_channels=8, out_channels=16, kernel_size=3, padding=1),
        dict(in_channels=8, out_channels=8, kernel_size=3, stride=2, padding=1, groups=8, bias=False),
        dict(in_channels=4, out_channels=8, kernel_size=(1, 3), padding="same"),
    ],
    ids=["3x3", "depthwise-stride2", "same"],
)
def test_layer_contact_as_nn_conv2d(geometry):
    """The layer alone, next to nn.Conv2d of the same geometry: channels_last, and an empty batch."""
    conv = nn.Conv2d(**geometry)
    pad = PADDynamicConv2d(**geometry, num_kernels=3)
    for tensor in (pad.expert_weight, pad.static_weight):
        nn.init.normal_(tensor.data)
    x = torch.randn(2, geometry["in_channels"], 9, 9)
    expected = pad(x)
    pad.to(memory_format=torch.channels_last)
    torch.testing.assert_close(pad(x.contiguous(memory_format=torch.channels_last)), expected)
    empty = x[:0]
    out = pad(empty)
    assert out.shape == conv(empty).shape == (0, *expected.shape[1:])
    out.sum().backward()  # as for nn.Conv2d: every parameter gets a (zero) gradient
    for name, parameter in pad.named_parameters():
        assert parameter.grad is not None and not bool(parameter.grad.any()), name


# ----------------------------------------------------------------------------- a batch of 0 images
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("family,kind", MODELS, ids=IDS)
def test_empty_batch_gives_the_plain_shapes(family, kind, mode):
    """`(0, num_labels)` logits and the plain model's hidden-state shapes; the loss over no example is NaN, as the
    plain model's (0/0), and backward runs."""
    model, plain = build(family, kind), build(family, "plain")
    getattr(model, mode)(), getattr(plain, mode)()
    out = model(pixel_values=images(0), labels=labels(0), output_hidden_states=True)
    reference = plain(pixel_values=images(0), labels=labels(0), output_hidden_states=True)
    assert out.logits.shape == reference.logits.shape == (0, NUM_LABELS)
    assert [h.shape for h in out.hidden_states] == [h.shape for h in reference.hidden_states]
    assert bool(torch.isnan(out.loss)) and bool(torch.isnan(reference.loss))
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- partition on an empty batch
@pytest.mark.parametrize("method", ["imp", "mp", "random"])
@pytest.mark.parametrize("family", sorted(BASES))
def test_partition_refuses_an_empty_batch_naming_it(family, method):
    model = build(family, "pad")
    good = {"pixel_values": images(4), "labels": labels(4)}
    empty = {"pixel_values": images(0), "labels": labels(0)}
    for batches, index in (([empty], 0), ([good, empty], 1)):
        with pytest.raises(
            ValueError,
            match=rf"Partition batch {index} is empty \(pixel_values has shape \(0, 3, 32, 32\)\): a batch of no "
            r"examples carries no information",
        ):
            partition_model(model, batches, method=method, dynamic_ratio=0.5, progress=False)
    assert not model.config.is_partitioned
    partition_model(model, [good], method=method, dynamic_ratio=0.5, rounds=1, progress=False)
    assert model.config.partition["method"] == method


def test_partition_refuses_an_empty_text_batch():
    base = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    model = pmt.PADMoEForSequenceClassification(pmt.PADMoEConfig.from_base(base, num_experts=2))
    empty = {"input_ids": torch.zeros(0, 8, dtype=torch.long), "labels": torch.zeros(0, dtype=torch.long)}
    with pytest.raises(ValueError, match=r"Partition batch 0 is empty \(input_ids has shape \(0, 8\)\)"):
        partition_model(model, [empty], progress=False)
