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

Merged inference (`merge` / `unmerge`, as PEFT's `merge_adapter` / `unmerge_adapter`): a merged layer keeps its
eq. 4 weights, formed on first use, and serves them to later forwards while the tensors they were formed from are
unchanged (else it forms them again; `core.inference`). Where autograd records, the stored value comes with eq. 4's
own backward (`eq4.pad_merge_stored`), so gradients are exactly those of an unmerged layer. The stored weights are a
plain attribute, never a parameter or buffer: they are not in `state_dict` (checkpoints are the same merged or not),
and `.to()` drops them. A stand-alone layer is merged only by `merge()`; the PAD models merge their layers in eval
mode and unmerge them in train mode (`PADMergeMixin`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .compact import decode_compact
from .eq4 import pad_merge, pad_merge_stored
from .inference import MERGE_CACHE, inference_value
from .scale_factors import SCALE_FACTOR_NAMES, register_scale_factors, scale_factor_names, scale_factors

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
        self._merged = False  # `merge()`d: eq. 4 weights kept across forwards without grad
        self._pad_merge_cache = None
        self._pad_frozen_keys = None  # set by `export.frozen_pad_weights` (`core.inference.freeze`)

    # --- merged inference --------------------------------------------------------------------------
    @property
    def merged(self) -> bool:
        """Whether the layer keeps its eq. 4 weights across forwards without grad (`merge`)."""
        return self._merged

    def merge(self) -> None:
        """Keep the eq. 4 weights from the next forward without grad on (formed then, and again whenever a source
        tensor changes; `core.inference`)."""
        self._merged = True

    def unmerge(self) -> None:
        """Form eq. 4 in every forward again and free the stored weights."""
        self._merged = False
        self._pad_merge_cache = None

    def _apply(self, fn, recurse: bool = True):
        self._pad_merge_cache = None  # converted sources: formed again on the next forward, in the new dtype / device
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:  # pickling / deepcopy: the stored weights are formed again on first use
        return {**super().__getstate__(), MERGE_CACHE: None}

    def merge_sources(self) -> list[Tensor]:
        """The tensors eq. 4 reads: a merged value is served only while they are unchanged."""
        names = scale_factor_names(self.scale_factor_mode)
        return [self.expert_weight, self.static_weight, self.mask, *(getattr(self, name) for name in names)]

    # --- eq. 4 -----------------------------------------------------------------------------------
    def scale_factors(self, values: Mapping[str, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """`(l_s, l_d)` as 0-d tensors; `values` replaces the module's own (e.g. from a full state dict)."""
        return scale_factors(self, self.scale_factor_mode, values)

    def effective_weight(self, dynamic: Tensor | None = None) -> Tensor:
        """Eq. 4: `(K, *shape)` effective weights (`dynamic` replaces `expert_weight`, e.g. a per-sample
        mixture of kernels, `(B, *shape)`). Uses `soft_mask` while IMP scores, else the binary mask."""
        if dynamic is None and self.soft_mask is None:
            if self._merged and torch.is_grad_enabled() and self._pad_frozen_keys is None:
                if not torch.compiler.is_compiling():  # merged, autograd recording (eval mode with grad)
                    with torch.no_grad():
                        stored = inference_value(self, self._merge_experts, self.merge_sources, True)
                    l_s, l_d = self.scale_factors()  # the stored value, with eq. 4's exact gradient
                    return pad_merge_stored(stored, self.expert_weight, self.static_weight, self.mask, l_s, l_d)
            # merged, or in `merged_pad_weights()`: formed once (no grad)
            return inference_value(self, self._merge_experts, self.merge_sources, self._merged)
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


# --- model-level merged inference ----------------------------------------------------------------
def merge_pad_weights(model: nn.Module) -> nn.Module:
    """Merge every PAD layer of `model` (`PADWeight.merge`) and form its eq. 4 weights now. Returns `model`."""
    for module in model.modules():
        if isinstance(module, PADWeight):
            module.merge()
    with torch.no_grad():
        neuron_linears: set[int] = set()
        for module in model.modules():
            neuron_weights = getattr(module, "_neuron_inference_weights", None)
            if callable(neuron_weights) and getattr(module, "partition_granularity", None) == "neuron":
                neuron_weights()
                neuron_linears.update(id(linear) for linear in module.pad_linears().values())
        for module in model.modules():
            if isinstance(module, PADWeight) and id(module) not in neuron_linears and module.soft_mask is None:
                module.effective_weight()
    return model


def unmerge_pad_weights(model: nn.Module) -> nn.Module:
    """Unmerge every PAD layer of `model` and free the stored weights: eq. 4 is formed in every forward again.
    Returns `model`."""
    for module in model.modules():
        if isinstance(module, PADWeight):
            module.unmerge()
        elif MERGE_CACHE in module.__dict__:
            module.__dict__[MERGE_CACHE] = None
    return model


def pad_weights_merged(model: nn.Module) -> bool:
    """Whether `model` has PAD layers and all of them are merged."""
    layers = [module for module in model.modules() if isinstance(module, PADWeight)]
    return bool(layers) and all(layer.merged for layer in layers)


class PADMergeMixin:
    """`merge_pad_weights` / `unmerge_pad_weights` / `pad_weights_merged` on a PAD model (PEFT's `merge_adapter` /
    `unmerge_adapter` for eq. 4), and the rule that makes the usual inference calls fast: the model merges its PAD
    layers when put in eval mode (`from_pretrained`, `pipeline`, `Trainer.evaluate` / `predict` do) and unmerges them
    in train mode, unless `unmerge_pad_weights()` opted out."""

    def train(self, mode: bool = True):
        super().train(mode)
        if getattr(self, "_pad_auto_merge", True):
            for module in self.modules():
                if isinstance(module, PADWeight):
                    module.unmerge() if mode else module.merge()
        return self

    def merge_pad_weights(self):
        """Keep every PAD layer's eq. 4 weights (formed now) instead of forming them in every forward; formed again
        whenever the weights change (optimizer step, `load_state_dict`, `.to()`, a partition writing masks; not an
        in-place write through `.data`, see docs/architecture.md). Eval mode merges by itself; this also merges in
        train mode (until the next `train()`) and undoes `unmerge_pad_weights()`. Not saved: checkpoints are the
        same. Returns the model."""
        self._pad_auto_merge = True
        return merge_pad_weights(self)

    def unmerge_pad_weights(self):
        """Form eq. 4 in every forward again (freeing the stored weights), in eval mode too, until
        `merge_pad_weights()`. Returns the model."""
        self._pad_auto_merge = False
        return unmerge_pad_weights(self)

    @property
    def pad_weights_merged(self) -> bool:
        """Whether every PAD layer is merged (eval mode, or `merge_pad_weights()`)."""
        return pad_weights_merged(self)
