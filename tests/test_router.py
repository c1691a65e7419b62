"""Top-k renormalisation and the auxiliary losses against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from pad_moe_transformers import TopKRouter, load_balancing_loss, router_z_loss


def _router_with_logits(logits: torch.Tensor, k: int) -> tuple[TopKRouter, torch.Tensor]:
    """A router whose weight is the identity, so the router logits equal the input."""
    num_experts = logits.shape[-1]
    router = TopKRouter(num_experts, num_experts, k)
    with torch.no_grad():
        router.weight.copy_(torch.eye(num_experts))
    return router, logits


def test_top2_gates_renormalised_by_hand():
    router, x = _router_with_logits(torch.tensor([[math.log(4.0), math.log(3.0), math.log(2.0), 0.0]]), k=2)
    decision = router(x)
    # softmax = [4, 3, 2, 1] / 10 -> top-2 = experts 0, 1 with probs .4, .3 -> gates 4/7, 3/7
    assert decision.experts.tolist() == [[0, 1]]
    torch.testing.assert_close(decision.probs, torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    torch.testing.assert_close(decision.gates, torch.tensor([[4 / 7, 3 / 7]]))
    torch.testing.assert_close(decision.gates.sum(-1), torch.ones(1))


def test_aux_loss_by_hand():
    # 2 tokens, 4 experts, top-2.
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.5, 0.3, 0.1]])
    experts = torch.tensor([[0, 1], [1, 2]])
    # assignments: e0 1, e1 2, e2 1, e3 0 of 4 -> f = [.25, .5, .25, 0]
    # mean probs P = [.25, .4, .25, .1]
    # loss = 4 * (.25*.25 + .5*.4 + .25*.25 + 0) = 4 * .325 = 1.3
    assert load_balancing_loss(probs, experts, 4).item() == pytest.approx(1.3)


def test_aux_loss_is_one_when_balanced_and_E_when_collapsed():
    uniform = torch.full((8, 4), 0.25)
    balanced = torch.tensor([[0, 1], [2, 3]] * 4)
    assert load_balancing_loss(uniform, balanced, 4).item() == pytest.approx(1.0)
    collapsed_probs = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 8)
    collapsed = torch.tensor([[0, 0]] * 8)
    assert load_balancing_loss(collapsed_probs, collapsed, 4).item() == pytest.approx(4.0)


def test_z_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # logsumexp: log 2, log 4 -> mean of squares
    expected = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected)


def test_empty_token_set_gives_zero_losses():
    assert load_balancing_loss(torch.zeros(0, 4), torch.zeros(0, 2, dtype=torch.long), 4).item() == 0.0
    assert router_z_loss(torch.zeros(0, 4)).item() == 0.0


def test_router_runs_in_fp32_under_autocast_and_bf16_weights():
    router = TopKRouter(8, 4, 2, dtype=torch.bfloat16)
    router.reset_parameters()
    x = torch.randn(5, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        decision = router(x)
    assert decision.logits.dtype == torch.float32
    assert decision.gates.dtype == torch.float32
    torch.testing.assert_close(decision.gates.sum(-1), torch.ones(5))


def test_jitter_only_in_training():
    router = TopKRouter(8, 4, 2, jitter_noise=0.5)
    router.reset_parameters()
    x = torch.randn(5, 8)
    router.eval()
    torch.testing.assert_close(router(x).logits, router(x).logits)
    router.train()
    assert not torch.allclose(router(x).logits, router(x).logits)
