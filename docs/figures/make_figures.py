#!/usr/bin/env python
"""Draw the figures of docs/concepts.md (needs matplotlib):

    python docs/figures/make_figures.py          # writes docs/figures/pad_eq4.png and docs/figures/imp_schedule.png

* `pad_eq4.png`: eq. 4 on a toy 6 x 8 linear with 3 experts, computed with `PADExpertLinear` itself
  (`effective_weight()`), so the picture is what the package computes.
* `imp_schedule.png`: the IMP schedule (`imp_schedule`, kappa ** (t / rounds)) and the parameters of
  one FFN as a multiple of the dense FFN for dense / MoE / PAD against kappa (8 experts), counted by
  `parameter_report()` on a tiny model.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import BertConfig  # noqa: E402

import pad_moe_transformers as pmt  # noqa: E402
from pad_moe_transformers.partition import imp_schedule  # noqa: E402

HERE = Path(__file__).resolve().parent


def eq4_figure(path: Path) -> None:
    torch.manual_seed(4)
    linear = pmt.PADExpertLinear(in_features=8, out_features=6, num_experts=3, bias=False)
    with torch.no_grad():
        linear.expert_weight.normal_()
        linear.static_weight.normal_()
        linear.mask.copy_(torch.rand(6, 8) < 0.5)
        linear.scale_logit.fill_(0.2)  # l_d = 2 sigmoid(0.2) = 1.10, l_s = 0.90
    l_s, l_d = (float(x.detach()) for x in linear.scale_factors())
    mask = linear.mask.numpy()
    with torch.no_grad():
        merged = linear.effective_weight().detach().numpy()
    unused = np.ma.masked_array  # entries eq. 4 never reads are drawn grey
    panels = [("mask M\n(black: M = 1, dynamic)", mask.astype(float), "Greys", (0, 1))]
    for e in range(3):
        panels.append(
            (
                f"expert W_{e + 1}\n(read where M = 1)",
                unused(linear.expert_weight[e].detach().numpy(), ~mask),
                "coolwarm",
                (-2.5, 2.5),
            )
        )
    panels.append(
        ("static W_s\n(read where M = 0)", unused(linear.static_weight.detach().numpy(), mask), "coolwarm", (-2.5, 2.5))
    )
    for e in range(3):
        panels.append(
            (
                f"W_eff_{e + 1} = l_d M W_{e + 1} + l_s (1-M) W_s\n(static entries outlined)",
                merged[e],
                "coolwarm",
                (-2.5, 2.5),
            )
        )
    fig, axes = plt.subplots(2, 4, figsize=(11, 5.4))
    order = [0, 1, 2, 3, 4, 5, 6, 7]
    for ax, index in zip(axes.ravel(), order):
        title, data, cmap, (lo, hi) = panels[index]
        colormap = plt.get_cmap(cmap).copy()
        colormap.set_bad("#d9d9d9")
        ax.imshow(data, cmap=colormap, vmin=lo, vmax=hi)
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        if index >= 5:  # outline the static entries: identical in every W_eff
            for r, c in zip(*np.nonzero(~mask)):
                ax.add_patch(plt.Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, lw=1.6, ec="black"))
    fig.suptitle(
        f"PAD-Net eq. 4 for one linear, 3 experts, kappa ~ 0.5, l_d = {l_d:.2f}, l_s = {l_s:.2f}: "
        "dynamic entries differ per expert,\nstatic entries are l_s W_s in every expert (grey: stored but never read)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _ffn_parameters(kappa: float | None, experts: int = 8) -> float:
    """FFN weight parameters of a tiny BERT layer as counted by `parameter_report`, over the dense FFN's."""
    base = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    model = pmt.PADMoEModel(pmt.PADMoEConfig.from_base(base, num_experts=experts))
    if kappa is not None:
        generator = torch.Generator().manual_seed(0)
        masks = {}
        for name, linear in pmt.partition.pad_linears(model).items():
            order = torch.randperm(linear.mask.numel(), generator=generator)
            mask = torch.zeros(linear.mask.numel(), dtype=torch.bool)
            mask[order[: round(kappa * linear.mask.numel())]] = True
            masks[name] = mask.view_as(linear.mask)
        pmt.apply_partition(model, masks, {"method": "figure", "target_dynamic_ratio": kappa})
    rows = model.parameter_report().layers
    dense = sum(linear.mask.numel() for linear in pmt.partition.pad_linears(model).values())
    return sum(row.dynamic + row.static for row in rows) / dense


def schedule_figure(path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    rounds = 5
    for kappa in (0.7, 0.5, 0.3, 0.1):
        left.plot(range(rounds + 1), [1.0, *imp_schedule(kappa, rounds)], marker="o", label=f"kappa = {kappa}")
    left.set_xlabel("IMP round t")
    left.set_ylabel("dynamic ratio kept")
    left.set_title("IMP schedule: kappa ** (t / rounds), rounds = 5", fontsize=9)
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    kappas = [0.1, 0.3, 0.5, 0.7, 0.9]
    right.plot(kappas, [_ffn_parameters(k) for k in kappas], marker="o", label="PAD: kappa E + (1 - kappa)")
    right.axhline(_ffn_parameters(None), color="C1", ls="--", label="MoE: E")
    right.axhline(1.0, color="C2", ls=":", label="dense: 1")
    right.set_xlabel("kappa (dynamic ratio)")
    right.set_ylabel("FFN weights / dense FFN")
    right.set_title("FFN parameters, 8 experts (parameter_report)", fontsize=9)
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    eq4_figure(HERE / "pad_eq4.png")
    schedule_figure(HERE / "imp_schedule.png")
    print(f"wrote {HERE / 'pad_eq4.png'} and {HERE / 'imp_schedule.png'}")


if __name__ == "__main__":
    main()
