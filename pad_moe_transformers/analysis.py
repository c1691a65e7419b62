"""Dynamic-property measures (paper sec. 5.5, Figure 6): per FFN layer, how much the computed
parameters and the outputs vary across input samples.

    from pad_moe_transformers.analysis import dynamic_property
    result = dynamic_property(model, batches)          # dense, MoE or PAD model; batches of input_ids/attention_mask
    result.layers[0].parameter_variance, result.layers[0].output_variance

Definitions (docs/concepts.md, "Dynamic property"). A *unit* is one real (non-padding) token, or
with ``unit="sample"`` one input sequence. For an FFN layer with experts ``e = 1..E``:

* ``pi(u)`` is the unit's gate vector over all experts: the renormalised top-k gates on the selected
  experts, 0 elsewhere (for a sequence: the mean of its tokens' gate vectors). It sums to 1.
* The **computed parameters** of the unit are ``Theta(u) = sum_e pi_e(u) * W_eff_e`` for each of the
  layer's two linears, with ``W_eff_e`` expert ``e``'s eq. 4 weight. For a dense FFN ``Theta(u) = W``.
* **Parameter variance** = the variance of ``Theta_j(u)`` across units (population variance), averaged
  over all weight elements ``j`` of both linears (biases excluded). It is 0 for a dense layer and for
  static elements of a PAD layer.
* **Output variance** = the variance across units of the FFN block's output ``y(u)`` (the MoE layer's
  gate-weighted sum, or the dense FFN's output linear, before dropout, residual and LayerNorm; for a
  sequence: the mean over its real tokens), averaged over the hidden dimensions.

The parameter variance is computed without forming ``Theta(u)``: with ``C = Cov_u(pi)`` (``E x E``)
and ``D_e = W_eff_e - mean_e' W_eff_e'`` (``sum_e pi_e = 1`` makes ``C 1 = 0``, so centring the experts
changes nothing and removes the large shared part),

    sum_j Var_u(Theta_j) = sum_j d_j^T C d_j = trace(C G),   G_ab = <D_a, D_b>   (a Gram matrix, E x E)

so a layer costs one ``E x E`` Gram matrix of its weights plus an ``E x E`` covariance of the gates
accumulated over the units, instead of ``units x numel`` computed weights. Only dynamic entries
(``M = 1``) can differ across experts, so ``G`` is summed over them (in float64).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from transformers.utils import logging

from .architectures import get_layout, get_submodule_parent, iter_layers
from .core import PADLinearRef, named_pad_linears
from .modeling_pad_moe import PADMoEPreTrainedModel
from .moe import PADMoEFeedForward
from .pad_linear import PADExpertLinear

logger = logging.get_logger(__name__)

UNITS = ("token", "sample")

__all__ = [
    "UNITS",
    "DynamicProperty",
    "LayerDynamics",
    "ConvLayerDynamics",
    "RunningMoments",
    "conv_dynamic_property",
    "dynamic_property",
    "expert_gram",
    "parameter_variance",
]


class RunningMoments:
    """Streaming mean and (co)variance of row vectors in float64 (Chan et al.'s pairwise update).

    `update(x)` takes a `(n, d)` batch; `variance()` is the per-column population variance `(d,)`,
    `covariance()` the `(d, d)` population covariance (only with ``full=True``).
    """

    def __init__(self, dim: int, full: bool = False) -> None:
        self.count = 0
        self.mean = torch.zeros(dim, dtype=torch.float64)
        self.full = full
        self.m2 = torch.zeros((dim, dim) if full else dim, dtype=torch.float64)

    def update(self, x: Tensor) -> None:
        x = x.detach().to(device="cpu", dtype=torch.float64).reshape(-1, self.mean.numel())
        n = x.shape[0]
        if n == 0:
            return
        mean = x.mean(dim=0)
        centred = x - mean
        m2 = centred.T @ centred if self.full else centred.square().sum(dim=0)
        delta = mean - self.mean
        total = self.count + n
        correction = self.count * n / total
        self.m2 += m2 + (torch.outer(delta, delta) if self.full else delta.square()) * correction
        self.mean += delta * (n / total)
        self.count = total

    def variance(self) -> Tensor:
        if self.count == 0:
            return torch.zeros_like(self.mean)
        diag = self.m2.diagonal() if self.full else self.m2
        return diag / self.count

    def covariance(self) -> Tensor:
        if not self.full:
            raise ValueError("covariance() needs RunningMoments(full=True).")
        return self.m2 / max(self.count, 1)


def expert_gram(linear: PADExpertLinear) -> Tensor:
    """`G_ab = <D_a, D_b>` over the weight entries, `D_e = W_eff_e - mean_e W_eff_e` (eq. 4 weights), float64 `(E, E)`.

    The effective weights come from `PADExpertLinear.effective_weight` (eq. 4). Static entries (``M = 0``)
    are equal in every expert and contribute nothing, so only the dynamic entries enter the sum.
    """
    with torch.no_grad():
        dynamic = linear.effective_weight()[:, linear.mask].to(torch.float64)  # (E, nnz)
        dynamic = dynamic - dynamic.mean(dim=0, keepdim=True)
        return (dynamic @ dynamic.T).cpu()


def parameter_variance(linears: Iterable[PADExpertLinear], gate_covariance: Tensor) -> float:
    """Mean over all weight elements of `linears` of the variance of the computed parameters,
    ``sum_linears trace(C G) / sum_linears numel`` (see the module docstring)."""
    total = numel = 0.0
    cov = gate_covariance.to(torch.float64).cpu()
    for linear in linears:
        total += float(torch.trace(cov @ expert_gram(linear)))
        numel += linear.mask.numel()
    return max(total, 0.0) / numel if numel else 0.0


@dataclass
class LayerDynamics:
    """Parameter variance and output variance of one FFN layer (definitions in the module docstring)."""

    layer: int
    """Index of the (distinct) transformer layer."""
    moe: bool
    """Whether the layer's FFN is a (PAD-)MoE layer; a dense FFN has parameter variance 0."""
    parameter_variance: float
    output_variance: float
    dynamic_ratio: float
    """Fraction of the layer's FFN weight entries that are dynamic (1 for a MoE, 0 for a dense FFN)."""
    units: int
    """Units (tokens or sequences) the variances are taken over; ALBERT's shared layers count every depth."""


@dataclass
class DynamicProperty:
    """The measures of one model: one `LayerDynamics` per distinct transformer layer, in order."""

    unit: str
    layers: list[LayerDynamics] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"unit": self.unit, "layers": [asdict(layer) for layer in self.layers]}


