"""The grouped PAD-MoE layer against a straightforward per-token computation."""

from __future__ import annotations

import torch
from torch import nn

from pad_moe_transformers import PADMoEFeedForward


def _random_layer(hidden=8, inter=12, num_experts=4, k=2) -> PADMoEFeedForward:
    moe = PADMoEFeedForward.from_dense(
        nn.Linear(hidden, inter), nn.GELU(), nn.Linear(inter, hidden), num_experts=num_experts, num_experts_per_tok=k
    )
    with torch.no_grad():  # make experts, static weights, masks and scales all different
        for linear in (moe.fc_in, moe.fc_out):
            linear.expert_weight.normal_()
            linear.static_weight.normal_()
            linear.expert_bias.normal_()
            linear.mask.copy_(torch.rand_like(linear.mask, dtype=torch.float) < 0.5)
            linear.scale_logit.fill_(0.4)
        moe.router.weight.normal_()
    return moe


def _reference(moe: PADMoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """Per token, per selected expert, with eq. 4 written out."""
    tokens = x.reshape(-1, x.shape[-1])
    probs = torch.softmax(tokens.double() @ moe.router.weight.double().T, dim=-1)
    out = torch.zeros_like(tokens, dtype=torch.double)

    def eff(linear, e):
        l_d = 2 * torch.sigmoid(linear.scale_logit.double())
        m = linear.mask.double()
        return l_d * m * linear.expert_weight[e].double() + (2 - l_d) * (1 - m) * linear.static_weight.double()

    for t in range(tokens.shape[0]):
        top = torch.topk(probs[t], moe.router.top_k_experts)
        gates = top.values / top.values.sum()
        for gate, e in zip(gates, top.indices.tolist()):
            h = nn.functional.gelu(tokens[t].double() @ eff(moe.fc_in, e).T + moe.fc_in.expert_bias[e].double())
            out[t] += gate * (h @ eff(moe.fc_out, e).T + moe.fc_out.expert_bias[e].double())
    return out.reshape(x.shape)


def test_grouped_forward_matches_per_token_reference():
    moe = _random_layer()
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(moe(x).double(), _reference(moe, x), rtol=1e-5, atol=1e-5)
    assert moe.expert_counts.sum().item() == 3 * 5 * 2


def test_padding_tokens_are_not_routed():
    moe = _random_layer()
    x = torch.randn(2, 4, 8)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    moe.token_mask = mask
    y = moe(x)
    assert torch.all(y[0, 2:] == 0)
    torch.testing.assert_close(y[mask].double(), _reference(moe, x)[mask], rtol=1e-5, atol=1e-5)
    record = moe.router_records[-1]
    assert record.logits.shape == (6, 4)
    assert moe.expert_counts.sum().item() == 6 * 2


def test_gradients_flow_to_router_and_experts():
    moe = _random_layer()
    moe(torch.randn(2, 6, 8)).square().sum().backward()
    assert moe.router.weight.grad.abs().sum() > 0
    assert moe.fc_in.expert_weight.grad.abs().sum() > 0
    assert moe.fc_out.static_weight.grad.abs().sum() > 0


def test_inference_cache_matches_and_invalidates():
    moe = _random_layer().eval()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        cached = moe(x)
        assert moe.fc_in._merged_cache is not None
        first = moe.fc_in._merged_cache[1]
        moe(x)
        assert moe.fc_in._merged_cache[1] is first, "unchanged weights must reuse the cached merge"
        torch.testing.assert_close(cached.double(), _reference(moe, x), rtol=1e-5, atol=1e-5)
        # An in-place update (as an optimizer step does) must invalidate the cache.
        moe.fc_in.expert_weight.mul_(1.5)
        moe.fc_out.mask.logical_not_()
        torch.testing.assert_close(moe(x).double(), _reference(moe, x), rtol=1e-5, atol=1e-5)
    moe.train()
    assert moe.fc_in._merged_cache is None
    with torch.enable_grad():  # with autograd the cache is not used: gradients must reach the weights
        moe.eval()(x).sum().backward()
    assert moe.fc_in.expert_weight.grad is not None


def test_inference_cache_tracks_optimizer_steps():
    moe = _random_layer()
    optimizer = torch.optim.AdamW(moe.parameters(), lr=0.1)
    x = torch.randn(2, 5, 8)
    for _ in range(2):
        moe.eval()
        with torch.no_grad():
            torch.testing.assert_close(moe(x).double(), _reference(moe, x), rtol=1e-5, atol=1e-5)
        moe.train()
        moe(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    moe.eval()
    with torch.no_grad():  # no train() call in between: the version counters alone must catch the step
        moe(x)
        moe.train(False)
        moe(x).square().mean()
        optimizer.step()  # grads are None -> nothing changes, cache stays valid
        for p in moe.parameters():
            p.add_(0.01)
        torch.testing.assert_close(moe(x).double(), _reference(moe, x), rtol=1e-5, atol=1e-5)
