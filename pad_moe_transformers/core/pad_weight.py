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

from .compact import unpack_mask
from .eq4 import pad_merge, pad_merge_compact, pad_merge_compact_stored, pad_merge_stored
from .inference import MERGE_CACHE, inference_value
from .scale_factors import SCALE_FACTOR_NAMES, register_scale_factors, scale_factor_names, scale_factors

COMPACT_SUFFIXES = ("mask_packed", "static_values", "expert_values")
DENSE_STORAGE, COMPACT_STORAGE = "dense", "compact"
# The parameters holding a PAD weight's weights, in either storage (the rest are scale factors and biases).
PAD_WEIGHT_PARAMETER_NAMES = ("expert_weight", "static_weight", "expert_values", "static_values")
_INDEX_CACHE = "_pad_index_cache"


class CompactStorageError(AttributeError):
    """A dense tensor (`expert_weight`, `static_weight`) was read from a PAD weight in compact storage."""


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
        self._pad_index_cache = None  # (mask fingerprint, dynamic_index, static_index) of `compact_index`
        self._merged = False  # `merge()`d: eq. 4 weights kept across forwards without grad
        self._pad_merge_cache = None
        self._pad_frozen_keys = None  # set by `export.frozen_pad_weights` (`core.inference.freeze`)

    # --- storage -----------------------------------------------------------------------------------
    # Dense storage (upcycled, all dynamic; and while a partition scores): `expert_weight` (K, *shape) and
    # `static_weight` (*shape) are the parameters. Compact storage (a partitioned weight, `compact_storage_`): only
    # what eq. 4 reads is a parameter, `expert_values` (K, D) = W_k[M] and `static_values` (S,) = W_static[~M]
    # (row-major, as in the checkpoint format), so gradients and optimizer states are in proportion to eq. 4 too.
    # `expert_weight` / `static_weight` (dense) and `expert_values` / `static_values` (compact) are plain module
    # parameters, not properties: FSDP1 replaces parameters by tensor attributes with `delattr` + `setattr`, which
    # a property would refuse. Only a missing name reaches `__getattr__`, which then says what to use instead.
    @property
    def storage(self) -> str:
        """``"compact"`` when the parameters are `expert_values` / `static_values`, else ``"dense"``."""
        return COMPACT_STORAGE if self._has_attribute("expert_values") else DENSE_STORAGE

    def _has_attribute(self, name: str) -> bool:
        # A parameter, or the tensor attribute FSDP1 puts in its place.
        return name in self._parameters or name in self.__dict__

    def __getattr__(self, name: str):
        if name in ("expert_weight", "static_weight") and self._has_attribute("expert_values"):
            raise CompactStorageError(
                f"{type(self).__name__} has no {name!r}: after a partition it stores only the entries eq. 4 reads "
                "(compact storage: `expert_values` (K, nnz(M)) and `static_values` (numel - nnz(M))). Read the dense "
                f"tensor with `dense_{name}()` (differentiable, zeros where eq. 4 reads nothing), or convert the layer "
                "with `dense_storage_()` (new parameters: build the optimizer after it)."
            )
        return super().__getattr__(name)

    @property
    def dynamic_parameter(self) -> Tensor:
        """The parameter holding the dynamic weights (`expert_weight`, or `expert_values` in compact storage): what
        to read the weights' dtype and device from."""
        return self.expert_values if self.storage == COMPACT_STORAGE else self.expert_weight

    def dense_expert_weight(self) -> Tensor:
        """`(K, *shape)`: `expert_weight`, or in compact storage the stored dynamic entries in place and zeros
        elsewhere (the tensor a partitioned dense layer holds), differentiable w.r.t. `expert_values`."""
        if self.storage == DENSE_STORAGE:
            return self.expert_weight
        dynamic_index, _ = self.compact_index()
        values = self.expert_values
        flat = values.new_zeros(values.shape[0], self.mask.numel()).index_copy(1, dynamic_index, values)
        return flat.view(values.shape[0], *self.mask.shape)

    def dense_static_weight(self) -> Tensor:
        """`(*shape)`: `static_weight`, or in compact storage the static entries in place and zeros elsewhere."""
        if self.storage == DENSE_STORAGE:
            return self.static_weight
        _, static_index = self.compact_index()
        values = self.static_values
        return values.new_zeros(self.mask.numel()).index_copy(0, static_index, values).view(self.mask.shape)

    def compact_index(self) -> tuple[Tensor, Tensor]:
        """`(dynamic_index (D,), static_index (S,))`: flat positions of the mask's True and False entries, in
        row-major order (derived from `mask`, kept until it changes). In compact storage a mask change that moves
        entries is refused: the stored values belong to the old positions."""
        cache = self.__dict__.get(_INDEX_CACHE)
        if torch.compiler.is_compiling() and cache is not None:
            return cache[1], cache[2]
        mask = self.mask
        key = (mask.data_ptr(), mask._version, mask.device)
        if cache is not None and cache[0] == key:
            return cache[1], cache[2]
        flat = mask.reshape(-1)
        dynamic_index = flat.nonzero().squeeze(1)
        static_index = (~flat).nonzero().squeeze(1)
        if self.storage == COMPACT_STORAGE:
            stored = self.expert_values.shape[1]
            moved = cache is not None and (
                cache[1].shape != dynamic_index.shape or not torch.equal(cache[1].to(mask.device), dynamic_index)
            )
            if dynamic_index.numel() != stored or moved:
                raise RuntimeError(
                    f"The mask of this {type(self).__name__} changed while it stores compact values (they belong to "
                    f"the old mask's {stored} dynamic entries). Set masks through `apply_partition` / "
                    "`partition_model` (they convert the storage), or call `dense_storage_()` before writing the "
                    "mask and `compact_storage_()` after."
                )
        self.__dict__[_INDEX_CACHE] = (key, dynamic_index, static_index)
        return dynamic_index, static_index

    @torch.no_grad()
    def compact_storage_(self) -> PADWeight:
        """Keep only what eq. 4 reads under the current mask: the parameters become `expert_values` `(K, nnz(M))`
        and `static_values` `(numel - nnz(M),)` (new `nn.Parameter`s: an optimizer built before must be re-bound,
        as `IMPTrainerCallback` does). Outputs and gradients are unchanged. Returns the layer."""
        if self.storage == COMPACT_STORAGE:
            return self
        expert, static = self.expert_weight, self.static_weight
        self.__dict__[_INDEX_CACHE] = None
        dynamic_index, static_index = self.compact_index()
        expert_values = expert.reshape(expert.shape[0], -1).index_select(1, dynamic_index)
        static_values = static.reshape(-1).index_select(0, static_index)
        self._replace_parameters(
            {
                "expert_weight": ("expert_values", nn.Parameter(expert_values, requires_grad=expert.requires_grad)),
                "static_weight": ("static_values", nn.Parameter(static_values, requires_grad=static.requires_grad)),
            }
        )
        return self

    @torch.no_grad()
    def dense_storage_(self) -> PADWeight:
        """Back to `expert_weight` / `static_weight` (full size; zeros where eq. 4 reads nothing, as a partitioned
        dense layer holds them), e.g. to write masks by hand or partition again. New parameters. Returns the layer."""
        if self.storage == DENSE_STORAGE:
            return self
        expert, static = self.dense_expert_weight(), self.dense_static_weight()
        requires_grad = (self.expert_values.requires_grad, self.static_values.requires_grad)
        self._replace_parameters(
            {
                "expert_values": ("expert_weight", nn.Parameter(expert, requires_grad=requires_grad[0])),
                "static_values": ("static_weight", nn.Parameter(static, requires_grad=requires_grad[1])),
            }
        )
        return self

    def _replace_parameters(self, replacements: dict[str, tuple[str, nn.Parameter]]) -> None:
        """Swap parameters in place in `_parameters`' order: `parameters()`, `state_dict()` and the optimizer groups
        built from them keep one order across storages (a Trainer checkpoint's optimizer state is matched by it)."""
        self._parameters = {
            replacements[name][0] if name in replacements else name: (
                replacements[name][1] if name in replacements else parameter
            )
            for name, parameter in self._parameters.items()
        }
        self.__dict__[_INDEX_CACHE] = None
        self._pad_merge_cache = None

    def _set_compact_parameters(self, num_dynamic: int) -> None:
        """Compact storage with `num_dynamic` dynamic entries per weight (empty values, to be loaded)."""
        reference = self._parameters.get("expert_values")
        if reference is None:
            reference = self.expert_weight
        factory = {"device": reference.device, "dtype": reference.dtype}
        requires_grad = reference.requires_grad
        numel = self.mask.numel()
        expert = nn.Parameter(torch.empty(self.num_experts, num_dynamic, **factory), requires_grad=requires_grad)
        static = nn.Parameter(torch.empty(numel - num_dynamic, **factory), requires_grad=requires_grad)
        dense = self.storage == DENSE_STORAGE
        self._replace_parameters(
            {
                "expert_weight" if dense else "expert_values": ("expert_values", expert),
                "static_weight" if dense else "static_values": ("static_values", static),
            }
        )

    def _set_dense_parameters(self) -> None:
        reference = self.expert_values
        factory = {"device": reference.device, "dtype": reference.dtype}
        requires_grad = reference.requires_grad
        shape = tuple(self.mask.shape)
        self._replace_parameters(
            {
                "expert_values": (
                    "expert_weight",
                    nn.Parameter(torch.empty(self.num_experts, *shape, **factory), requires_grad=requires_grad),
                ),
                "static_values": (
                    "static_weight",
                    nn.Parameter(torch.empty(*shape, **factory), requires_grad=requires_grad),
                ),
            }
        )

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
        scales = [getattr(self, name) for name in names]
        if self.storage == COMPACT_STORAGE:
            return [self.expert_values, self.static_values, self.mask, *scales]
        return [self.expert_weight, self.static_weight, self.mask, *scales]

    # --- eq. 4 -----------------------------------------------------------------------------------
    def scale_factors(self, values: Mapping[str, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """`(l_s, l_d)` as 0-d tensors; `values` replaces the module's own (e.g. from a full state dict)."""
        return scale_factors(self, self.scale_factor_mode, values)

    def effective_weight(self, dynamic: Tensor | None = None, dtype: torch.dtype | None = None) -> Tensor:
        """Eq. 4: `(K, *shape)` effective weights (`dynamic` replaces the dynamic weights, e.g. a per-sample
        mixture of kernels, `(B, *shape)`). Uses `soft_mask` while IMP scores, else the binary mask. `dtype`: the
        dtype the caller will cast the weights to (the autocast dtype); a compact layer that forms eq. 4 in this
        forward forms it in that dtype directly (the same values), others return their own dtype."""
        if dynamic is None and self.soft_mask is None:
            if dtype is not None and not self._merged and torch.is_grad_enabled() and self.storage == COMPACT_STORAGE:
                return self._merge_experts(dtype)  # training: formed in every forward anyway
            if self._merged and torch.is_grad_enabled() and self._pad_frozen_keys is None:
                if not torch.compiler.is_compiling():  # merged, autograd recording (eval mode with grad)
                    with torch.no_grad():
                        stored = inference_value(self, self._merge_experts, self.merge_sources, True)
                    return self._stored_with_gradient(stored)
            # merged, or in `merged_pad_weights()`: formed once (no grad)
            return inference_value(self, self._merge_experts, self.merge_sources, self._merged)
        l_s, l_d = self.scale_factors()
        mask = self.mask if self.soft_mask is None else self.soft_mask
        dynamic = self.dense_expert_weight() if dynamic is None else dynamic
        return pad_merge(dynamic, self.dense_static_weight(), mask, l_s, l_d)

    def _merge_experts(self, dtype: torch.dtype | None = None) -> Tensor:
        l_s, l_d = self.scale_factors()
        if self.storage == COMPACT_STORAGE:
            dynamic_index, static_index = self.compact_index()
            return pad_merge_compact(
                self.expert_values,
                self.static_values,
                dynamic_index,
                static_index,
                l_s,
                l_d,
                tuple(self.mask.shape),
                None if dtype == self.expert_values.dtype else dtype,
            )
        return pad_merge(self.expert_weight, self.static_weight, self.mask, l_s, l_d)

    def _stored_with_gradient(self, stored: Tensor) -> Tensor:
        """The stored eq. 4 value, with eq. 4's exact gradient w.r.t. the parameters."""
        l_s, l_d = self.scale_factors()
        if self.storage == COMPACT_STORAGE:
            dynamic_index, static_index = self.compact_index()
            return pad_merge_compact_stored(
                stored, self.expert_values, self.static_values, dynamic_index, static_index, l_s, l_d
            )
        return pad_merge_stored(stored, self.expert_weight, self.static_weight, self.mask, l_s, l_d)

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
        # (`core.compact`); a never-partitioned model stores only the experts (the static weight is then their
        # mean, the mask all ones). The layer takes the storage of what it loads: compact values (a checkpoint
        # file's packed form, or a compact layer's own `state_dict()`) give compact storage, without a dense
        # decode; dense tensors give dense storage. Then the tensors load as usual.
        for name in SCALE_FACTOR_NAMES:
            value, parameter = state_dict.get(prefix + name), getattr(self, name, None)
            if isinstance(parameter, nn.Parameter) and isinstance(value, Tensor) and value.dim() == 0:
                state_dict[prefix + name] = value.reshape(parameter.shape)
        packed = [s for s in COMPACT_SUFFIXES if prefix + s in state_dict]
        if packed and len(packed) < len(COMPACT_SUFFIXES) and prefix + "mask" not in state_dict:
            lacking = [prefix + s for s in COMPACT_SUFFIXES if s not in packed]
            error_msgs.append(f"The state dict has {prefix}{packed[0]} but lacks {lacking} to decode it.")
            return
        if prefix + "mask_packed" in state_dict:
            state_dict[prefix + "mask"] = unpack_mask(state_dict.pop(prefix + "mask_packed"), self.mask.numel()).view(
                self.mask.shape
            )
        if prefix + "expert_values" in state_dict:
            values = state_dict[prefix + "expert_values"]
            if self.storage == DENSE_STORAGE or self.expert_values.shape[1] != values.shape[-1]:
                self._set_compact_parameters(values.shape[-1])
            self.__dict__[_INDEX_CACHE] = None  # the loaded mask gives the positions
        elif prefix + "expert_weight" in state_dict:
            if self.storage == COMPACT_STORAGE:
                self._set_dense_parameters()
            if not any(prefix + s in state_dict for s in ("static_weight", "mask")):
                state_dict[prefix + "static_weight"] = static_from_experts(state_dict[prefix + "expert_weight"])
                state_dict[prefix + "mask"] = torch.ones(self.mask.shape, dtype=torch.bool)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self.__dict__[_INDEX_CACHE] = None
        if self.storage == COMPACT_STORAGE and int(self.mask.sum()) != self.expert_values.shape[1]:
            error_msgs.append(
                f"{prefix}expert_values holds {self.expert_values.shape[1]} entries per weight, but the mask loaded "
                f"with it has {int(self.mask.sum())} dynamic entries."
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


def compact_pad_storage(model: nn.Module) -> list[PADWeight]:
    """`compact_storage_()` every PAD weight of `model` whose mask has a static entry (a partitioned one; an
    all-dynamic weight keeps its dense experts). Returns the layers converted (their parameters are new)."""
    converted = []
    for module in model.modules():
        if isinstance(module, PADWeight) and module.storage == DENSE_STORAGE and not bool(module.mask.all()):
            converted.append(module.compact_storage_())
    return converted


def dense_pad_storage(model: nn.Module) -> list[PADWeight]:
    """`dense_storage_()` every PAD weight of `model` in compact storage. Returns the layers converted."""
    return [m.dense_storage_() for m in model.modules() if isinstance(m, PADWeight) and m.storage == COMPACT_STORAGE]


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
