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


def test_layer_leaves_no_state_and_records_only_inside_a_record():
    """The layer is a pure function of its input: its routing decision goes to the active record, if any."""
    from pad_moe_transformers.routing_records import recording_routing

    moe = _random_layer()
    before = {k: v.clone() for k, v in moe.state_dict().items()}
    attributes = set(vars(moe))
    x = torch.randn(2, 4, 8)
    moe(x)  # outside a record: nothing is kept anywhere
    with recording_routing() as records:
        moe(x)
        moe(x)
    assert [r.layer for r in records] == [moe, moe]
    assert records[0].decision.logits.shape == (8, 4)
    assert set(vars(moe)) == attributes
    assert all(torch.equal(before[k], v) for k, v in moe.state_dict().items())


def test_gradients_flow_to_router_and_experts():
    moe = _random_layer()
    moe(torch.randn(2, 6, 8)).square().sum().backward()
    assert moe.router.weight.grad.abs().sum() > 0
    assert moe.fc_in.expert_weight.grad.abs().sum() > 0
    assert moe.fc_out.static_weight.grad.abs().sum() > 0


def test_eval_outputs_follow_every_kind_of_weight_edit():
    """No cached merge: eval outputs always equal the reference, after in-place edits through `.data`, optimizer
    steps, mask flips, `load_state_dict` and dtype moves (a cache keyed on version counters missed `.data` edits)."""
    moe = _random_layer()
    optimizer = torch.optim.AdamW(moe.parameters(), lr=0.1)
    x = torch.randn(2, 5, 8)

    def check():
        moe.eval()
        with torch.no_grad():
            torch.testing.assert_close(moe(x).double(), _reference(moe, x), rtol=1e-5, atol=1e-5)

    check()
    moe.fc_in.expert_weight.data.mul_(1.5)  # bypasses the version counter
    check()
    moe.fc_out.mask.logical_not_()
    check()
    moe.train()
    moe(x).square().mean().backward()
    optimizer.step()
    check()
    other = _random_layer()
    moe.load_state_dict(other.state_dict())
    check()
    moe.double().float()
    check()
