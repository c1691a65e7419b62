"""Markdown tables from `results/speed.json` (written by speed.py): ratios to the plain MoE, and the issue's targets;
and from `results/train_cost.json` (written by train_cost.py): parameters, peak memory and step time per kind.

    python benchmarks/cost/speed_tables.py [--speed benchmarks/results/speed.json]   # -> results/speed.md
                                           [--train_cost benchmarks/results/train_cost.json]  # -> results/train_cost.md

README and docs/benchmarks.md quote these tables; regenerate them after every speed run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _paths
from _paths import ROOT  # noqa: E402

LAYER_ROWS = (
    ("forward_train_mode_s", "FFN forward (train mode)"),
    ("forward_backward_s", "FFN forward+backward"),
    ("forward_inference_s", "FFN forward (inference, `merged_pad_weights`)"),
    ("forward_inference_unmerged_s", "FFN forward (inference, eq. 4 every forward)"),
)
MODEL_ROWS = (
    ("train_step_s", "model train step"),
    ("inference_b1_s", "model inference, batch 1 (`merged_pad_weights`)"),
    ("inference_b1_unmerged_s", "model inference, batch 1 (eq. 4 every forward)"),
    ("inference_b32_s", "model inference, batch 32 (`merged_pad_weights`)"),
    ("inference_b32_unmerged_s", "model inference, batch 32 (eq. 4 every forward)"),
)
LAYER_KINDS = (
    "dense", "moe", "pad", "pad_neuron", "hf_moe", "moe@grouped_mm", "pad@grouped_mm", "pad_neuron@grouped_mm",
    "moe@eager", "pad@eager", "moe@compiled", "pad@compiled",
)  # fmt: skip
MODEL_KINDS = ("dense", "moe", "pad", "pad_neuron")


def _ratio(section: dict, kind: str, metric: str) -> str:
    value, reference = section.get(f"{kind}__{metric}"), section.get(f"moe__{metric}")
    return "" if value is None or not reference else f"{value / reference:.2f}"


def table(section: dict, rows, kinds, title: str) -> list[str]:
    kinds = [k for k in kinds if any(key.startswith(f"{k}__") for key in section)]
    lines = [f"| {title} | " + " | ".join(kinds) + " |", "|---|" + "---:|" * len(kinds)]
    for metric, label in rows:
        if any(f"{k}__{metric}" in section for k in kinds):
            moe_ms = section.get(f"moe__{metric}")
            label = f"{label} (MoE {1e3 * moe_ms:.0f} ms)" if moe_ms else label
            lines.append(f"| {label} | " + " | ".join(_ratio(section, k, metric) for k in kinds) + " |")
    return lines


def targets(report: dict) -> list[str]:
    """The speed issue's targets, measured: value, target, met."""
    rows = []

    def add(label: str, value: float | None, limit: float, kind: str = "<=") -> None:
        if value is None:
            return
        met = value <= limit if kind == "<=" else abs(value - 1.0) <= limit
        target = f"<= {limit:.2f}" if kind == "<=" else f"1.00 +- {limit:.2f}"
        rows.append(f"| {label} | {value:.2f} | {target} | {'yes' if met else '**no**'} |")

    def r(section: str, kind: str, metric: str, baseline: str = "moe") -> float | None:
        data = report.get(section, {})
        value, reference = data.get(f"{kind}__{metric}"), data.get(f"{baseline}__{metric}")
        return None if value is None or not reference else value / reference

    for suffix, precision in (("", "fp32"), ("_bf16", "bf16")):
        if f"minilm_layer{suffix}" not in report:
            continue
        for layer, name in (("minilm_layer", "MiniLM"), ("bert_base_layer", "BERT-base")):
            section = layer + suffix
            add(
                f"{precision} {name} MoE layer forward / dense FFN",
                r(section, "moe", "forward_train_mode_s", "dense"),
                2.0,
            )
            add(
                f"{precision} {name} neuron PAD FFN forward / MoE",
                r(section, "pad_neuron", "forward_train_mode_s"),
                0.80,
            )
        model = f"minilm_model{suffix}"
        add(f"{precision} element PAD train step / MoE", r(model, "pad", "train_step_s"), 1.0)
        for batch in ("b1", "b32"):
            add(f"{precision} element PAD inference {batch} / MoE", r(model, "pad", f"inference_{batch}_s"), 0.02, "=")
            add(f"{precision} neuron PAD inference {batch} / MoE", r(model, "pad_neuron", f"inference_{batch}_s"), 0.80)
    if not rows:
        return []
    return ["| target | measured | target | met |", "|---|---:|---:|---|", *rows]


TRAIN_COST_KINDS = ("dense", "moe", "pad_k0.5", "pad_k0.1", "pad_neuron_k0.5", "pad_neuron_k0.3", "pad_neuron_k0.1")
# Issue 27's targets on `train_cost.json`: (metric, kind, section prefix, limit) as ratios to the MoE.
TRAIN_COST_TARGETS = (
    ("peak_train_bytes", "pad_k0.5", "", 0.75),
    ("peak_train_bytes", "pad_k0.1", "", 0.55),
    ("train_step_s", "pad_k0.5", "seq32_", 1.0),
    ("train_step_s", "pad_k0.5", "seq128_", 1.1),
)