class _LayerProbe:
    """Collects one layer's gate covariance and output moments from forward hooks."""

    def __init__(
        self, index: int, moe: PADMoEFeedForward | None, linears: list[PADExpertLinear], hidden: int, context: dict
    ) -> None:
        self.index = index
        self.moe = moe
        self.linears = linears
        self.context = context
        self.outputs = RunningMoments(hidden)
        self.gates = RunningMoments(moe.num_experts, full=True) if moe is not None else None

    def _group(self, values: Tensor) -> Tensor:
        """Rows of `values` (one per token, padding included, or one per real token) -> rows per unit."""
        mask: Tensor = self.context["mask"].to(values.device)  # (B, S) bool
        if values.shape[0] == mask.numel():
            values = values[mask.reshape(-1)] if not mask.all() else values
        elif values.shape[0] != int(mask.sum()):
            raise RuntimeError(
                f"dynamic_property: a layer produced {values.shape[0]} rows for a batch of {mask.numel()} tokens "
                f"({int(mask.sum())} real); expected one row per token or per real token."
            )
        if self.context["unit"] == "token":
            return values
        sample_of_token = mask.reshape(-1).nonzero(as_tuple=True)[0] // mask.shape[1]
        sums = values.new_zeros(mask.shape[0], values.shape[1]).index_add_(0, sample_of_token, values)
        counts = mask.sum(dim=1).clamp_min(1).to(values.dtype).unsqueeze(1)
        return (sums / counts)[mask.any(dim=1)]

    def on_output(self, module: nn.Module, args: Any, output: Tensor) -> None:
        self.outputs.update(self._group(output.detach().float().reshape(-1, output.shape[-1])))

    def on_router(self, module: nn.Module, args: Any, decision: Any) -> None:
        gates = decision.gates.detach().to(torch.float64)
        gates = gates / gates.sum(dim=-1, keepdim=True)
        pi = gates.new_zeros(gates.shape[0], module.num_experts).scatter_(1, decision.experts, gates)
        self.gates.update(self._group(pi))

    def result(self) -> LayerDynamics:
        if self.moe is None:
            return LayerDynamics(self.index, False, 0.0, float(self.outputs.variance().mean()), 0.0, self.outputs.count)
        linears = self.linears
        ratio = sum(lin.num_dynamic() for lin in linears) / sum(lin.mask.numel() for lin in linears)
        return LayerDynamics(
            self.index,
            True,
            parameter_variance(linears, self.gates.covariance()),
            float(self.outputs.variance().mean()),
            ratio,
            self.outputs.count,
        )


