"""Top-k token router and its auxiliary losses.

The router always runs in fp32 (also under autocast and for bf16 weights): a softmax over all
experts, the top-k experts per token, and their gates renormalised to sum to 1 -- with equal
experts, the MoE output then equals the dense FFN output exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class RoutingDecision:
    logits: Tensor
    """`(N, E)` fp32 router logits."""
    probs: Tensor
    """`(N, E)` fp32 softmax over all experts."""
    gates: Tensor
    """`(N, k)` fp32 weights of the selected experts, summing to 1 per token."""
    experts: Tensor
    """`(N, k)` int64 indices of the selected experts."""


class TopKRouter(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        num_experts_per_tok: int,
        jitter_noise: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k_experts = num_experts_per_tok
        self.jitter_noise = jitter_noise
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, device=device, dtype=dtype))

    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=std)

    def forward(self, hidden_states: Tensor) -> RoutingDecision:
        """`hidden_states`: `(N, H)` tokens -> routing decision for each token."""
        with torch.autocast(device_type=hidden_states.device.type, enabled=False):
            x = hidden_states.float()
            if self.training and self.jitter_noise > 0:
                x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
            logits = F.linear(x, self.weight.float())
            probs = logits.softmax(dim=-1)
            top_probs, experts = probs.topk(self.top_k_experts, dim=-1)
            gates = top_probs / top_probs.sum(dim=-1, keepdim=True)
        return RoutingDecision(logits=logits, probs=probs, gates=gates, experts=experts)


def _token_weights(weights: Tensor | None, reference: Tensor) -> Tensor:
    """`(N, 1)` fp32 weights of the tokens (1 = real, 0 = padding; all 1 when `weights` is None)."""
    if weights is None:
        return reference.new_ones(reference.shape[0], 1, dtype=torch.float32)
    return weights.reshape(-1, 1).to(device=reference.device, dtype=torch.float32)


def load_balancing_loss(
    probs: Tensor, experts: Tensor, num_experts: int, token_weights: Tensor | None = None
) -> Tensor:
    """Switch-Transformer load-balancing loss, extended to top-k.

    ``loss = E * sum_e f_e * P_e`` where ``f_e`` is the fraction of the ``N * k`` token-to-expert
    assignments that go to expert ``e`` and ``P_e`` the mean router probability of ``e``.
    It is 1.0 for perfectly balanced routing and ``E`` when every token picks the same expert
    with probability 1.

    Args:
        probs: `(N, E)` router probabilities.
        experts: `(N, k)` selected expert indices of the same tokens.
        token_weights: `(N,)` 1 for the tokens that count, 0 for padding (as Transformers'
            `load_balancing_loss_func` uses the attention mask); None = all tokens count.
    """
    if probs.shape[0] == 0:
        return probs.new_zeros(())
    weights = _token_weights(token_weights, probs)  # (N, 1)
    num_real = weights.sum().clamp_min(1.0)
    assigned = F.one_hot(experts, num_experts).to(probs.dtype).sum(dim=1)  # (N, E): slots of each token per expert
    fraction = (assigned * weights).sum(dim=0) / (num_real * experts.shape[-1])
    mean_probs = (probs * weights).sum(dim=0) / num_real
    return num_experts * torch.sum(fraction * mean_probs)


def router_z_loss(logits: Tensor, token_weights: Tensor | None = None) -> Tensor:
    """ST-MoE z-loss: mean over the tokens that count of ``logsumexp(logits)^2``; keeps router logits small."""
    if logits.shape[0] == 0:
        return logits.new_zeros(())
    weights = _token_weights(token_weights, logits)[:, 0]
    return (torch.logsumexp(logits, dim=-1).square() * weights).sum() / weights.sum().clamp_min(1.0)


def real_tokens(decision: RoutingDecision, token_mask: Tensor | None) -> RoutingDecision:
    """The decision restricted to the real (non-padding) tokens: `token_mask` `(N,)` bool, None = all real.

    For analysis; the model's losses weight tokens by the mask instead (no data-dependent shapes).
    """
    if token_mask is None:
        return decision
    return RoutingDecision(
        logits=decision.logits[token_mask],
        probs=decision.probs[token_mask],
        gates=decision.gates[token_mask],
        experts=decision.experts[token_mask],
    )


def expert_counts(experts: Tensor, num_experts: int, token_weights: Tensor | None = None) -> Tensor:
    """`(E,)` int64: top-k slots assigned to each expert by `experts` `(N, k)` (tokens of weight 0 left out)."""
    assigned = F.one_hot(experts, num_experts).sum(dim=1)  # (N, E)
    if token_weights is not None:
        assigned = assigned * (token_weights.reshape(-1, 1) != 0).to(assigned.dtype)
    return assigned.sum(dim=0)
