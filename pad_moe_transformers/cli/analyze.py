"""`pad-moe analyze`: the paper's dynamic-property measures (Figure 6) for several models on the same inputs.

Vision models (PAD dynamic-convolution checkpoints, Transformers' ResNet / MobileNetV2) are analysed per
convolution on images (`--images digits` or a `.pt` tensor): `analysis.conv_dynamic_property`.

    pad-moe analyze dense=bert-base-uncased moe=out/rte_moe pad=out/rte_pad --task rte --data_dir glue_data

Per FFN layer and model: the parameter variance (variance across inputs of the gate-weighted eq. 4
weights, averaged over the weight elements; 0 for a dense FFN) and the output variance (variance
across inputs of the FFN block's output, averaged over the hidden dimensions). The definitions and
the trace shortcut that avoids forming per-token weights are in `pad_moe_transformers/analysis.py`
and docs/concepts.md.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from transformers.utils import logging

from . import _common
from ._common import CLIError

logger = logging.get_logger("pad_moe_transformers.cli")


def add_parser(subparsers, parents: list[argparse.ArgumentParser] | None = None) -> argparse.ArgumentParser:
    from ..analysis import UNITS

    parser = subparsers.add_parser(
        "analyze",
        parents=parents or [],
        help="dynamic-property analysis (paper Fig. 6): parameter and output variance per layer "
        "for dense / MoE / PAD models",
        description="Run dense, MoE and PAD-MoE models on the same input samples and report, per FFN layer, the "
        "parameter variance (variance across inputs of the computed weights sum_e gate_e * W_eff_e, averaged over "
        "weight elements; 0 for a dense FFN) and the output variance (variance across inputs of the FFN block "
        "output, averaged over hidden dimensions). See docs/concepts.md for the exact definitions.",
        epilog="examples:\n"
        "  pad-moe analyze dense=bert-base-uncased moe=out/bert_moe pad=out/rte_pad --task rte --data_dir glue_data\n"
        "  pad-moe analyze out/rte_pad --text_file sentences.txt --unit sample --json --plot dynamics.png\n"
        "  pad-moe analyze static=out/digits_static pad=out/digits_pad --images digits --samples 256",
        formatter_class=_common.HelpFormatter,
    )
    parser.add_argument(
        "models",
        nargs="+",
        metavar="MODEL",
        help="a checkpoint (folder or hub id), optionally labelled as LABEL=PATH; dense checkpoints "
        "of a supported family and PAD-MoE checkpoints can be mixed.",
    )
    parser.add_argument(
        "--unit",
        choices=UNITS,
        default="token",
        help="what one sample of the variance is: a token, or a whole input (its tokens averaged) "
        "(default %(default)s).",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table.")
    parser.add_argument(
        "--plot", metavar="FILE", help="plot both measures per layer to FILE (.png/.pdf/.svg; needs matplotlib)."
    )
    _common.add_data_arguments(parser, split_default=None, samples_default=64)
    vision = parser.add_argument_group("input images (vision models: PAD dynamic convolution, ResNet, MobileNetV2)")
    vision.add_argument(
        "--images",
        default="digits",
        help="'digits' (scikit-learn's handwritten digits, test split) or a .pt file with an (N, C, H, W) tensor "
        "(default %(default)s).",
    )
    vision.add_argument(
        "--image_size", type=_common.positive_int, default=32, help="digits are upsampled to this size (default 32)."
    )
    parser.set_defaults(run=run)
    return parser


def parse_model_specs(specs: list[str]) -> list[tuple[str, str]]:
    """`["dense=path", "other/path"]` -> `[("dense", "path"), ("path", "other/path")]` with unique labels."""
    parsed, seen = [], set()
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep or not label or "/" in label or os.sep in label:
            label, path = os.path.basename(os.path.normpath(spec)) or spec, spec
        if not path:
            raise CLIError(f"model {spec!r}: empty path after '='.")
        base, n = label, 2
        while label in seen:
            label, n = f"{base}_{n}", n + 1
        seen.add(label)
        parsed.append((label, path))
    return parsed


def describe(model, kind: str) -> str:
    if kind == "dense":
        return "dense"
    partition = model.config.partition
    if partition is None:
        return f"MoE ({model.config.num_experts} experts, top-{model.config.num_experts_per_tok})"
    return f"PAD ({partition.get('method')}, kappa {partition.get('target_dynamic_ratio')})"


def _vocab_size(model, kind: str) -> int:
    config = model.config.base_config if kind == "pad" else model.config
    return int(getattr(config, "vocab_size", 0) or 0)


def analyze(args: argparse.Namespace) -> dict[str, Any]:
    from ..analysis import dynamic_property

    specs = parse_model_specs(args.models)
    for _, path in specs:  # fail on a bad path before loading anything
        _common.check_model_path(path)
    texts, _ = _common.read_texts(args)
    tokenizer = _common.load_tokenizer([args.tokenizer, *(path for _, path in specs)])
    batches = _common.make_batches(tokenizer, texts, None, args.batch_size, args.max_seq_length)
    results = []
    for label, path in specs:
        path, model, kind = _common.load_any_model(path)
        vocab = _vocab_size(model, kind)
        if vocab and len(tokenizer) > vocab:
            raise CLIError(
                f"the tokenizer has {len(tokenizer)} tokens but model {label} ({path}) a vocabulary of {vocab}: "
                "the models must share one tokenizer (pass --tokenizer)."
            )
        result = dynamic_property(model, batches, unit=args.unit, desc=f"Dynamic property ({label})")
        results.append({"label": label, "path": path, "kind": kind, "model": describe(model, kind), **result.to_dict()})
        del model
    return {
        "unit": args.unit,
        "samples": len(texts),
        "tokens": int(sum(int(b["attention_mask"].sum()) for b in batches)),
        "source": args.text_file or f"{args.task} {args.split or 'dev'} ({args.data_dir})",
        "models": results,
    }


def render(info: dict[str, Any]) -> str:
    models = info["models"]
    layers = sorted({layer["layer"] for m in models for layer in m["layers"]})
    headers = ["layer"]
    for m in models:
        headers += [f"{m['label']} param var", f"{m['label']} output var"]
    by_model = [{layer["layer"]: layer for layer in m["layers"]} for m in models]
    rows = []
    for index in layers:
        row = [index]
        for table in by_model:
            layer = table.get(index)
            row += (
                ["-", "-"]
                if layer is None
                else [f"{layer['parameter_variance']:.4e}", f"{layer['output_variance']:.4e}"]
            )
        rows.append(row)
    mean_row = ["mean"]
    for m in models:
        n = max(len(m["layers"]), 1)
        mean_row += [
            f"{sum(x['parameter_variance'] for x in m['layers']) / n:.4e}",
            f"{sum(x['output_variance'] for x in m['layers']) / n:.4e}",
        ]
    rows.append(mean_row)
    count = f"{info['tokens']:,} tokens" if "tokens" in info else "per convolution but the stem"
    lines = [f"Dynamic property over {info['samples']} inputs ({count}) from {info['source']}; unit = {info['unit']}"]
    lines += [f"  {m['label']}: {m['model']} - {m['path']}" for m in models]
    lines += ["", _common.format_table(headers, rows)]
    return "\n".join(lines)


def plot(info: dict[str, Any], path: str) -> None:
    plt = _common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    markers = "osD^vx*"
    for n, m in enumerate(info["models"]):
        layers = [x["layer"] for x in m["layers"]]
        name = m["label"] if m["label"] == m["model"] else f"{m['label']}: {m['model']}"
        # Models can coincide (a freshly upcycled MoE equals its dense model): vary line style and marker size.
        style = dict(
            marker=markers[n % len(markers)],
            label=name,
            linestyle=("-", "--", "-.", ":")[n % 4],
            markersize=max(9 - 1.5 * n, 3),
            alpha=0.85,
        )
        axes[0].plot(layers, [x["parameter_variance"] for x in m["layers"]], **style)
        axes[1].plot(layers, [x["output_variance"] for x in m["layers"]], **style)
    from matplotlib.ticker import MaxNLocator

    for ax, title in zip(axes, ("parameter variance", "output variance")):
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    axes[1].legend(fontsize=8)
    fig.suptitle(f"Dynamic property, {info['samples']} inputs, unit = {info['unit']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from . import _vision

    _common.check_plot_path(args.plot)
    specs = parse_model_specs(args.models)
    for _, path in specs:  # fail on a bad path before loading anything
        _common.check_model_path(path)
    if any(_vision.is_vision_checkpoint(path) for _, path in specs):
        info = _vision.analyze(args, specs)
        return _finish(info, args)
    if not _common.has_data(args):
        raise CLIError("analyze needs input samples: pass --task TASK --data_dir GLUE_DIR, or --text_file FILE.")
    return _finish(analyze(args), args)


def _finish(info: dict[str, Any], args: argparse.Namespace) -> int:
    if args.plot:
        plot(info, args.plot)
        info["plot"] = args.plot
        logger.info(f"Wrote {args.plot}")
    _common.stdout_write(json.dumps(info, indent=2) if args.json else render(info))
    return 0
