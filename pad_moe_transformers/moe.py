"""`PADMoEFeedForward`: the PAD-MoE layer that replaces a dense FFN block.

    x (B, S, H) --router--> top-k experts and gates per token
      --eq. 4--> expert weights W1 (E, I, H), W2 (E, H, I) (`PADExpertLinear.effective_weight`)
      --Transformers' experts backend (`experts.py`)--> sum_k gate_k * (act(x W1_e^T + b1_e) W2_e^T + b2_e)   (B, S, H)

Only the selected experts are computed, on the tokens routed to them. With the default backend
(``grouped_mm``) the forward has no host synchronisation and no data-dependent Python control flow.
Every token is routed, padding included, as in Mixtral: the layer is a pure function of its input, so
gradient checkpointing can recompute it and two threads can share it. The model leaves padding out of the
auxiliary losses and expert usage (it has the attention mask); real tokens never read the outputs at
padding positions.

The routing decision reaches the model through `routing_records` (context-local), not module state.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig

from ._compat import get_experts_implementation
from .core.inference import MERGE_CACHE, inference_value
from .core.pad_weight import COMPACT_STORAGE
from .experts import ExpertWeights, run_experts
from .pad_linear import PADExpertLinear
from .router import TopKRouter
from .routing_records import record_routing


class PADMoEFeedForward(nn.Module):
    def __init__(
        self,
        fc_in: PADExpertLinear,
        activation: nn.Module,
        fc_out: PADExpertLinear,
        router: TopKRouter,
        partition_granularity: str = "element",
        config: PretrainedConfig | None = None,
    ) -> None:
        super().__init__()
        # The model's config, read for `_experts_implementation` (as Transformers' `use_experts_implementation`
        # keeps it on an experts module); None for a standalone layer (eager experts).
        self.config = config
        self.partition_granularity = partition_granularity
        self.router = router
        self.fc_in = fc_in
        self.activation = activation
        self.fc_out = fc_out
        self.num_experts = router.num_experts
        self._pad_merge_cache = None  # the neuron slices of merged fc_in / fc_out (`_neuron_experts_forward`)
        self._pad_frozen_keys = None  # set by `export.frozen_pad_weights` (`core.inference.freeze`)

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
        config: PretrainedConfig | None = None,
    ) -> PADMoEFeedForward:
        """Upcycle a dense FFN: each expert and the static weights start equal to it; the router is random."""
        router = TopKRouter(
            fc_in.in_features,
            num_experts,
            num_experts_per_tok,
            router_jitter_noise,
            device=fc_in.weight.device,
            dtype=torch.float32,  # the router is fp32 whatever the model's dtype (see router.py)
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
            config,
        )

    @property
    def experts_implementation(self) -> str:
        """The experts backend (`experts.py`): the model config's `_experts_implementation`, set by
        `from_pretrained(..., experts_implementation=...)` / `set_experts_implementation`; eager standalone."""
        return get_experts_implementation(self.config) or "eager"

    def forward(self, hidden_states: Tensor) -> Tensor:
        """`(..., H)` -> `(..., H)`; the routing decision goes to the active routing record."""
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # (N, H)
        decision = self.router(x)
        record_routing(self, decision)
        if self.partition_granularity == "neuron":
            y = self._neuron_experts_forward(x, decision.gates, decision.experts)
        else:
            y = run_experts(self.experts_implementation, self.expert_weights(), x, decision.experts, decision.gates)
        return y.reshape(shape)

    def expert_weights(self) -> ExpertWeights:
        """The experts of the element form for this forward: eq. 4 weights `(E, I, H)` / `(E, H, I)` and biases.
        Under autocast the experts run in its dtype (`ExpertWeights.to_autocast_dtype`): eq. 4 is asked for in it."""
        device_type = self.fc_in.mask.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        return ExpertWeights(
            self.fc_in.effective_weight(dtype=dtype),
            self.fc_out.effective_weight(dtype=dtype),
            self.fc_in.effective_bias(),
            self.fc_out.effective_bias(),
            self.activation,
        )

    # --- neuron-structured PAD -------------------------------------------------------------
    def neuron_mask(self) -> Tensor:
        """`(I,)` bool, True = dynamic intermediate neuron. Requires a neuron-structured mask:
        fc_in rows and fc_out columns of one neuron all dynamic or all static."""
        neurons = self.fc_in.mask.any(dim=1)
        if not (
            torch.equal(self.fc_in.mask, neurons.unsqueeze(1).expand_as(self.fc_in.mask))
            and torch.equal(self.fc_out.mask, neurons.unsqueeze(0).expand_as(self.fc_out.mask))
        ):
            raise ValueError(
                "partition_granularity='neuron' needs neuron-structured masks (whole rows of fc_in.mask and the "
                "matching columns of fc_out.mask); set them with `set_neuron_mask` or a neuron-granularity partition."
            )
        return neurons

    def set_neuron_mask(self, neurons: Tensor) -> None:
        """Make the neurons where `neurons` `(I,)` is True dynamic and the others static."""
        neurons = neurons.to(device=self.fc_in.mask.device, dtype=torch.bool)
        with torch.no_grad():
            self.fc_in.mask.copy_(neurons.unsqueeze(1).expand_as(self.fc_in.mask))
            self.fc_out.mask.copy_(neurons.unsqueeze(0).expand_as(self.fc_out.mask))

    def _neuron_weights(self) -> dict[str, Tensor | None] | None:
        """Eq. 4 on the neuron slices: the static neurons' rows/columns once, the dynamic ones per expert.

        `neuron_mask()` has checked that the mask is all True on a dynamic neuron's slices and all False on a static
        one's, where eq. 4 reduces to ``l_d * W_k`` and ``l_s * W_static``: that is what is formed here (the
        `pad_merge` of such a slice, without its passes over the mask; `tests/test_neuron_pad.py` checks the two
        forms agree, gradients included).

        None while a graph is traced: which neurons are dynamic is data (the mask buffer), so the check and the
        slice sizes would be data-dependent; the traced layer takes the element form instead (same values).
        `pad_moe_transformers.export.frozen_pad_weights` gives a traced graph these slices as constants.
        """
        if torch.compiler.is_compiling():
            return None
        dynamic = self.neuron_mask()
        dyn, sta = dynamic.nonzero(as_tuple=True)[0], (~dynamic).nonzero(as_tuple=True)[0]
        fc_in, fc_out = self.fc_in, self.fc_out
        l_s_in, l_d_in = fc_in.scale_factors()
        l_s_out, l_d_out = fc_out.scale_factors()
        if fc_in.storage == COMPACT_STORAGE and fc_out.storage == COMPACT_STORAGE:
            # Compact storage of a neuron-structured mask holds exactly the slices, row-major: fc_in's dynamic rows
            # `(E, I_d, H)` and static rows `(I_s, H)`, fc_out's dynamic columns `(E, H, I_d)` and static `(H, I_s)`.
            fc_in.compact_index(), fc_out.compact_index()  # refuses a mask changed under the stored values
            num_experts, hidden = fc_in.num_experts, fc_in.in_features
            return {
                "static_in": fc_in.static_values.view(len(sta), hidden) * l_s_in,
                "static_in_bias": None if fc_in.static_bias is None else fc_in.static_bias[sta],
                "static_out": fc_out.static_values.view(hidden, len(sta)) * l_s_out,
                "expert_in": fc_in.expert_values.view(num_experts, len(dyn), hidden) * l_d_in,
                "expert_in_bias": None if fc_in.expert_bias is None else fc_in.expert_bias[:, dyn],
                "expert_out": fc_out.expert_values.view(num_experts, hidden, len(dyn)) * l_d_out,
            }
        return {
            "static_in": fc_in.dense_static_weight()[sta] * l_s_in,  # (I_s, H)
            "static_in_bias": None if fc_in.static_bias is None else fc_in.static_bias[sta],  # (I_s,)
            "static_out": fc_out.dense_static_weight()[:, sta] * l_s_out,  # (H, I_s)
            "expert_in": fc_in.dense_expert_weight()[:, dyn] * l_d_in,  # (E, I_d, H)
            "expert_in_bias": None if fc_in.expert_bias is None else fc_in.expert_bias[:, dyn],  # (E, I_d)
            "expert_out": fc_out.dense_expert_weight()[:, :, dyn] * l_d_out,  # (E, H, I_d)
        }

    def _neuron_sources(self) -> list[Tensor | None]:
        """The tensors the neuron slices are formed from (`core.inference.inference_value` checks them)."""
        return [
            *self.fc_in.merge_sources(),
            *self.fc_out.merge_sources(),
            self.fc_in.static_bias,
            self.fc_in.expert_bias,
        ]

    def _neuron_inference_weights(self) -> dict[str, Tensor | None] | None:
        """`_neuron_weights()`, kept across forwards without grad while fc_in and fc_out are merged (or formed once
        per `merged_pad_weights()` block), and formed again whenever one of their tensors changes."""
        if torch.compiler.is_compiling():  # frozen slices or none (`inference_value`)
            return inference_value(self, self._neuron_weights, self._neuron_sources, False)
        merged = self.fc_in.merged and self.fc_out.merged
        if not merged and self.__dict__.get(MERGE_CACHE) is not None:
            self._pad_merge_cache = None  # unmerged since: free the slices
        if self.fc_in.soft_mask is not None or self.fc_out.soft_mask is not None:
            return self._neuron_weights()
        return inference_value(self, self._neuron_weights, self._neuron_sources, merged)

    def _apply(self, fn, recurse: bool = True):
        self._pad_merge_cache = None  # converted sources: formed again on the next forward
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), MERGE_CACHE: None}

    def _neuron_experts_forward(self, x: Tensor, gates: Tensor, experts: Tensor) -> Tensor:
        """Static neurons share their weights across experts, so their contribution is computed once
        per token (weighted by the sum of the selected gates, which is 1); only the dynamic neurons
        are computed per expert, as smaller dense matmuls."""
        w = self._neuron_inference_weights()
        if w is None:
            # Traced without constant slices: the element form. A static neuron's eq. 4 rows are the same in every
            # expert (`l_s * W_static`, the static bias), so its gate-weighted sum over the selected experts is
            # the neuron form's single term (the gates sum to 1); it costs the static neurons' per-expert matmuls.
            return run_experts(self.experts_implementation, self.expert_weights(), x, experts, gates)
        dynamic = ExpertWeights(
            w["expert_in"], w["expert_out"], w["expert_in_bias"], self.fc_out.effective_bias(), self.activation
        )
        y = run_experts(self.experts_implementation, dynamic, x, experts, gates)
        if w["static_in"].shape[0] > 0:
            h_static = self.activation(nn.functional.linear(x, w["static_in"], w["static_in_bias"]))
            y = y + nn.functional.linear(h_static, w["static_out"])
        return y

    def pad_linears(self) -> dict[str, PADExpertLinear]:
        return {"fc_in": self.fc_in, "fc_out": self.fc_out}
