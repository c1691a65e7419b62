"""Eq. 4 of the paper, checked against an independent computation, and where gradients go."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pad_moe_transformers import PADExpertLinear


def _random_pad_linear(mode: str, num_experts: int = 3, out_features: int = 5, in_features: int = 4) -> PADExpertLinear:
    linear = PADExpertLinear(in_features, out_features, num_experts, scale_factor_mode=mode)
    with torch.no_grad():
        linear.expert_weight.normal_()
        linear.static_weight.normal_()
        linear.expert_bias.normal_()
        linear.mask.copy_(torch.rand(out_features, in_features) < 0.5)
        for name, param in linear.named_parameters():
            if name in ("scale_logit", "lambda_static", "lambda_dynamic"):
                param.copy_(torch.rand(()) * 2 - 0.5)
    return linear


def _reference_scales(linear: PADExpertLinear) -> tuple[float, float]:
    mode = linear.scale_factor_mode
    if mode == "sum2":
        l_d = 2 / (1 + torch.exp(-linear.scale_logit.detach())).item()
        return 2 - l_d, l_d
    l_s = linear.lambda_static.item() if mode in ("static_only", "free") else 1.0
    l_d = linear.lambda_dynamic.item() if mode in ("dynamic_only", "free") else 1.0
    return l_s, l_d


@pytest.mark.parametrize("mode", ["sum2", "none", "static_only", "dynamic_only", "free"])
def test_eq4_matches_independent_computation(mode):
    linear = _random_pad_linear(mode)
    l_s, l_d = _reference_scales(linear)
    mask = linear.mask.double()
    for expert in range(linear.num_experts):
        expected = l_d * mask * linear.expert_weight[expert].double() + l_s * (1 - mask) * linear.static_weight.double()
        torch.testing.assert_close(linear.effective_weight()[expert].double(), expected, rtol=1e-6, atol=1e-6)


def test_sum2_scales_start_at_one_and_sum_to_two():
    linear = PADExpertLinear(4, 5, 2, scale_factor_mode="sum2")
    l_s, l_d = linear.scale_factors()
    assert l_s.item() == pytest.approx(1.0) and l_d.item() == pytest.approx(1.0)
    with torch.no_grad():
        linear.scale_logit.fill_(1.3)
    l_s, l_d = linear.scale_factors()
    assert (l_s + l_d).item() == pytest.approx(2.0)
    assert l_d.item() > 1.0


def test_soft_mask_path_equals_binary_path():
    linear = _random_pad_linear("sum2")
    hard = linear.effective_weight().detach()
    linear.soft_mask = linear.mask.float().requires_grad_(True)
    soft = linear.effective_weight()
    torch.testing.assert_close(hard, soft.detach())
    soft.sum().backward()
    assert linear.soft_mask.grad is not None and linear.soft_mask.grad.abs().sum() > 0


def test_gradients_reach_only_dynamic_expert_and_static_entries():
    linear = _random_pad_linear("sum2")
    x = torch.randn(7, linear.in_features)
    loss = sum(
        nn.functional.linear(x, linear.effective_weight()[e], linear.expert_bias_of(e)).square().sum()
        for e in range(linear.num_experts)
    )
    loss.backward()
    mask = linear.mask
    expert_grad = linear.expert_weight.grad
    assert torch.all(expert_grad[:, ~mask] == 0), "experts must get no gradient where M = 0"
    assert torch.all(expert_grad[:, mask] != 0), "experts must get gradient where M = 1"
    assert torch.all(linear.static_weight.grad[mask] == 0), "static weight must get no gradient where M = 1"
    assert torch.all(linear.static_weight.grad[~mask] != 0), "static weight must get gradient where M = 0"
    assert linear.scale_logit.grad is not None and linear.scale_logit.grad.abs() > 0
    assert "mask" not in dict(linear.named_parameters()), "the mask is a buffer, never trained"


def test_upcycled_linear_equals_dense_for_any_mask():
    dense = nn.Linear(6, 5)
    linear = PADExpertLinear.from_dense(dense, num_experts=4)
    linear.mask.copy_(torch.rand(5, 6) < 0.3)
    for expert in range(4):
        torch.testing.assert_close(linear.effective_weight()[expert], dense.weight.detach())
        torch.testing.assert_close(linear.expert_bias_of(expert), dense.bias.detach())


@pytest.mark.parametrize("mode", ["sum2", "none", "static_only", "dynamic_only", "free"])
def test_fused_eq4_matches_autograd_reference(mode):
    """The fused backward of eq. 4 (boolean mask) against plain autograd of `where(M, l_d W, l_s W_static)`."""
    linear = _random_pad_linear(mode)
    upstream = torch.randn(linear.num_experts, linear.out_features, linear.in_features)
    fused = linear.effective_weight()
    l_s, l_d = linear.scale_factors()
    reference = torch.where(linear.mask, l_d * linear.expert_weight, l_s * linear.static_weight)
    torch.testing.assert_close(fused, reference)
    params = [p for p in linear.parameters() if p.requires_grad]
    grads_fused = torch.autograd.grad((fused * upstream).sum(), params, allow_unused=True)
    grads_ref = torch.autograd.grad((reference * upstream).sum(), params, allow_unused=True)
    for name, a, b in zip([n for n, p in linear.named_parameters() if p.requires_grad], grads_fused, grads_ref):
        if b is None:
            assert a is None or torch.all(a == 0), name
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("mode", ["sum2", "none", "static_only", "dynamic_only", "free"])
def test_scale_factors_are_1d_parameters_read_as_0d(mode):
    """FSDP1/FSDP2 refuse 0-d parameters: the scale factors are `(1,)`; `scale_factors()` stays 0-d."""
    linear = _random_pad_linear(mode)
    names = {"sum2": ["scale_logit"], "none": [], "static_only": ["lambda_static"],
             "dynamic_only": ["lambda_dynamic"], "free": ["lambda_static", "lambda_dynamic"]}[mode]
    assert [n for n, p in linear.named_parameters() if p.numel() == 1] == names
    assert all(getattr(linear, n).shape == (1,) for n in names)
    l_s, l_d = linear.scale_factors()
    assert l_s.shape == l_d.shape == ()
    assert (l_s.item(), l_d.item()) == pytest.approx(_reference_scales(linear))
    if names:
        (l_s * 2 + l_d * 3).backward()  # the gradients reach the (1,) parameters
    for name in names:
        assert getattr(linear, name).grad.shape == (1,) and getattr(linear, name).grad.abs().item() > 0


@pytest.mark.parametrize("mode", ["sum2", "static_only", "dynamic_only", "free"])
def test_load_state_dict_accepts_0d_scale_factors(mode):
    """State dicts (and checkpoint files) hold the scale factors as 0-d tensors: they load into `(1,)`."""
    linear = _random_pad_linear(mode)
    old = {k: (v.reshape(()) if v.numel() == 1 else v) for k, v in linear.state_dict().items()}
    assert any(v.dim() == 0 for v in old.values())
    fresh = PADExpertLinear(linear.in_features, linear.out_features, linear.num_experts, scale_factor_mode=mode)
    fresh.load_state_dict(old)
    for key, value in linear.state_dict().items():
        assert fresh.state_dict()[key].shape == value.shape and torch.equal(fresh.state_dict()[key], value), key
    assert torch.equal(fresh.effective_weight(), linear.effective_weight())
    fresh.load_state_dict(linear.state_dict())  # and the (1,) tensors of its own state dict
    with pytest.raises(RuntimeError, match="size mismatch"):
        fresh.load_state_dict({**old, next(k for k in old if old[k].dim() == 0): torch.zeros(2)})


def test_load_state_dict_decodes_compact_and_moe_entries():
    """`load_state_dict` reads the tensors of a checkpoint file (Trainer's resume): compact or plain-MoE entries."""
    from pad_moe_transformers.core.compact import encode_compact

    linear = _random_pad_linear("sum2")
    state = dict(linear.state_dict())
    compact = {k: v for k, v in state.items() if k not in ("expert_weight", "static_weight", "mask")}
    compact.update(encode_compact(state["expert_weight"], state["static_weight"], state["mask"]))
    fresh = PADExpertLinear(linear.in_features, linear.out_features, linear.num_experts)
    fresh.load_state_dict(compact)
    assert torch.equal(fresh.mask, linear.mask)
    assert torch.equal(fresh.effective_weight(), linear.effective_weight())

    moe = {k: v for k, v in state.items() if k not in ("static_weight", "mask")}
    fresh.load_state_dict(moe)
    assert bool(fresh.mask.all()) and torch.equal(fresh.expert_weight, linear.expert_weight)
    torch.testing.assert_close(fresh.static_weight, linear.expert_weight.mean(dim=0))