def _ffn_modules(model: nn.Module) -> list[tuple[nn.Module, PADMoEFeedForward | None, int]]:
    """Per distinct transformer layer: (module whose output is the FFN output, its MoE layer or None, hidden size)."""
    if isinstance(model, PADMoEPreTrainedModel):
        base, model_type = model.model.base_model, model.config.base_model_type
    elif hasattr(model, "base_model") and hasattr(model, "config"):
        base, model_type = model.base_model, model.config.model_type
    else:
        raise TypeError(
            f"dynamic_property needs a Transformers model of a supported family, got {type(model).__name__}."
        )
    layout = get_layout(model_type)
    found = []
    for layer in iter_layers(base, layout):
        in_parent, in_name = get_submodule_parent(layer, layout.ffn_in)
        ffn_in = getattr(in_parent, in_name)
        if isinstance(ffn_in, PADMoEFeedForward):
            found.append((ffn_in, ffn_in, ffn_in.fc_out.out_features))
        else:
            out_parent, out_name = get_submodule_parent(layer, layout.ffn_out)
            ffn_out = getattr(out_parent, out_name)
            found.append((ffn_out, None, ffn_out.out_features))
    return found


def _linears_inside(moe: nn.Module | None, refs: list[PADLinearRef]) -> list[PADExpertLinear]:
    """The PAD linears (of `named_pad_linears`) that belong to the MoE layer `moe`."""
    if moe is None:
        return []
    inside = {id(module) for module in moe.modules()}
    return [ref.module for ref in refs if id(ref.module) in inside]


@contextlib.contextmanager
def _hooks(probes: list[_LayerProbe], modules: list[nn.Module]) -> Iterator[None]:
    handles = []
    try:
        for probe, module in zip(probes, modules):
            handles.append(module.register_forward_hook(probe.on_output))
            if probe.moe is not None:
                handles.append(probe.moe.router.register_forward_hook(probe.on_router))
        yield
    finally:
        for handle in handles:
            handle.remove()


def dynamic_property(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    *,
    unit: str = "token",
    progress: bool = True,
    desc: str = "Dynamic property",
) -> DynamicProperty:
    """Parameter variance and output variance per FFN layer over the units of `batches`.

    Args:
        model: a dense model of a supported family (e.g. `BertModel`, `BertForSequenceClassification`)
            or a PAD-MoE model (MoE or partitioned). It is run in eval mode without autograd.
        batches: mappings with `input_ids` (and optionally `attention_mask`, `token_type_ids`); other
            keys (e.g. `labels`) are dropped.
        unit: ``"token"`` (every real token is one unit) or ``"sample"`` (one unit per sequence: gate
            vectors and outputs averaged over its real tokens).
        progress: show a tqdm bar over the batches.

    Returns:
        A `DynamicProperty` with one `LayerDynamics` per distinct transformer layer.
    """
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {list(UNITS)}, got {unit!r}.")
    batches = list(batches)
    if not batches:
        raise ValueError("dynamic_property needs at least one batch of inputs.")
    context: dict[str, Any] = {"unit": unit}
    ffn = _ffn_modules(model)
    refs = named_pad_linears(model)
    probes = [
        _LayerProbe(i, moe, _linears_inside(moe, refs), hidden, context) for i, (_, moe, hidden) in enumerate(ffn)
    ]
    device = next(model.parameters()).device
    keep = ("input_ids", "attention_mask", "token_type_ids")
    was_training = model.training
    model.eval()
    bar = logging.tqdm(batches, desc=desc, unit="batch", disable=not progress)
    try:
        with torch.no_grad(), _hooks(probes, [module for module, _, _ in ffn]):
            for batch in bar:
                inputs = {k: v.to(device) for k, v in batch.items() if k in keep and v is not None}
                mask = inputs.get("attention_mask")
                if mask is None:
                    mask = torch.ones_like(inputs["input_ids"])
                context["mask"] = mask.bool()
                model(**inputs)
    finally:
        bar.close()
        model.train(was_training)
    return DynamicProperty(unit=unit, layers=[probe.result() for probe in probes])


# ------------------------------------------------------------------------------------ vision (dynamic convolution)
@dataclass
class ConvLayerDynamics:
    """Parameter variance and output variance of one convolution of a vision model (paper Fig. 6)."""

    layer: int
    """Index among the model's convolutions except the stem, in module order."""
    name: str
    """Module path of the convolution."""
    dynamic: bool
    """Whether the convolution computes per-sample kernels (PAD / DY-Conv / CondConv)."""
    parameter_variance: float
    output_variance: float
    dynamic_ratio: float
    """Fraction of the kernel entries that are dynamic (1 for DY-Conv and CondConv, 0 for a static conv)."""
    units: int
    """Images the variances are taken over."""


