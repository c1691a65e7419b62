"""Parameter counts of a PAD-MoE model, as the paper counts them (Tables 1-5 "Params")."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .core.pad_weight import PAD_WEIGHT_PARAMETER_NAMES
from .core.registry import named_pad_linears


@dataclass
class LayerParameterCount:
    layer: int
    linear: str
    dynamic_ratio: float
    dynamic: int
    """Weight entries that are dynamic, over all experts (`E * nnz(M)`)."""
    static: int
    """Weight entries of the shared static weight that are used (`numel - nnz(M)`)."""
    other: int
    """Biases and scale factors of the linear."""

    @property
    def total(self) -> int:
        return self.dynamic + self.static + self.other


@dataclass
class ParameterReport:
    """Parameter counts as the paper counts them: after partition, each expert counts only its
    dynamic entries and the static weight only its static entries (the compact size)."""

    layers: list[LayerParameterCount] = field(default_factory=list)
    router: int = 0
    non_moe: int = 0
    moe_equivalent: int = 0
    """Parameters of the same model as a fully dynamic MoE (every expert dense)."""
    dense_equivalent: int = 0
    """Parameters of the dense model it was upcycled from."""

    @property
    def dynamic(self) -> int:
        return sum(row.dynamic for row in self.layers)

    @property
    def static(self) -> int:
        return sum(row.static for row in self.layers)

    @property
    def total(self) -> int:
        return self.dynamic + self.static + sum(row.other for row in self.layers) + self.router + self.non_moe

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "dynamic": self.dynamic,
            "static": self.static,
            "router": self.router,
            "non_moe": self.non_moe,
            "moe_equivalent": self.moe_equivalent,
            "dense_equivalent": self.dense_equivalent,
            "layers": [dict(vars(row), total=row.total) for row in self.layers],
        }


def parameter_report(model: nn.Module) -> ParameterReport:
    """Total / dynamic / static parameter counts per layer and in all, counted as in the paper."""
    report = ParameterReport()
    moe_param_ids = set()
    for _, moe in model.named_pad_layers():
        moe_param_ids.update(id(p) for p in moe.parameters())
        report.router += moe.router.weight.numel()
    for ref in named_pad_linears(model):
        linear = ref.module
        nnz = linear.num_dynamic()
        other = sum(p.numel() for n, p in linear.named_parameters() if n not in PAD_WEIGHT_PARAMETER_NAMES)
        report.layers.append(
            LayerParameterCount(
                layer=ref.layer,
                linear=ref.role,
                dynamic_ratio=nnz / linear.mask.numel(),
                dynamic=linear.num_experts * nnz,
                static=linear.mask.numel() - nnz,
                other=other,
            )
        )
        bias = 0 if linear.expert_bias is None else linear.out_features
        report.moe_equivalent += linear.num_experts * (linear.mask.numel() + bias)
        report.dense_equivalent += linear.mask.numel() + bias
    report.non_moe = sum(p.numel() for p in model.parameters() if id(p) not in moe_param_ids)
    report.moe_equivalent += report.non_moe + report.router
    report.dense_equivalent += report.non_moe
    return report
