"""`pad-moe inspect PATH`: what a PAD-MoE checkpoint holds, per layer and linear (or, for a PAD dynamic-
convolution checkpoint, per convolution: `collect_vision`).

For each PAD linear (`fc_in`, `fc_out` of every MoE layer): shape, dynamic ratio (fraction of mask
entries = 1), scale factors `l_s` / `l_d`, parameters counted as the paper counts them (dynamic =
`E * nnz(M)`, static = `numel - nnz(M)`), and the bytes its tensors take in the safetensors files
(read from the file headers). Per layer: how the mask is spread over the FFN neurons (a neuron's
density = the dynamic fraction of its `fc_in` row and `fc_out` column) and, when input samples are
given (`--task/--data_dir` or `--text_file`), the share of tokens each expert receives.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import torch
from safetensors import safe_open
from transformers.utils import logging

from . import _common

logger = logging.get_logger("pad_moe_transformers.cli")


def add_parser(subparsers, parents: list[argparse.ArgumentParser] | None = None) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "inspect",
        parents=parents or [],
        help="table of a PAD-MoE checkpoint's layers and linears (ratios, scales, parameters, bytes, expert usage), "
        "or of a PAD dynamic-convolution checkpoint's convolutions",
        description="Show, per MoE layer and linear, the dynamic ratio, the scale factors l_s / l_d, the dynamic and "
        "static parameters and the bytes on disk of a PAD-MoE checkpoint; with input samples also the expert usage. "
        "--plot draws the per-layer dynamic ratios and the per-neuron mask density as heatmaps.",
        epilog="examples:\n  pad-moe inspect out/rte_pad\n  pad-moe inspect out/rte_pad --json\n"
        "  pad-moe inspect out/rte_pad --plot rte_pad.png --task rte --data_dir glue_data --samples 64",
        formatter_class=_common.HelpFormatter,
    )
    parser.add_argument("path", help="PAD-MoE or PAD dynamic-convolution checkpoint: a local folder or a hub id.")
    parser.add_argument("--json", action="store_true", help="print everything as one JSON object instead of tables.")
    parser.add_argument(
        "--plot",
        metavar="FILE",
        help="write heatmaps of the dynamic ratios (and expert usage) to FILE (.png/.pdf/.svg; needs matplotlib).",
    )
    _common.add_data_arguments(parser, split_default=None, samples_default=64)
    parser.set_defaults(run=run)
    return parser


# ------------------------------------------------------------------------------------ collection
def tensor_bytes(files: list[str]) -> tuple[dict[str, int], int]:
    """Data bytes of every tensor in the safetensors `files`, and the bytes of their headers (the rest of each
    file: safetensors refuses a file whose tensors do not cover it exactly)."""
    sizes, headers = {}, 0
    for path in files:
        with safe_open(path, framework="pt") as handle:
            file_sizes = {key: handle.get_tensor(key).nbytes for key in handle.keys()}
        headers += os.path.getsize(path) - sum(file_sizes.values())
        sizes.update(file_sizes)
    return sizes, headers


def pad_layers(model) -> dict[int, dict[str, Any]]:
    """`{layer: {"fc_in": ref, "fc_out": ref}}` of the model's PAD linears (from `core.named_pad_linears`)."""
    from ..core import named_pad_linears

    layers: dict[int, dict[str, Any]] = {}
    for ref in named_pad_linears(model):
        layers.setdefault(ref.layer, {})[ref.role] = ref
    return layers


def _neuron_density(linears: dict[str, Any]) -> torch.Tensor:
    """`(I,)` dynamic fraction of each intermediate neuron: its fc_in row and fc_out column together."""
    fc_in, fc_out = linears["fc_in"].module.mask, linears["fc_out"].module.mask
    return (fc_in.sum(dim=1) + fc_out.sum(dim=0)).double() / (fc_in.shape[1] + fc_out.shape[0])


