"""`PADDynamicConv2d` against an independent per-sample computation, its gradients, and bad inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pad_moe_transformers.core import named_pad_weights
from pad_moe_transformers.vision import KernelAttention, PADDynamicConv2d

CASES = {
    "plain_bias": {"in_channels": 6, "out_channels": 4, "kernel_size": 3, "padding": 1, "bias": True},
    "strided_no_bias": {"in_channels": 6, "out_channels": 8, "kernel_size": 3, "stride": 2, "padding": 1, "bias": 0},
    "depthwise": {"in_channels": 8, "out_channels": 8, "kernel_size": 3, "padding": 1, "groups": 8, "bias": False},
    "grouped_dilated": {
        "in_channels": 6, "out_channels": 6, "kernel_size": (3, 2), "padding": (2, 1), "dilation": 2, "groups": 3,
        "bias": True,
    },
    "pointwise": {"in_channels": 5, "out_channels": 7, "kernel_size": 1, "bias": False},
    "same_padding": {"in_channels": 4, "out_channels": 4, "kernel_size": 5, "padding": "same", "bias": True},
}


def randomized(args: dict, mode: str = "free", seed: int = 0) -> PADDynamicConv2d:
    """A layer with distinct random kernels, static weight, biases, a random mask and scale factors != 1."""
    torch.manual_seed(seed)
    layer = PADDynamicConv2d(**args, num_kernels=3, scale_factor_mode=mode, temperature=2.0)
    with torch.no_grad():
        layer.expert_weight.normal_()
        layer.static_weight.normal_()
        layer.mask.copy_(torch.rand(layer.mask.shape) < 0.4)
        if layer.expert_bias is not None:
            layer.expert_bias.normal_()
        for name, value in (("lambda_static", 0.7), ("lambda_dynamic", 1.6), ("scale_logit", 0.8)):
            if hasattr(layer, name):
                getattr(layer, name).fill_(value)
    return layer


def reference(layer: PADDynamicConv2d, x: torch.Tensor) -> torch.Tensor:
    """Independent computation: a Python loop over the samples, eq. 4 written out, `F.conv2d` per sample."""
    a = layer.attention
    pooled = x.mean(dim=(2, 3))
    pi = torch.softmax((pooled @ a.fc1.weight.T + a.fc1.bias).relu() @ a.fc2.weight.T + a.fc2.bias, -1)
    pi = torch.softmax(torch.log(pi) / float(a.temperature), -1)  # softmax(z / tau) == softmax(log softmax(z) / tau)
    l_s, l_d = layer.scale_factors()
    m = layer.mask.float()
    outs = []
    for b in range(x.shape[0]):
        mixture = sum(pi[b, i] * layer.expert_weight[i] for i in range(layer.num_kernels))
        weight = l_d * m * mixture + l_s * (1 - m) * layer.static_weight
        bias = None if layer.expert_bias is None else sum(pi[b, i] * layer.expert_bias[i] for i in range(3))
        outs.append(F.conv2d(x[b : b + 1], weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups))
    return torch.cat(outs)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", ["free", "sum2"])
def test_layer_equals_per_sample_reference(case, mode):
    layer = randomized(CASES[case], mode)
    x = torch.randn(5, layer.in_channels, 9, 8)
    with torch.no_grad():
        out, expected = layer(x), reference(layer, x)
        conv = nn.Conv2d(**CASES[case])
        assert out.shape == conv(x).shape  # the geometry of nn.Conv2d with the same arguments
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    # the kernel of each sample is eq. 4 of its mixture: `effective_weight(sum_i pi_i Theta_i)`
    pi = layer.attention_weights(x)
    mixture = torch.einsum("bk,k...->b...", pi, layer.expert_weight)
    torch.testing.assert_close(layer.sample_kernels(pi), layer.effective_weight(mixture), atol=1e-5, rtol=1e-5)


def test_unbatched_input():
    layer = randomized(CASES["plain_bias"])
    x = torch.randn(6, 7, 7)
    torch.testing.assert_close(layer(x), layer(x.unsqueeze(0)).squeeze(0))


def test_attention_is_dyconv_se_block():
    attention = KernelAttention(64, num_kernels=4, reduction=4, temperature=30.0)
    assert attention.hidden_channels == 16 and attention.fc2.out_features == 4
    assert KernelAttention(8).hidden_channels == 4  # floor of 4 units for thin layers
    pi = attention(torch.randn(3, 64, 5, 5))
    assert pi.shape == (3, 4)
    torch.testing.assert_close(pi.sum(-1), torch.ones(3))
    assert "temperature" not in attention.state_dict()  # schedule state, not a weight
    sharp = KernelAttention(64, temperature=0.05)
    sharp.load_state_dict(attention.state_dict())
    x = torch.randn(3, 64, 5, 5)
    assert sharp(x).max(-1).values.min() > attention(x).max(-1).values.max()  # lower tau: sharper attention


def test_gradients_follow_eq4():
    layer = randomized(CASES["grouped_dilated"])
    x = torch.randn(4, 6, 8, 8)
    layer(x).square().sum().backward()
    mask = layer.mask
    assert bool((layer.expert_weight.grad[:, ~mask] == 0).all())  # kernel entries eq. 4 does not read
    assert bool((layer.static_weight.grad[mask] == 0).all())  # static entries eq. 4 does not read
    assert bool((layer.expert_weight.grad[:, mask] != 0).all())
    assert bool((layer.static_weight.grad[~mask] != 0).all())
    for param in (layer.attention.fc1.weight, layer.attention.fc2.weight, layer.expert_bias):
        assert param.grad is not None and bool(param.grad.abs().sum() > 0)
    assert layer.lambda_static.grad.abs().item() > 0 and layer.lambda_dynamic.grad.abs().item() > 0


def test_from_dense_equals_dense_whatever_the_attention():
    torch.manual_seed(1)
    for args in CASES.values():
        dense = nn.Conv2d(**args)
        layer = PADDynamicConv2d.from_dense(dense, num_kernels=4)
        with torch.no_grad():
            layer.mask.copy_(torch.rand(layer.mask.shape) < 0.5)  # any mask: kernels == static
            layer.attention.fc2.weight.normal_(std=5.0)  # any attention
        x = torch.randn(3, dense.in_channels, 10, 9)
        torch.testing.assert_close(layer(x), dense(x), atol=1e-5, rtol=1e-5)


def test_named_pad_weights_lists_the_convs():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), PADDynamicConv2d(4, 4, 3), nn.ReLU(), PADDynamicConv2d(4, 2, 1))
    refs = named_pad_weights(model)
    assert [r.short_name for r in refs] == ["1", "3"]
    assert refs[0].module.expert_weight.shape == (4, 4, 4, 3, 3)


def test_bf16_autocast_train_step():
    layer = randomized(CASES["depthwise"], "sum2")
    x = torch.randn(2, 8, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    assert layer.expert_weight.grad.dtype == torch.float32 and torch.isfinite(layer.expert_weight.grad).all()
    assert bool((layer.expert_weight.grad[:, ~layer.mask] == 0).all())


def test_bad_inputs_have_clear_errors():
    layer = PADDynamicConv2d(6, 4, 3)
    with pytest.raises(ValueError, match=r"expected 6 input channels, got 5 \(input shape \(2, 5, 8, 8\)\)"):
        layer(torch.randn(2, 5, 8, 8))
    with pytest.raises(ValueError, match=r"\(batch, channels, height, width\).*got shape \(8, 8\)"):
        layer(torch.randn(8, 8))
    with pytest.raises(ValueError, match="divisible by groups"):
        PADDynamicConv2d(6, 4, 3, groups=4)
    with pytest.raises(ValueError, match="num_kernels must be an integer >= 1"):
        PADDynamicConv2d(6, 4, 3, num_kernels=0)
    with pytest.raises(ValueError, match="scale_factor_mode must be one of"):
        PADDynamicConv2d(6, 4, 3, scale_factor_mode="bogus")
    with pytest.raises(ValueError, match="not supported for strided"):
        PADDynamicConv2d(6, 4, 3, stride=2, padding="same")
    with pytest.raises(TypeError, match="expects an nn.Conv2d"):
        PADDynamicConv2d.from_dense(nn.Linear(3, 3))
