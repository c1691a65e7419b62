"""From scores to masks: the IMP schedule, eq. 9 thresholding, and the refusal of scores that carry no
information (the upcycling tie)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..pad_linear import PADExpertLinear
from ._common import round_count
from .options import SCOPES
from .scores import mask_direction


def imp_schedule(dynamic_ratio: float, rounds: int) -> list[float]:
    """Target dynamic ratio after each round: ``kappa ** (t / rounds)`` for ``t = 1..rounds``."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}.")
    return [dynamic_ratio ** (t / rounds) for t in range(1, rounds + 1)]


def check_scope(scope: str) -> None:
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {list(SCOPES)}, got {scope!r}.")


def select_masks(
    scores: dict[str, Tensor], masks: dict[str, Tensor], ratio: float, scope: str = "linear"
) -> dict[str, Tensor]:
    """Eq. 9: keep the highest-scoring elements dynamic so that `ratio` of all elements stay dynamic.

    Only currently dynamic elements (``masks`` True) are candidates, so static elements stay static
    (a group with fewer dynamic elements than asked for keeps all of them). Ties are broken by position
    (stable sort), so the result is deterministic. The units may have any shape: `(out, in)` elements of
    a linear, or `(I,)` neurons of a MoE layer.

    Args:
        scores: `{name: (out, in)}` (or `(I,)`) scores; higher = more important to keep dynamic.
        masks: `{name: same shape}` bool current masks.
        ratio: fraction of each unit group (`scope="linear"`) or of all units (`"global"`) kept dynamic.

    Returns:
        New `{name: same shape}` bool masks, a subset of `masks`.
    """
    check_scope(scope)
    names = list(scores)
    groups = [[n] for n in names] if scope == "linear" else [names]
    for name in names:
        candidates = scores[name].detach()[masks[name].to(scores[name].device)]
        if not bool(torch.isfinite(candidates).all()):
            bad = int((~torch.isfinite(candidates)).sum())
            raise ValueError(
                f"The scores of {name} hold {bad} NaN/inf value(s) among its {candidates.numel()} candidates; a mask "
                "chosen from them would be arbitrary. Check the partition batches and the model weights for NaN/inf "
                "(or an fp16 overflow) and partition again."
            )
    new_masks = {}
    for group in groups:
        flat = torch.cat([_candidates(scores[n], masks[n]) for n in group])
        total = sum(masks[n].numel() for n in group)
        available = int(sum(int(masks[n].sum()) for n in group))
        keep = min(round_count(ratio, total), available)
        order = torch.sort(flat, descending=True, stable=True).indices[:keep]
        chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
        chosen[order] = True
        offset = 0
        for n in group:
            size = masks[n].numel()
            new_masks[n] = chosen[offset : offset + size].view_as(masks[n]).to(masks[n].device)
            offset += size
    return new_masks


def _candidates(score: Tensor, mask: Tensor) -> Tensor:
    flat = score.detach().reshape(-1).to(torch.float64)
    return torch.where(mask.reshape(-1).to(flat.device), flat, float("-inf"))


def check_reachable(masks: dict[str, Tensor], ratio: float, scope: str, unit: str) -> None:
    """Raise a `ValueError` if `masks` (`{name: bool}`, the current units) have fewer dynamic units than a
    partition at `ratio` keeps: a partition only makes dynamic units static, so it cannot raise the ratio."""
    groups = [[n] for n in masks] if scope == "linear" else [list(masks)]
    for group in groups:
        total = sum(masks[n].numel() for n in group)
        available = sum(int(masks[n].sum()) for n in group)
        if available < round_count(ratio, total):
            where = group[0] if scope == "linear" else f"the model (all {unit}s, scope='global')"
            raise ValueError(
                f"dynamic_ratio={ratio} asks for {round_count(ratio, total)} dynamic {unit}s in {where}, but only "
                f"{available} of {total} are dynamic now (ratio {available / total:.4f}). A partition only makes "
                f"dynamic {unit}s static, so it cannot raise the ratio: re-partition at a dynamic_ratio of at most "
                f"{available / total:.4f}, or start again from the fully dynamic (freshly upcycled) model."
            )


def experts_equal_static(linear: PADExpertLinear, mask: Tensor) -> bool:
    """True when ``l_d*W_i == l_s*W_static`` on every dynamic entry of every expert (eq. 7 is then 0)."""
    mask = mask.to(linear.mask.device)
    # One expert at a time: `(1, out, in)` temporaries instead of three `(E, out, in)` ones.
    return not any(
        bool(((mask_direction(linear, k)[0] != 0) & mask).any()) for k in range(linear.expert_weight.shape[0])
    )


def layer_equals_static(fc_in: PADExpertLinear, fc_out: PADExpertLinear, neurons: Tensor) -> bool:
    """Neuron granularity: True when every dynamic neuron's fc_in row, fc_out column and fc_in bias equal the
    (scaled) static copies in every expert, so the neuron derivative is exactly zero."""
    neurons = neurons.to(fc_in.mask.device)
    in_mask = neurons.unsqueeze(1).expand_as(fc_in.mask)
    out_mask = neurons.unsqueeze(0).expand_as(fc_out.mask)
    if not (experts_equal_static(fc_in, in_mask) and experts_equal_static(fc_out, out_mask)):
        return False
    if fc_in.expert_bias is None or fc_in.static_bias is None:
        return True
    with torch.no_grad():
        return not bool(((fc_in.expert_bias != fc_in.static_bias).any(dim=0) & neurons).any())


def check_not_tied(
    raw: dict[str, Tensor], masks: dict[str, Tensor], scope: str, score: str, equals_static: Callable[[str], bool]
) -> None:
    """Refuse scores that carry no information over a scope unit: the partition would be arbitrary.

    For the eq. 7 scores the test is structural (`equals_static(name)` for each linear, or each layer
    with neuron granularity): if every expert equals the (scaled) static weight on every dynamic entry,
    the true derivative is exactly zero and what autograd returns is rounding noise (~1e-12: the two
    paths through ``M`` and ``1 - M`` cancel only up to float rounding).
    """
    units = [[n] for n in raw] if scope == "linear" else [list(raw)]
    for unit in units:
        if score == "connection":
            tied = all(not bool((raw[n][masks[n]] != 0).any()) for n in unit)
        else:
            tied = all(equals_static(n) for n in unit)
        if tied:
            where = unit[0] if scope == "linear" else ("all linears" if ".fc_" in unit[0] else "all MoE layers")
            hint = (
                "The experts equal the static weight (upcycled copies with l_s = l_d), so "
                "dW_eff/dM = l_d*W_i - l_s*W_static = 0 and eq. 7 is exactly zero: every score ties. Use "
                "score='warmup_grad' (the default: a short warm-up of the experts before scoring, with "
                "warmup_steps > 0 and warmup_lr > 0), score='connection', or perturb_experts() after upcycling."
                if score != "connection"
                else "Check that the batches reach the loss (labels present) and that the weights are not zero."
            )
            raise ValueError(f"The {score!r} scores of {where} carry no information. {hint}")
