"""`PADExpertLinear`: the weights of one FFN linear for all experts of a PAD-MoE layer (eq. 4).

Expert ``i``'s computational weight is

    W_eff_i = l_d * M * W_i + l_s * (1 - M) * W_static

with one binary mask ``M`` and one static weight ``W_static`` shared by all experts of the linear, and
scale factors ``(l_s, l_d)`` whose parametrisation depends on ``scale_factor_mode`` (all of this is the
PAD core, `core.PADWeight`). Biases are per expert and fully dynamic (they are not partitioned:
``E * out`` values, <0.1% of the linear); they are upcycled from the dense bias like the weights. With
neuron-structured partitions the FFN's input linear also has a shared ``static_bias``: a static neuron
must compute the same thing in every expert, bias included, so its bias comes from the static bias.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .core.pad_weight import PADWeight
from .core.scale_factors import SCALE_FACTOR_NAMES

__all__ = ["SCALE_FACTOR_NAMES", "PADExpertLinear"]


class PADExpertLinear(PADWeight):
    """Stacked expert weights `(E, out, in)`, the shared static weight `(out, in)`, the mask and the scales.

    Gradients follow eq. 4: the dynamic entries of ``W_i`` (``M = 1``) and the static entries of
    ``W_static`` (``M = 0``) receive gradient, the others receive exactly zero.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_experts: int,
        scale_factor_mode: str = "sum2",
        bias: bool = True,
        shared_static_bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_experts, (out_features, in_features), scale_factor_mode, device=device, dtype=dtype)
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.expert_bias = nn.Parameter(torch.zeros(num_experts, out_features, **factory)) if bias else None
        # Bias of static output units (rows whose mask is all False); neuron-structured partitions only.
        self.static_bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias and shared_static_bias else None

    @classmethod
    def from_dense(
        cls,
        linear: nn.Linear,
        num_experts: int,
        scale_factor_mode: str = "sum2",
        shared_static_bias: bool = False,
    ) -> PADExpertLinear:
        """Upcycle a dense linear: every expert and the static weight start as copies of it."""
        weight = linear.weight
        module = cls(
            linear.in_features,
            linear.out_features,
            num_experts,
            scale_factor_mode,
            bias=linear.bias is not None,
            shared_static_bias=shared_static_bias,
            device=weight.device,
            dtype=weight.dtype,
        )
        if weight.device.type == "meta":  # built to be loaded into: nothing to copy
            return module
        with torch.no_grad():
            module.expert_weight.copy_(weight.detach().unsqueeze(0).expand_as(module.expert_weight))
            module.static_weight.copy_(weight.detach())
            if linear.bias is not None:
                module.expert_bias.copy_(linear.bias.detach().unsqueeze(0).expand_as(module.expert_bias))
                if module.static_bias is not None:
                    module.static_bias.copy_(linear.bias.detach())
        return module

    def effective_bias(self) -> Tensor | None:
        """`(E, out)` biases of all experts: each expert's own where the output unit is dynamic, else the static
        bias (neuron-structured partitions only; without a static bias every unit uses the expert's own)."""
        if self.expert_bias is None or self.static_bias is None:
            return self.expert_bias
        return torch.where(self.mask.any(dim=1), self.expert_bias, self.static_bias)

    def expert_bias_of(self, expert: int) -> Tensor | None:
        """`(out,)` bias of one expert (see `effective_bias`)."""
        bias = self.effective_bias()
        return None if bias is None else bias[expert]

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, num_experts={self.num_experts}, "
            f"scale_factor_mode={self.scale_factor_mode!r}, bias={self.expert_bias is not None}"
        )