def train_cost_tables(report: dict) -> list[str]:
    """One table per (length, precision): parameters, peak memory and step time with their ratios; then the targets."""
    setup = report["setup"]
    lines = [
        f"# Training cost per kind (commit {setup['commit']}, torch {report['machine']['torch']}, transformers "
        f"{report['machine']['transformers']}, {report['machine']['cpus']} CPUs, {setup.get('threads')} threads)",
        "",
        f"{setup['model']}, batch {setup['batch']}, {setup['num_experts']} experts top-{setup['num_experts_per_tok']}, "
        f"experts backend {setup['experts_implementation']}, PAD storage {setup['pad_storage']}, optimizer "
        f"{setup['optimizer']}. Time: {setup['timing']}. Memory: {setup['memory']}.",
        "",
    ]
    sections = [k for k in report if k.startswith("seq")]
    for section in sections:
        rows = report[section]["rows"]
        moe, dense = rows.get("moe", {}), rows.get("dense", {})

        def ratio(row: dict, metric: str, base: dict) -> str:
            return f"{row[metric] / base[metric]:.2f}" if metric in row and base.get(metric) else ""

        lines += [
            f"## Batch 32 x {section.split('_')[0][3:]} tokens, {section.split('_')[1]}",
            "",
            "| kind | trainable params | vs MoE | peak memory (MiB) | vs MoE | vs dense | step (ms) | vs MoE "
            "| vs dense |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for kind in (k for k in TRAIN_COST_KINDS if k in rows):
            row = rows[kind]
            params = f"{row['trainable_parameters'] / 1e6:.1f}M" if "trainable_parameters" in row else ""
            memory = f"{row['peak_train_bytes'] / 2**20:.0f}" if "peak_train_bytes" in row else ""
            step = f"{1e3 * row['train_step_s']:.0f}" if "train_step_s" in row else ""
            lines.append(
                f"| {kind} | {params} | {ratio(row, 'trainable_parameters', moe)} | {memory} | "
                f"{ratio(row, 'peak_train_bytes', moe)} | {ratio(row, 'peak_train_bytes', dense)} | {step} | "
                f"{ratio(row, 'train_step_s', moe)} | {ratio(row, 'train_step_s', dense)} |"
            )
        lines.append("")
    lines += [
        "`trainable params` counts parameters with `requires_grad`: the MoE's include the 7.1M static weights of its",
        "all-dynamic PAD layers, which eq. 4 never reads (they get no gradient and no optimizer state: 72.4M are",
        "trained).",
        "",
    ]
    lines += ["## Targets (issue 27, ratios to the MoE)", "", "| target | measured | limit | met |"]
    lines.append("|---|---:|---:|---|")
    for metric, kind, prefix, limit in TRAIN_COST_TARGETS:
        for section in (s for s in sections if s.startswith(prefix)):
            value = report[section]["ratios"].get(metric, {}).get(f"{kind}_vs_moe")
            if value is not None:
                met = "yes" if value <= limit else "**no**"
                lines.append(f"| {kind} {metric} ({section}) | {value:.2f} | <= {limit:.2f} | {met} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--speed", default=str(ROOT / "benchmarks" / "results" / "speed.json"))
    parser.add_argument("--train_cost", default=str(ROOT / "benchmarks" / "results" / "train_cost.json"))
    args = parser.parse_args()
    if Path(args.train_cost).exists():
        cost = train_cost_tables(json.loads(Path(args.train_cost).read_text()))
        Path(args.train_cost).with_suffix(".md").write_text("\n".join(cost) + "\n")
        print("\n".join(cost))
    report = json.loads(Path(args.speed).read_text())
    setup = report["setup"]
    lines = [
        f"# Speed: ratios to the plain MoE ({report['machine'].get('device', 'cpu')}, "
        f"{report['machine']['threads']} threads, torch {report['machine']['torch']})",
        "",
        f"Batch {setup['batch']} x {setup['seq']}, {setup['num_experts']} experts, top-{setup['top_k']}, "
        f"kappa {setup['dynamic_ratio']}, median of {setup['repeats']}; experts backend: "
        f"{setup.get('experts_implementation', 'eager')}. Kinds: dense FFN, plain MoE, element-wise PAD, "
        "neuron-structured PAD, Transformers' own grouped_mm experts (hf_moe), and the MoE / PAD with another "
        "experts backend (@backend) or compiled (grouped_mm under torch.compile).",
        "",
        "## Targets",
        "",
        *targets(report),
        "",
    ]
    for suffix, precision in (("", "fp32"), ("_bf16", "bf16 autocast")):
        for section, title in (("minilm_layer", "MiniLM layer"), ("bert_base_layer", "BERT-base layer")):
            if section + suffix in report:
                lines += [
                    f"## {title}, {precision}",
                    "",
                    *table(report[section + suffix], LAYER_ROWS, LAYER_KINDS, "ratio to MoE"),
                    "",
                ]
        if "minilm_model" + suffix in report:
            lines += [
                f"## MiniLM model, {precision}",
                "",
                *table(report["minilm_model" + suffix], MODEL_ROWS, MODEL_KINDS, "ratio to MoE"),
                "",
            ]
    memory = report.get("minilm_memory")
    if memory:
        key = next(iter(memory)).split("__", 1)[1]
        lines += [
            "## Peak training memory (2 steps, fresh process)",
            "",
            "| | " + " | ".join(MODEL_KINDS) + " |",
            "|---|" + "---:|" * len(MODEL_KINDS),
            "| ratio to MoE | " + " | ".join(_ratio(memory, k, key) for k in MODEL_KINDS) + " |",
            "",
        ]
    out = Path(args.speed).with_suffix(".md")
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
