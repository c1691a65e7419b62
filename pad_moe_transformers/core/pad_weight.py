"""`PADWeight`: the base module of every partially dynamic layer (the contract of the PAD core).

A PAD layer (an MoE linear now, a dynamic convolution next) subclasses `PADWeight`, which owns

    expert_weight  (K, *shape)  the K dynamic weights (experts / kernels)
    static_weight  (*shape)     the one static weight shared by all K
    mask           (*shape)     bool buffer, True = dynamic; all True until a partition runs
    scale factors               `(1,)` parameters of `scale_factor_mode` (`core.scale_factors`)

and gets eq. 4 (`effective_weight`), the dynamic-ratio bookkeeping the partition code reads, and the
loading of compact entries through `load_state_dict` (`_load_from_state_dict`, so Trainer's resume
and plain `torch.load` + `load_state_dict` read PAD checkpoint files). The subclass adds what its
dynamic function needs (biases, in/out features, kernel size) and its forward.

While IMP scores a partition, `soft_mask` holds a float relaxation of `mask` that requires grad; it is
set and cleared by the partition code around its scoring passes and is None otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .compact import decode_compact
from .eq4 import pad_merge
from .inference import inference_value
from .scale_factors import SCALE_FACTOR_NAMES, register_scale_factors, scale_factors

COMPACT_SUFFIXES = ("mask_packed", "static_values", "expert_values")


def static_from_experts(experts: Tensor) -> Tensor:
    """The static weight of a never-partitioned model, which stores none (eq. 4 never reads it while
    M = 1): the experts' mean, which is exactly the dense weight they were upcycled from while equal."""
    if bool((experts == experts[:1]).all()):
        return experts[0].clone()
    return experts.float().mean(dim=0).to(experts.dtype)


class PADWeight(nn.Module):
    def __init__(
        self,
        num_experts: int,
        shape: tuple[int, ...],
        scale_factor_mode: str = "sum2",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_experts = num_experts
        self.scale_factor_mode = scale_factor_mode
        self.expert_weight = nn.Parameter(torch.empty(num_experts, *shape, **factory))
        self.static_weight = nn.Parameter(torch.empty(*shape, **factory))
        self.register_buffer("mask", torch.ones(*shape, dtype=torch.bool, device=device))
        register_scale_factors(self, scale_factor_mode, **factory)
        self.soft_mask: Tensor | None = None

    # --- eq. 4 -----------------------------------------------------------------------------------
    def scale_factors(self, values: Mapping[str, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """`(l_s, l_d)` as 0-d tensors; `values` replaces the module's own (e.g. from a full state dict)."""
        return scale_factors(self, self.scale_factor_mode, values)

    def effective_weight(self, dynamic: Tensor | None = None) -> Tensor:
        """Eq. 4: `(K, *shape)` effective weights (`dynamic` replaces `expert_weight`, e.g. a per-sample
        mixture of kernels, `(B, *shape)`). Uses `soft_mask` while IMP scores, else the binary mask."""
        if dynamic is None and self.soft_mask is None:  # inside `merged_pad_weights()` formed once per block
            return inference_value(self, self._merge_experts)
        l_s, l_d = self.scale_factors()
        mask = self.mask if self.soft_mask is None else self.soft_mask
        return pad_merge(self.expert_weight if dynamic is None else dynamic, self.static_weight, mask, l_s, l_d)

    def _merge_experts(self) -> Tensor:
        l_s, l_d = self.scale_factors()
        return pad_merge(self.expert_weight, self.static_weight, self.mask, l_s, l_d)

    # --- bookkeeping read by the partition code and the reports ------------------------------------
    def num_dynamic(self) -> int:
        """Dynamic entries of one dynamic weight (`nnz(M)`)."""
        return int(self.mask.sum())

    def dynamic_ratio(self) -> float:
        return self.num_dynamic() / self.mask.numel()

    # --- loading ---------------------------------------------------------------------------------
    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # Checkpoint files hold the scale factors 0-d and the weights of a partitioned model in compact form
        # (`core.compact`); a never-partitioned model stores only the experts (the static weight is then
        # their mean, the mask all ones). Translate to the module's own tensors, then load as usual.
        for name in SCALE_FACTOR_NAMES:
            value, parameter = state_dict.get(prefix + name), getattr(self, name, None)
            if isinstance(parameter, nn.Parameter) and isinstance(value, Tensor) and value.dim() == 0:
                state_dict[prefix + name] = value.reshape(parameter.shape)
        present = [s for s in COMPACT_SUFFIXES if prefix + s in state_dict]
        if present and len(present) < len(COMPACT_SUFFIXES):
            lacking = [prefix + s for s in COMPACT_SUFFIXES if s not in present]
            error_msgs.append(f"The state dict has {prefix}{present[0]} but lacks {lacking} to decode it.")
            return
        if present:
            dynamic, static, mask = decode_compact(
                *(state_dict.pop(prefix + s) for s in COMPACT_SUFFIXES), tuple(self.mask.shape)
            )
            state_dict.update(
                {prefix + "expert_weight": dynamic, prefix + "static_weight": static, prefix + "mask": mask}
            )
        elif prefix + "expert_weight" in state_dict and not any(
            prefix + s in state_dict for s in ("static_weight", "mask")
        ):
            state_dict[prefix + "static_weight"] = static_from_experts(state_dict[prefix + "expert_weight"])
            state_dict[prefix + "mask"] = torch.ones(self.mask.shape, dtype=torch.bool)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
