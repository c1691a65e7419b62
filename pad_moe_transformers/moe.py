"""`PADMoEFeedForward`: the PAD-MoE layer that replaces a dense FFN block.

    x (B, S, H) --router--> top-k experts and gates per token
      --group tokens by expert--> per expert e: act(x_e W1_e^T + b1_e) W2_e^T + b2_e   (W*_e from eq. 4)
      --gate-weighted scatter-add--> y (B, S, H)

Only the selected experts are computed, on the tokens routed to them (one matmul pair per expert
that received tokens, no per-token Python work). Padding tokens (attention mask 0) are not routed:
their FFN output is zero and they count neither in the auxiliary losses nor in expert usage.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .pad_linear import PADExpertLinear
from .router import TopKRouter, load_balancing_loss, router_z_loss


@dataclass
class RouterRecord:
    """What one call of a MoE layer leaves for the model to collect."""

    logits: Tensor
    """`(N_real, E)` fp32 router logits of the non-padding tokens."""
    aux_loss: Tensor
    z_loss: Tensor


class PADMoEFeedForward(nn.Module):
    def __init__(
        self,
        fc_in: PADExpertLinear,
        activation: nn.Module,
        fc_out: PADExpertLinear,
        router: TopKRouter,
        partition_granularity: str = "element",
    ) -> None:
        super().__init__()
        self.partition_granularity = partition_granularity
        self.router = router
        self.fc_in = fc_in
        self.activation = activation
        self.fc_out = fc_out
        self.num_experts = router.num_experts
        # (B, S) attention mask of the current forward, set by the PAD model; None = all tokens are real.
        self.token_mask: Tensor | None = None
        # Router records of the calls since the model last cleared them (ALBERT calls one layer many times).
        self.router_records: list[RouterRecord] = []
        self.register_buffer("expert_counts", torch.zeros(self.num_experts, dtype=torch.long), persistent=False)
        self._neuron_mask_cache: tuple[tuple, Tensor] | None = None
        self._neuron_weight_cache: tuple[tuple, dict] | None = None

    @classmethod
    def from_dense(
        cls,
        fc_in: nn.Linear,
        activation: nn.Module,
        fc_out: nn.Linear,
        *,
        num_experts: int,
        num_experts_per_tok: int,
        scale_factor_mode: str = "sum2",
        router_jitter_noise: float = 0.0,
        router_init_std: float = 0.02,
        partition_granularity: str = "element",
    ) -> "PADMoEFeedForward":
        """Upcycle a dense FFN: each expert and the static weights start equal to it; the router is random."""
        router = TopKRouter(
            fc_in.in_features,
            num_experts,
            num_experts_per_tok,
            router_jitter_noise,
            device=fc_in.weight.device,
            dtype=fc_in.weight.dtype,
        )
        if fc_in.weight.device.type != "meta":
            router.reset_parameters(router_init_std)
        neuron = partition_granularity == "neuron"
        return cls(
            PADExpertLinear.from_dense(fc_in, num_experts, scale_factor_mode, shared_static_bias=neuron),
            activation,
            PADExpertLinear.from_dense(fc_out, num_experts, scale_factor_mode),
            router,
            partition_granularity,
        )

    def forward(self, hidden_states: Tensor) -> Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # (N, H)
        real = self._real_token_index(shape)  # (N_real,) or None
        x_routed = x if real is None else x[real]

        decision = self.router(x_routed)
        self.router_records.append(
            RouterRecord(
                logits=decision.logits,
                aux_loss=load_balancing_loss(decision.probs, decision.experts, self.num_experts),
                z_loss=router_z_loss(decision.logits),
            )
        )
        with torch.no_grad():
            self.expert_counts += torch.bincount(decision.experts.reshape(-1), minlength=self.num_experts)

        y_routed = self._experts_forward(x_routed, decision.gates, decision.experts)
        if real is None:
            return y_routed.reshape(shape)
        y = x.new_zeros(x.shape)
        y[real] = y_routed
        return y.reshape(shape)

    def _real_token_index(self, shape: torch.Size) -> Tensor | None:
        mask = self.token_mask
        if mask is None or tuple(mask.shape) != tuple(shape[:-1]) or bool(mask.all()):
            return None
        return mask.reshape(-1).nonzero(as_tuple=True)[0]

    def _experts_forward(self, x: Tensor, gates: Tensor, experts: Tensor) -> Tensor:
        """`x` `(N, H)`, `gates`/`experts` `(N, k)` -> gate-weighted sum of the selected experts `(N, H)`."""
        if self.partition_granularity == "neuron":
            return self._neuron_experts_forward(x, gates, experts)
        weight_in, weight_out = self._expert_weights()

        def expert_fn(expert: int, x_e: Tensor) -> Tensor:
            h = self.activation(nn.functional.linear(x_e, weight_in(expert), self.fc_in.expert_bias_of(expert)))
            return nn.functional.linear(h, weight_out(expert), self.fc_out.expert_bias_of(expert))

        return self._dispatch(x, gates, experts, expert_fn)

    def _dispatch(self, x: Tensor, gates: Tensor, experts: Tensor, expert_fn) -> Tensor:
        """Group the `N * k` token slots by expert, run `expert_fn(e, x_e)` once per expert that got
        tokens, and scatter-add the gate-weighted results back to `(N, H)`."""
        num_tokens, k = experts.shape
        flat_experts = experts.reshape(-1)  # (N*k,)
        order = torch.argsort(flat_experts, stable=True)
        token_of_slot = torch.arange(num_tokens, device=x.device).repeat_interleave(k)[order]
        gate_of_slot = gates.reshape(-1)[order]
        counts = torch.bincount(flat_experts, minlength=self.num_experts).tolist()
        x_sorted = x[token_of_slot]  # (N*k, H), grouped by expert
        outputs = []
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            outputs.append(expert_fn(expert, x_sorted[start : start + count]))
            start += count
        if not outputs:
            return x.new_zeros(x.shape)
        y_sorted = torch.cat(outputs) * gate_of_slot.unsqueeze(-1).to(x.dtype)
        return x.new_zeros(x.shape).index_add_(0, token_of_slot, y_sorted)

    def _expert_weights(self):
        """Two callables `expert -> (out, in)` weight of eq. 4 for fc_in and fc_out.

        Under inference (eval mode, no autograd) the merged weights of all experts are cached and
        reused, so a PAD layer costs what a plain MoE layer costs. In training all experts' weights
        are formed by one fused autograd node per linear (`merged_weights_for_training`).
        """
        if self._use_inference_cache():
            merged_in = self.fc_in.merged_weights_for_inference()
            merged_out = self.fc_out.merged_weights_for_inference()
            return merged_in.__getitem__, merged_out.__getitem__
        if self.fc_in.soft_mask is not None:  # IMP scoring: the relaxed mask needs the generic path
            static_in, static_out = self.fc_in.static_term(), self.fc_out.static_term()
            return (
                lambda e: self.fc_in.expert_weight_eff(e, static_in),
                lambda e: self.fc_out.expert_weight_eff(e, static_out),
            )
        merged_in = self.fc_in.merged_weights_for_training()
        merged_out = self.fc_out.merged_weights_for_training()
        return merged_in.__getitem__, merged_out.__getitem__

    def _use_inference_cache(self) -> bool:
        return not self.training and not torch.is_grad_enabled() and self.fc_in.soft_mask is None

    # --- neuron-structured PAD -------------------------------------------------------------
    def neuron_mask(self) -> Tensor:
        """`(I,)` bool, True = dynamic intermediate neuron. Requires a neuron-structured mask:
        fc_in rows and fc_out columns of one neuron all dynamic or all static."""
        key = tuple((m.data_ptr(), m._version) for m in (self.fc_in.mask, self.fc_out.mask))
        if self._neuron_mask_cache is None or self._neuron_mask_cache[0] != key:
            neurons = self.fc_in.mask.any(dim=1)
            if not (
                torch.equal(self.fc_in.mask, neurons.unsqueeze(1).expand_as(self.fc_in.mask))
                and torch.equal(self.fc_out.mask, neurons.unsqueeze(0).expand_as(self.fc_out.mask))
            ):
                raise ValueError(
                    "partition_granularity='neuron' needs neuron-structured masks (whole rows of fc_in.mask and the "
                    "matching columns of fc_out.mask); set them with `set_neuron_mask` or a neuron-granularity partition."
                )
            self._neuron_mask_cache = (key, neurons)
        return self._neuron_mask_cache[1]

    def set_neuron_mask(self, neurons: Tensor) -> None:
        """Make the neurons where `neurons` `(I,)` is True dynamic and the others static."""
        neurons = neurons.to(device=self.fc_in.mask.device, dtype=torch.bool)
        with torch.no_grad():
            self.fc_in.mask.copy_(neurons.unsqueeze(1).expand_as(self.fc_in.mask))
            self.fc_out.mask.copy_(neurons.unsqueeze(0).expand_as(self.fc_out.mask))

    def _neuron_weights(self) -> dict[str, Tensor | None]:
        """Eq. 4 restricted to whole neurons: static slices once, dynamic slices per expert."""
        dynamic = self.neuron_mask()
        dyn, sta = dynamic.nonzero(as_tuple=True)[0], (~dynamic).nonzero(as_tuple=True)[0]
        l_s_in, l_d_in = self.fc_in.scale_factors()
        l_s_out, l_d_out = self.fc_out.scale_factors()
        fc_in, fc_out = self.fc_in, self.fc_out
        return {
            "static_in": l_s_in * fc_in.static_weight[sta],  # (I_s, H)
            "static_in_bias": None if fc_in.static_bias is None else fc_in.static_bias[sta],  # (I_s,)
            "static_out": l_s_out * fc_out.static_weight[:, sta],  # (H, I_s)
            "expert_in": l_d_in * fc_in.expert_weight[:, dyn],  # (E, I_d, H)
            "expert_in_bias": None if fc_in.expert_bias is None else fc_in.expert_bias[:, dyn],  # (E, I_d)
            "expert_out": l_d_out * fc_out.expert_weight[:, :, dyn],  # (E, H, I_d)
        }

    def _neuron_experts_forward(self, x: Tensor, gates: Tensor, experts: Tensor) -> Tensor:
        """Static neurons share their weights across experts, so their contribution is computed once
        per token (weighted by the sum of the selected gates, which is 1); only the dynamic neurons
        are computed per expert, as smaller dense matmuls."""
        if self._use_inference_cache():
            key = tuple((t.data_ptr(), t._version) for t in (self.fc_in.mask, self.fc_out.mask, *self.parameters()))
            if self._neuron_weight_cache is None or self._neuron_weight_cache[0] != key:
                with torch.no_grad():
                    self._neuron_weight_cache = (key, self._neuron_weights())
            w = self._neuron_weight_cache[1]
        else:
            w = self._neuron_weights()

        def expert_fn(expert: int, x_e: Tensor) -> Tensor:
            bias = None if w["expert_in_bias"] is None else w["expert_in_bias"][expert]
            h = self.activation(nn.functional.linear(x_e, w["expert_in"][expert], bias))
            return nn.functional.linear(h, w["expert_out"][expert], self.fc_out.expert_bias_of(expert))

        y = self._dispatch(x, gates, experts, expert_fn)
        if w["static_in"].shape[0] > 0:
            h_static = self.activation(nn.functional.linear(x, w["static_in"], w["static_in_bias"]))
            y = y + nn.functional.linear(h_static, w["static_out"])
        return y

    def train(self, mode: bool = True) -> "PADMoEFeedForward":
        self._neuron_weight_cache = None
        return super().train(mode)

    def pad_linears(self) -> dict[str, PADExpertLinear]:
        return {"fc_in": self.fc_in, "fc_out": self.fc_out}

    def reset_expert_usage(self) -> None:
        self.expert_counts.zero_()