def collect(path: str, model, usage: dict[int, list[int]] | None = None, usage_samples: int = 0) -> dict[str, Any]:
    """Everything `inspect` shows, as a JSON-serialisable dict."""
    from ..checkpoint import checkpoint_layout, resolve_checkpoint_files, theoretical_checkpoint_size

    config = model.config
    files, _ = resolve_checkpoint_files(path)
    sizes, header_bytes = tensor_bytes(files)
    report = {(row.layer, row.linear): row for row in model.parameter_report().layers}
    linears, layers, pad_bytes = [], [], 0
    for index, refs in pad_layers(model).items():
        density = _neuron_density(refs)
        layers.append(
            {
                "layer": index,
                "neurons": int(density.numel()),
                "neuron_density_min": float(density.min()),
                "neuron_density_median": float(density.median()),
                "neuron_density_max": float(density.max()),
                "neurons_all_dynamic": int((density == 1).sum()),
                "neurons_all_static": int((density == 0).sum()),
            }
        )
        for role, ref in refs.items():
            on_disk = sum(v for k, v in sizes.items() if k.startswith(ref.name + "."))
            pad_bytes += on_disk
            l_s, l_d = ref.module.scale_factors()
            row = report[(index, role)]
            linears.append(
                {
                    "layer": index,
                    "linear": role,
                    "shape": [ref.module.out_features, ref.module.in_features],
                    "dynamic_ratio": row.dynamic_ratio,
                    "l_s": float(l_s.detach()),
                    "l_d": float(l_d.detach()),
                    "dynamic": row.dynamic,
                    "static": row.static,
                    "other": row.other,
                    "bytes_on_disk": on_disk,
                }
            )
    params = model.parameter_report().to_dict()
    params.pop("layers")
    partition = config.partition
    total_bytes = sum(sizes.values()) + header_bytes
    return {
        "path": path,
        "class": type(model).__name__,
        "base_model_type": config.base_model_type,
        "num_experts": config.num_experts,
        "top_k": config.num_experts_per_tok,
        "granularity": config.partition_granularity,
        "scale_factor_mode": config.scale_factor_mode,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "layout": checkpoint_layout(model),
        "partition": None
        if partition is None
        else {
            k: partition.get(k)
            for k in (
                "method",
                "score",
                "scope",
                "target_dynamic_ratio",
                "achieved_dynamic_ratio_total",
                "num_batches",
                "rounds",
            )
        },
        "parameters": params,
        "bytes_on_disk": {
            "total": total_bytes,
            "pad_linears": pad_bytes,
            "other_tensors": sum(sizes.values()) - pad_bytes,
            "headers": header_bytes,
            "theory": theoretical_checkpoint_size(model)["total_bytes"],
            "files": len(files),
        },
        "linears": linears,
        "layers": layers,
        "expert_usage": None
        if usage is None
        else {
            "samples": usage_samples,
            "tokens": int(sum(next(iter(usage.values()), [])) // max(config.num_experts_per_tok, 1)),
            "counts": {str(k): v for k, v in usage.items()},
        },
    }


def record_expert_usage(model, args: argparse.Namespace) -> tuple[dict[int, list[int]], int]:
    """Run the model on the input samples and return `model.expert_usage()` (top-k slots per expert)."""
    texts, _ = _common.read_texts(args)
    tokenizer = _common.load_tokenizer([args.tokenizer, args.path])
    batches = _common.make_batches(tokenizer, texts, None, args.batch_size, args.max_seq_length)
    model.eval()
    model.reset_expert_usage()
    keep = ("input_ids", "attention_mask", "token_type_ids")
    with torch.no_grad():
        for batch in logging.tqdm(batches, desc="Expert usage", unit="batch"):
            model(**{k: v for k, v in batch.items() if k in keep})
    return model.expert_usage(), len(texts)


# ------------------------------------------------------------------------------------ output
def render(info: dict[str, Any]) -> str:
    h = _common
    part = info["partition"]
    params, disk = info["parameters"], info["bytes_on_disk"]
    lines = [
        f"{info['path']}: {info['class']} ({info['base_model_type']}), {info['num_experts']} experts, "
        f"top-{info['top_k']}, "
        f"granularity {info['granularity']}, scale factors {info['scale_factor_mode']}, {info['dtype']}",
        "partition: "
        + (
            "none (fully dynamic MoE)"
            if part is None
            else f"{part['method']}, kappa {part['target_dynamic_ratio']} (achieved "
            f"{part['achieved_dynamic_ratio_total']:.4f}), {part['num_batches']} batches"
        ),
        f"parameters: {h.human_count(params['total'])} total ({h.human_count(params['dynamic'])} dynamic, "
        f"{h.human_count(params['static'])} static); MoE equivalent {h.human_count(params['moe_equivalent'])}, "
        f"dense {h.human_count(params['dense_equivalent'])}",
        f"on disk: {h.human_bytes(disk['total'])} in {disk['files']} file(s), {info['layout']} layout "
        f"(PAD linears {h.human_bytes(disk['pad_linears'])}, other tensors {h.human_bytes(disk['other_tensors'])}; "
        f"theory {h.human_bytes(disk['theory'])})",
        "",
    ]
    rows = [
        [
            r["layer"],
            r["linear"],
            "x".join(map(str, r["shape"])),
            f"{r['dynamic_ratio']:.4f}",
            f"{r['l_s']:.4f}",
            f"{r['l_d']:.4f}",
            f"{r['dynamic']:,}",
            f"{r['static']:,}",
            h.human_bytes(r["bytes_on_disk"]),
        ]
        for r in info["linears"]
    ]
    lines.append(
        h.format_table(
            ["layer", "linear", "shape", "dynamic", "l_s", "l_d", "params dynamic", "params static", "on disk"],
            rows,
            right=[False, False, False, True, True, True, True, True, True],
        )
    )
    lines.append("")
    rows = [
        [
            r["layer"],
            r["neurons"],
            f"{r['neuron_density_min']:.3f}",
            f"{r['neuron_density_median']:.3f}",
            f"{r['neuron_density_max']:.3f}",
            r["neurons_all_dynamic"],
            r["neurons_all_static"],
        ]
        for r in info["layers"]
    ]
    lines.append("neuron density (dynamic fraction of a neuron's fc_in row and fc_out column):")
    lines.append(h.format_table(["layer", "neurons", "min", "median", "max", "all dynamic", "all static"], rows))
    usage = info["expert_usage"]
    lines.append("")
    if usage is None:
        lines.append("expert usage: not recorded (pass --task/--data_dir or --text_file to route samples).")
    else:
        lines.append(
            f"expert usage: share of the top-k slots per expert (%), {usage['samples']} samples, "
            f"{usage['tokens']:,} tokens:"
        )
        rows = []
        for layer, counts in usage["counts"].items():
            total = max(sum(counts), 1)
            shares = [100.0 * c / total for c in counts]
            rows.append([layer, *(f"{s:.1f}" for s in shares), f"{max(shares) * len(shares) / 100:.2f}"])
        lines.append(h.format_table(["layer", *(f"e{i}" for i in range(info["num_experts"])), "max/mean"], rows))
    return "\n".join(lines)


def plot(info: dict[str, Any], model, path: str) -> None:
    plt = _common.pyplot()
    import numpy as np

    by_layer = pad_layers(model)
    layers = list(by_layer)
    ratios = np.array([[r["dynamic_ratio"] for r in info["linears"] if r["layer"] == i] for i in layers])
    density = np.stack([_neuron_density(refs).numpy() for refs in by_layer.values()])
    usage = info["expert_usage"]
    panels = 3 if usage is not None else 2
    widths = [1.2, 5.0] + ([2.0] if usage is not None else [])
    fig, axes = plt.subplots(
        1,
        panels,
        figsize=(sum(widths) + 2.5, max(3.0, 1.4 + 0.4 * len(layers))),
        gridspec_kw={"width_ratios": widths},
        squeeze=False,
    )
    axes = axes[0]
    image = axes[0].imshow(ratios, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    axes[0].set_xticks(range(ratios.shape[1]), ["fc_in", "fc_out"][: ratios.shape[1]])
    axes[0].set_yticks(range(len(layers)), layers)
    axes[0].set_ylabel("layer")
    axes[0].set_title("dynamic ratio", fontsize=9)
    for (y, x), value in np.ndenumerate(ratios):
        axes[0].text(
            x, y, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black", fontsize=8
        )
    axes[1].imshow(density, vmin=0, vmax=1, cmap="viridis", aspect="auto", interpolation="nearest")
    axes[1].set_yticks(range(len(layers)), layers)
    axes[1].set_xlabel("FFN neuron")
    axes[1].set_title("neuron density: dynamic fraction of its fc_in row + fc_out column", fontsize=9)
    fig.colorbar(image, ax=axes[1], fraction=0.03, pad=0.02)
    if usage is not None:
        counts = np.array([usage["counts"][str(i)] for i in layers], dtype=float)
        shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        usage_image = axes[2].imshow(shares, cmap="magma", aspect="auto", vmin=0)
        axes[2].set_yticks(range(len(layers)), layers)
        axes[2].set_xticks(range(shares.shape[1]))
        axes[2].set_xlabel("expert")
        axes[2].set_title(f"expert usage ({usage['tokens']:,} tokens)", fontsize=9)
        fig.colorbar(usage_image, ax=axes[2], fraction=0.05, pad=0.02)
    _common.save_inspect_figure(fig, info, path)


# ------------------------------------------------------------------------------------ vision
def run_vision(args: argparse.Namespace) -> int:
    if _common.has_data(args) or args.task:
        raise _common.CLIError(
            "--task / --data_dir / --text_file route text through a PAD-MoE model; a PAD dynamic-convolution "
            "checkpoint is inspected without inputs (use `pad-moe analyze` for its per-image dynamics)."
        )
    from ..checkpoint import resolve_checkpoint_files
    from . import _vision

    path, model = _vision.load_vision_model(args.path)
    files, _ = resolve_checkpoint_files(path)
    info = _vision.collect_inspect(path, model, *tensor_bytes(files), len(files))
    if args.plot:
        _vision.plot_inspect(info, args.plot)
        info["plot"] = args.plot
        logger.info(f"Wrote {args.plot}")
    _common.stdout_write(json.dumps(info, indent=2) if args.json else _vision.render_inspect(info))
    return 0


def run(args: argparse.Namespace) -> int:
    _common.check_plot_path(args.plot)
    if _common.load_config(args.path)[1].model_type == "pad_dyconv":
        return run_vision(args)
    path, model = _common.load_pad_model(args.path)
    usage, samples = (None, 0)
    if _common.has_data(args) or args.task:
        usage, samples = record_expert_usage(model, args)
    info = collect(path, model, usage, samples)
    if args.plot:
        plot(info, model, args.plot)
        info["plot"] = args.plot
        logger.info(f"Wrote {args.plot}")
    _common.stdout_write(json.dumps(info, indent=2) if args.json else render(info))
    return 0