class _ConvProbe:
    """Collects one convolution's attention covariance and per-image output moments from forward hooks."""

    def __init__(self, index: int, name: str, module: nn.Module, kind: str) -> None:
        self.index, self.name, self.module, self.kind = index, name, module, kind
        self.outputs: RunningMoments | None = None
        self.weights = RunningMoments(module.num_experts, full=True) if kind != "static" else None

    def on_output(self, module: nn.Module, args: Any, output: Tensor) -> None:
        flat = output.detach().float().reshape(output.shape[0], -1)  # one row per image: (B, C * H' * W')
        if self.outputs is None:
            self.outputs = RunningMoments(flat.shape[1])
        self.outputs.update(flat)

    def on_weights(self, module: nn.Module, args: Any, output: Tensor) -> None:
        self.weights.update(output.detach().to(torch.float64))

    def result(self) -> ConvLayerDynamics:
        output_variance = float(self.outputs.variance().mean()) if self.outputs is not None else 0.0
        units = self.outputs.count if self.outputs is not None else 0
        if self.kind == "static":
            return ConvLayerDynamics(self.index, self.name, False, 0.0, output_variance, 0.0, units)
        cov = self.weights.covariance()
        if self.kind == "pad":  # attention sums to 1: the centred Gram of the eq. 4 kernels (module docstring)
            variance = parameter_variance([self.module], cov)
            ratio = self.module.dynamic_ratio()
        else:  # CondConv: independent sigmoids, sum r_i != 1: sum_j Var(sum_i r_i W_ij) = trace(C G), G uncentred
            kernels = self.module.conv.weight.detach().to(torch.float64).cpu()  # (k, numel)
            variance = max(float(torch.trace(cov @ (kernels @ kernels.T))), 0.0) / kernels.shape[1]
            ratio = 1.0
        return ConvLayerDynamics(self.index, self.name, True, variance, output_variance, ratio, units)


def _conv_layers(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """`(name, module, kind)` of every convolution but the first (the stem), in module order; kind is
    ``"pad"`` (PAD / DY-Conv), ``"condconv"`` or ``"static"`` (a plain `nn.Conv2d`)."""
    from .core.pad_weight import PADWeight
    from .vision.condconv import CondConvWrapper

    found = []
    for name, module in model.named_modules():
        if isinstance(module, PADWeight):
            found.append((name, module, "pad"))
        elif isinstance(module, CondConvWrapper):
            found.append((name, module, "condconv"))
        elif isinstance(module, nn.Conv2d) and not any(name.startswith(f"{n}.") for n, _, k in found if k != "static"):
            found.append((name, module, "static"))
    if not found:
        raise TypeError(f"conv_dynamic_property needs a vision model with convolutions, got {type(model).__name__}.")
    return found[1:] if found[0][2] == "static" else found  # the stem stays static in every variant


def conv_dynamic_property(
    model: nn.Module, pixel_values: Iterable[Tensor], *, progress: bool = True, desc: str = "Dynamic property"
) -> DynamicProperty:
    """Parameter and output variance across images of every convolution but the stem (paper Fig. 6).

    Per convolution, with ``pi(x)`` its kernel attention (PAD / DY-Conv; CondConv: its routing weights) and
    ``W(x) = sum_i pi_i(x) W_eff_i`` the kernel computed for image ``x``:

    * parameter variance = the variance across images of each entry of ``W(x)``, averaged over the entries
      (0 for a static convolution; computed as ``trace(Cov(pi) G)`` without forming ``W(x)``);
    * output variance = the variance across images of each entry of the convolution's output `(C, H', W')`,
      averaged over the entries.

    Args:
        model: a vision model (Transformers' ResNet / MobileNetV2, a PAD / DY-Conv model, a CondConv model),
            run in eval mode without autograd.
        pixel_values: batches of images `(B, C, H, W)`.
    """
    batches = list(pixel_values)
    if not batches:
        raise ValueError("conv_dynamic_property needs at least one batch of images.")
    probes, handles = [], []
    for index, (name, module, kind) in enumerate(_conv_layers(model)):
        probe = _ConvProbe(index, name, module, kind)
        probes.append(probe)
        handles.append(module.register_forward_hook(probe.on_output))
        if kind == "pad":
            handles.append(module.attention.register_forward_hook(probe.on_weights))
        elif kind == "condconv":
            handles.append(
                module.routing.register_forward_hook(lambda m, a, o, p=probe: p.on_weights(m, a, o.sigmoid()))
            )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    bar = logging.tqdm(batches, desc=desc, unit="batch", disable=not progress)
    try:
        with torch.no_grad():
            for batch in bar:
                model(pixel_values=batch.to(device))
    finally:
        bar.close()
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return DynamicProperty(unit="image", layers=[probe.result() for probe in probes])
