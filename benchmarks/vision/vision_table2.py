"""Params and FLOPs of the paper's Table 2 (ResNet-10, ResNet-18, ResNet-50, MobileNetV2 x1.0; static / CondConv k=8 /
DY-Conv k=4 / PAD kappa 0.3), measured on Transformers' models built in code (no downloads), next to the paper.

    python benchmarks/vision/vision_table2.py            # a few seconds per model on a CPU
    python benchmarks/vision/vision_table2.py --models resnet18 resnet50

Writes `benchmarks/results/vision_table2.json` and `.md`. Parameters: `vision.complexity.count_parameters`
(PAD: ``kappa*K*W + (1-kappa)*W`` per convolution, everything else as stored); FLOPs: multiply-adds at
224x224 from `torch.utils.flop_counter` (`count_flops(...).macs`; PAD with the kernel aggregation over the
dynamic entries only, `macs_paper`). A PAD model's masks are drawn at random with exactly kappa of each
convolution dynamic: the counts depend only on nnz(M). Differences > 5% from the paper are flagged; the
"counting candidates" table tries other countings of the paper's PAD and DY-Conv numbers (docs/vision.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from transformers import (
    AutoModelForImageClassification,
    MobileNetV2Config,
    MobileNetV2ForImageClassification,
    ResNetConfig,
    ResNetForImageClassification,
)

import pad_moe_transformers  # noqa: F401  (registers the pad_dyconv Auto classes)
from pad_moe_transformers.vision import PADDyConvConfig
from pad_moe_transformers.vision.complexity import count_flops, count_parameters
from pad_moe_transformers.vision.condconv import convert_convs_to_condconv

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _paths
from _paths import ROOT  # noqa: E402

KAPPA, DY_KERNELS, CONDCONV_EXPERTS = 0.3, 4, 8
MODES = ("static", "condconv", "dyconv", "pad")

# PAD-Net paper (Table 2): (params in M, FLOPs = multiply-adds in M) per model and mode.
PAPER_TABLE_2 = {
    "resnet10": {"static": (5.2, 890), "condconv": (36.7, 920), "dyconv": (18.6, 910), "pad": (6.9, 900)},
    "resnet18": {"static": (11.1, 1810), "condconv": (81.4, 1890), "dyconv": (42.7, 1860), "pad": (15.1, 1830)},
    "resnet50": {"static": (23.5, 3860), "condconv": (129.9, 3980), "dyconv": (100.9, 3970), "pad": (33.8, 3900)},
    "mobilenetv2_1.0": {
        "static": (3.5, 300.8),
        "condconv": (27.5, 329.0),
        "dyconv": (11.1, 312.9),
        "pad": (6.1, 304.4),
    },
}


def base_configs() -> dict:
    """ImageNet-sized configs (1000 classes). ResNet-50 with the stride on the first 1x1 of a bottleneck
    (`downsample_in_bottleneck`, the original ResNet): its 3.86G multiply-adds are the paper's; Transformers'
    default puts the stride on the 3x3 (ResNet v1.5, 4.09G), with the same parameters."""
    return {
        "resnet10": ResNetConfig(
            layer_type="basic", depths=[1, 1, 1, 1], hidden_sizes=[64, 128, 256, 512], embedding_size=64,
            num_labels=1000,
        ),
        "resnet18": ResNetConfig(
            layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512], embedding_size=64,
            num_labels=1000,
        ),
        "resnet50": ResNetConfig(
            layer_type="bottleneck", depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048], embedding_size=64,
            num_labels=1000, downsample_in_bottleneck=True,
        ),
        "mobilenetv2_1.0": MobileNetV2Config(depth_multiplier=1.0, num_labels=1000, image_size=224),
    }  # fmt: skip


def random_masks(model: torch.nn.Module, kappa: float, seed: int = 0) -> None:
    """Exactly round(kappa * W) dynamic entries in every PAD convolution, at random (counting only)."""
    from pad_moe_transformers.core import named_pad_linears

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for ref in named_pad_linears(model):
            mask = torch.zeros(ref.module.mask.numel(), dtype=torch.bool)
            mask[torch.randperm(mask.numel(), generator=generator)[: round(kappa * mask.numel())]] = True
            ref.module.mask.copy_(mask.view_as(ref.module.mask))


def build(name: str, config, mode: str) -> torch.nn.Module:
    dense_cls = ResNetForImageClassification if config.model_type == "resnet" else MobileNetV2ForImageClassification
    if mode == "static":
        return dense_cls(config)
    if mode == "condconv":
        return convert_convs_to_condconv(dense_cls(config), num_experts=CONDCONV_EXPERTS)
    ratio = 1.0 if mode == "dyconv" else KAPPA
    model = AutoModelForImageClassification.from_config(
        PADDyConvConfig.from_base(config, num_kernels=DY_KERNELS, dynamic_ratio=ratio)
    )
    if mode == "pad":
        random_masks(model, KAPPA)
    return model


def candidates(params: dict) -> dict[str, float]:
    """Other countings of a DY-Conv / PAD model's parameters (in M) from the measured parts (docs/vision.md):
    W = kernel entries of the converted convolutions, A = attention, F = classifier, R = the rest."""
    K, k = DY_KERNELS, KAPPA
    W = params["entries"]
    A, F = params["attention"], params["classifier"]
    R = params["total"] - params["dynamic"] - params["static"] - A - F
    share = W / (1 - k + k / K)  # kappa = dynamic share of the stored kernel entries: K n = kappa (K n + W - n)
    return {
        "dyconv: K*W + A + F + R": (K * W + A + F + R) / 1e6,
        "pad: kappa*K*W + (1-kappa)*W + A + F + R (ours)": (k * K * W + (1 - k) * W + A + F + R) / 1e6,
        "pad: same without the classifier": (k * K * W + (1 - k) * W + A + R) / 1e6,
        "pad: same without the attention": (k * K * W + (1 - k) * W + F + R) / 1e6,
        "pad: kappa = share of stored kernel entries, + A + F + R": (share + A + F + R) / 1e6,
        "pad: kappa = share of stored kernel entries, + kappa*A + F + R": (share + k * A + F + R) / 1e6,
    }


def measure(name: str, config, mode: str, image_size: int) -> dict:
    start = time.time()
    torch.manual_seed(0)
    model = build(name, config, mode)
    params = count_parameters(model).to_dict()
    layers = params.pop("layers")
    params["entries"] = sum(layer["entries"] for layer in layers.values())
    flops = count_flops(model, image_size=image_size).to_dict()
    paper_params, paper_flops = PAPER_TABLE_2[name][mode]
    macs = flops["macs_paper"] if mode == "pad" else flops["macs"]
    row = {
        "model": name,
        "mode": mode,
        "params_M": params["total"] / 1e6,
        "flops_M": macs / 1e6,
        "paper_params_M": paper_params,
        "paper_flops_M": paper_flops,
        "params_diff": params["total"] / 1e6 / paper_params - 1,
        "flops_diff": macs / 1e6 / paper_flops - 1,
        "parameters": params,
        "flop_count": flops,
        "seconds": time.time() - start,
    }
    if mode in ("dyconv", "pad"):
        row["candidates_M"] = candidates(params)
    if mode == "condconv":  # CondConv's paper also makes the final FC a CondConv layer (k weight matrices)
        weights = (
            model.classifier[-1].weight
            if isinstance(model.classifier, torch.nn.Sequential)
            else model.classifier.weight
        )
        row["candidates_M"] = {
            "condconv: k*W + routing + F + R (ours)": params["total"] / 1e6,
            "condconv: classifier weights as k experts too": (
                params["total"] + (CONDCONV_EXPERTS - 1) * weights.numel()
            )
            / 1e6,
        }
    return row


def write_markdown(rows: list[dict], path: Path, threshold: float) -> None:
    def flag(diff: float) -> str:
        return f"{diff:+.1%}" + (" **!**" if abs(diff) > threshold else "")

    lines = [
        f"Params (M) and FLOPs (multiply-adds, M, 224x224) measured on Transformers' models vs the PAD-Net paper's "
        f"Table 2. CondConv k={CONDCONV_EXPERTS}, DY-Conv k={DY_KERNELS}, PAD k={DY_KERNELS} kappa={KAPPA}; every "
        f"convolution but the stem converted. **!** = differs by more than {threshold:.0%} (docs/vision.md says why).",
        "",
        "| model | mode | params (ours) | params (paper) | diff | FLOPs (ours) | FLOPs (paper) | diff |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['params_M']:.1f} | {r['paper_params_M']} | {flag(r['params_diff'])} "
            f"| {r['flops_M']:.1f} | {r['paper_flops_M']} | {flag(r['flops_diff'])} |"
        )
    lines += ["", "Counting candidates for the paper's DY-Conv / PAD params (M; W = converted kernel entries, "
              "A = attention, F = classifier, R = the rest):", ""]  # fmt: skip
    dynamic = [r for r in rows if "candidates_M" in r]
    for r in dynamic:
        lines.append(f"- {r['model']} {r['mode']} (paper {r['paper_params_M']}): " + "; ".join(
            f"{name} = {value:.2f}" for name, value in r["candidates_M"].items()
            if name.startswith(r["mode"])
        ))  # fmt: skip
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(PAPER_TABLE_2), choices=list(PAPER_TABLE_2))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--threshold", type=float, default=0.05, help="flag differences above this fraction")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vision_table2"))
    args = parser.parse_args()
    configs = base_configs()
    rows = []
    for name in args.models:
        for mode in args.modes:
            row = measure(name, configs[name], mode, args.image_size)
            print(
                f"{name:16s} {mode:9s} params {row['params_M']:7.2f}M (paper {row['paper_params_M']}) "
                f"FLOPs {row['flops_M']:8.1f}M (paper {row['paper_flops_M']}) [{row['seconds']:.1f}s]",
                flush=True,
            )
            rows.append(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"settings": vars(args) | {"out": None}, "torch": torch.__version__, "platform": platform.platform()}
    out.with_suffix(".json").write_text(json.dumps(report | {"rows": rows}, indent=2))
    write_markdown(rows, out.with_suffix(".md"), args.threshold)
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
