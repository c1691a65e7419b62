"""`PADExpertLinear`: the weights of one FFN linear for all experts of a PAD-MoE layer (eq. 4).

Expert ``i``'s computational weight is

    W_eff_i = l_d * M * W_i + l_s * (1 - M) * W_static

with one binary mask ``M`` and one static weight ``W_static`` shared by all experts of the linear,
and scale factors ``(l_s, l_d)`` whose parametrisation depends on ``scale_factor_mode``. The scale
factors are stored as 1-element 1-D parameters (shape ``(1,)``: FSDP1 and FSDP2 refuse 0-d
parameters); `scale_factors()` returns them as 0-d tensors, and checkpoints store them as 0-d tensors
(`_load_from_state_dict` accepts both shapes).
Biases are per expert and fully dynamic (they are not partitioned: ``E * out`` values, <0.1% of
the linear); they are upcycled from the dense bias like the weights. With neuron-structured
partitions the FFN's input linear also has a shared ``static_bias``: a static neuron must compute
the same thing in every expert, bias included, so its bias comes from the static bias.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

SCALE_FACTOR_NAMES = ("scale_logit", "lambda_static", "lambda_dynamic")
"""Attribute names of the scale-factor parameters a `PADExpertLinear` may have (which ones depends on
its `scale_factor_mode`). Each is a `(1,)` parameter; checkpoints store it as a 0-d tensor."""


class _MergedPADWeights(torch.autograd.Function):
    """Eq. 4 for all experts at once with a hand-written backward.

    Autograd's own backward of ``where(M, l_d * W, l_s * W_static)`` materialises both branches of
    the ``where`` and the product ``grad * W`` as full `(E, out, in)` temporaries; this one masks the
    gradient once, reduces the scale-factor gradients with dot products and scales in place, which
    roughly halves the memory traffic of the training step's PAD overhead.
    """

    @staticmethod
    def forward(ctx, expert_weight: Tensor, static_weight: Tensor, mask: Tensor, l_s: Tensor, l_d: Tensor) -> Tensor:
        static_term = torch.where(mask, 0.0, static_weight * l_s)
        ctx.save_for_backward(expert_weight, static_weight, mask, l_s, l_d)
        merged = torch.empty_like(expert_weight)
        for expert in range(expert_weight.shape[0]):  # per expert: temporaries stay cache-sized
            torch.where(mask, expert_weight[expert] * l_d, static_term, out=merged[expert])
        return merged

    @staticmethod
    def backward(ctx, grad: Tensor):
        expert_weight, static_weight, mask, l_s, l_d = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_expert = grad_static = grad_l_s = grad_l_d = None
        if needs[0] or needs[4]:
            dynamic_grad = grad.masked_fill(~mask, 0.0)  # (E, out, in)
            if needs[4]:
                grad_l_d = torch.dot(dynamic_grad.reshape(-1), expert_weight.reshape(-1))
            if needs[0]:
                grad_expert = dynamic_grad.mul_(l_d)
        if needs[1] or needs[3]:
            static_grad = grad.sum(dim=0).masked_fill_(mask, 0.0)  # (out, in)
            if needs[3]:
                grad_l_s = torch.dot(static_grad.reshape(-1), static_weight.reshape(-1))
            if needs[1]:
                grad_static = static_grad.mul_(l_s)
        return grad_expert, grad_static, None, grad_l_s, grad_l_d


class PADExpertLinear(nn.Module):
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
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.num_experts = num_experts
        self.scale_factor_mode = scale_factor_mode
        self.expert_weight = nn.Parameter(torch.empty(num_experts, out_features, in_features, **factory))
        self.static_weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.expert_bias = nn.Parameter(torch.zeros(num_experts, out_features, **factory)) if bias else None
        # Bias of static output units (rows whose mask is all False); neuron-structured partitions only.
        self.static_bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias and shared_static_bias else None
        # True = dynamic (per expert), False = static (shared). All dynamic until a partition runs.
        self.register_buffer("mask", torch.ones(out_features, in_features, dtype=torch.bool, device=device))
        # Scale factors: shape (1,), not 0-d, because FSDP refuses 0-d parameters. Read them through
        # `scale_factors()` (0-d); the state dict has them as (1,), checkpoint files as 0-d (both load).
        if scale_factor_mode == "sum2":
            self.scale_logit = nn.Parameter(torch.zeros(1, **factory))  # phi; l_d = 2 sigmoid(phi)
        elif scale_factor_mode in ("static_only", "free"):
            self.lambda_static = nn.Parameter(torch.ones(1, **factory))
        if scale_factor_mode in ("dynamic_only", "free"):
            self.lambda_dynamic = nn.Parameter(torch.ones(1, **factory))
        # Set by the partition code while scoring: a float relaxation of `mask` that requires grad.
        self.soft_mask: Tensor | None = None
        # Inference cache of `merged_weights()`, keyed by the identity and version of every input tensor.
        self._merged_cache: tuple[tuple, Tensor] | None = None

    @classmethod
    def from_dense(
        cls,
        linear: nn.Linear,
        num_experts: int,
        scale_factor_mode: str = "sum2",
        shared_static_bias: bool = False,
    ) -> "PADExpertLinear":
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
        with torch.no_grad():
            module.expert_weight.copy_(weight.detach().unsqueeze(0).expand_as(module.expert_weight))
            module.static_weight.copy_(weight.detach())
            if linear.bias is not None:
                module.expert_bias.copy_(linear.bias.detach().unsqueeze(0).expand_as(module.expert_bias))
                if module.static_bias is not None:
                    module.static_bias.copy_(linear.bias.detach())
        return module

    def scale_factors(self, values: Mapping[str, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """Return `(l_s, l_d)` as 0-d tensors (views of the `(1,)` scale-factor parameters, so they carry
        their gradients). `values` (`{name: tensor}`, `(1,)` or 0-d, e.g. from a full state dict) replaces
        the module's own scale-factor parameters, which are shards when the module is FSDP-sharded."""

        def scale(name: str) -> Tensor:
            tensor = values[name] if values is not None and name in values else getattr(self, name)
            return tensor.reshape(())

        mode = self.scale_factor_mode
        if mode == "sum2":
            l_d = 2.0 * torch.sigmoid(scale("scale_logit"))
            return 2.0 - l_d, l_d
        one = torch.ones((), device=self.static_weight.device, dtype=self.static_weight.dtype)
        l_s = scale("lambda_static") if mode in ("static_only", "free") else one
        l_d = scale("lambda_dynamic") if mode in ("dynamic_only", "free") else one
        return l_s, l_d

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # Checkpoints (and state dicts of earlier versions) hold the scale factors as 0-d tensors.
        for name in SCALE_FACTOR_NAMES:
            key = prefix + name
            parameter = getattr(self, name, None)
            value = state_dict.get(key)
            if isinstance(parameter, nn.Parameter) and isinstance(value, Tensor) and value.dim() == 0:
                state_dict[key] = value.reshape(parameter.shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def static_term(self) -> Tensor:
        """`l_s * (1 - M) * W_static`, shape `(out, in)`: computed once per forward, shared by all experts."""
        l_s, _ = self.scale_factors()
        if self.soft_mask is not None:
            return l_s * (1.0 - self.soft_mask) * self.static_weight
        return torch.where(self.mask, 0.0, l_s * self.static_weight)

    def expert_weight_eff(self, expert: int, static_term: Tensor | None = None) -> Tensor:
        """Eq. 4 for one expert, shape `(out, in)`."""
        if static_term is None:
            static_term = self.static_term()
        _, l_d = self.scale_factors()
        if self.soft_mask is not None:
            return l_d * self.soft_mask * self.expert_weight[expert] + static_term
        # `where` instead of `M * W`: same values and gradients for a binary mask, no extra multiply.
        return torch.where(self.mask, l_d * self.expert_weight[expert], static_term)

    def merged_weights(self) -> Tensor:
        """Eq. 4 for all experts at once, shape `(E, out, in)`."""
        static_term = self.static_term()
        return torch.stack([self.expert_weight_eff(e, static_term) for e in range(self.num_experts)])

    def merged_weights_for_training(self) -> tuple[Tensor, ...]:
        """Eq. 4 for all experts as a tuple of `(out, in)` weights, built by one fused autograd node.

        Same values and gradients as `expert_weight_eff` for a binary mask (tested); `unbind` so
        that each expert's weight gradient lands in one stacked tensor, not in E full-size copies.
        """
        l_s, l_d = self.scale_factors()
        return _MergedPADWeights.apply(self.expert_weight, self.static_weight, self.mask, l_s, l_d).unbind(0)

    def merged_weights_for_inference(self) -> Tensor:
        """`merged_weights()` computed once and reused while no input tensor changes.

        The cache key holds the storage pointer, dtype and in-place version counter of the expert and
        static weights, the mask and the scale factors, so an optimizer step, `load_state_dict`, a mask
        update or `.to()` all invalidate it; `train()` drops it too. Only valid without autograd.
        """
        tensors = [self.mask, *self.parameters(recurse=False)]
        key = tuple((t.data_ptr(), t.dtype, t.device, t._version) for t in tensors)
        if self._merged_cache is None or self._merged_cache[0] != key:
            with torch.no_grad():
                self._merged_cache = (key, self.merged_weights())
        return self._merged_cache[1]

    def train(self, mode: bool = True) -> "PADExpertLinear":
        self._merged_cache = None
        return super().train(mode)

    def expert_bias_of(self, expert: int) -> Tensor | None:
        """Bias of one expert, `(out,)`: its own where the output unit is dynamic, else the static bias."""
        if self.expert_bias is None:
            return None
        if self.static_bias is None:
            return self.expert_bias[expert]
        return torch.where(self.mask.any(dim=1), self.expert_bias[expert], self.static_bias)

    # --- bookkeeping used by the parameter report and the partition code -------------------
    def num_dynamic(self) -> int:
        """Dynamic weight entries of one expert (`nnz(M)`)."""
        return int(self.mask.sum())

    def dynamic_ratio(self) -> float:
        return self.num_dynamic() / self.mask.numel()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, num_experts={self.num_experts}, "
            f"scale_factor_mode={self.scale_factor_mode!r}, bias={self.expert_bias is not None}"
        )
