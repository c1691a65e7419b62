"""Which configuration should a user pick? Dev score next to what each configuration costs (issue 28).

    python benchmarks/frontier/frontier.py [--results benchmarks/results] [--out benchmarks/results/frontier]

Joins result files that other benchmarks write (it runs nothing itself):

- quality: `glue_frontier.json` (`glue_quality.py --table frontier`: each configuration at its model's best dev
  learning rate, paired seeds): dev score mean +- std over seeds, and the parameters as the paper counts them;
- whole-run wall time: `glue_wholerun_<task>.json` (`glue_quality.py --table wholerun`: full data, 3 epochs,
  bf16, one run at a time, same session; the cost of a run does not depend on its learning rate);
- training step time and peak training memory: `train_cost.json` (batch 32, bf16; 32 tokens for STS-B, 128 for
  RTE; the step time a median of steps interleaved across configurations in one process, which the host's drift
  moves alike for all: the steadier relative training cost next to the whole run, whose time moves by up to +-30%
  between sessions on this VM; memory in live tensors);
- inference latency of the merged model: `pipeline_latency.json` (bf16, `pipeline("text-classification")`,
  batch 1 and 32);
- stored bytes: `checkpoint_size.json` (bf16 files; neuron-structured PAD stores as many values and mask bits as
  element-wise PAD at the same kappa, so it has that size).

`--quality` reads the scores from other `glue_quality.py` reports instead (e.g. `glue_table1.json glue_table3.json`,
every model at lr 1e-4): the first file that scores a configuration on a task gives its row, each row says its
learning rate, and the table is marked provisional, since those runs are not at each model's best learning rate.

Every cost is also given as a ratio to static (the plain fine-tuned model) of the same file. A figure the inputs lack
is left empty, and the table says which command fills it. Writes `<out>.json`, `<out>.md` and `<out>.png` (score
against whole-run cost per task, seed spread as error bars, the Pareto front drawn).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _paths
from _paths import ROOT  # noqa: E402

CONFIGS = ("static", "moe", "pad_k0.5", "pad_k0.1", "pad_neuron_k0.1", "pad_neuron_k0.3", "pad_neuron_k0.5")
"""The frontier's configurations, as `glue_quality.py --table frontier` names them."""
LABELS = {
    "static": "static (dense)", "moe": "MoE (8 experts, top-2)", "pad_k0.5": "PAD element kappa 0.5",
    "pad_k0.1": "PAD element kappa 0.1", "pad_neuron_k0.1": "PAD neuron kappa 0.1",
    "pad_neuron_k0.3": "PAD neuron kappa 0.3", "pad_neuron_k0.5": "PAD neuron kappa 0.5",
}  # fmt: skip
# How each input file names a configuration (the rest use the frontier's names).
QUALITY_NAMES = {"pad_k0.5": "pad"}  # Table 1's name, tried after the frontier's
WHOLERUN_NAMES = {"pad_k0.5": "pad"}
COST_NAMES = {"static": "dense"}
CHECKPOINT_NAMES = {
    "static": "dense", "moe": "moe", "pad_k0.5": "pad_kappa_0.5", "pad_k0.1": "pad_kappa_0.1",
    "pad_neuron_k0.1": "pad_kappa_0.1", "pad_neuron_k0.3": "pad_kappa_0.3", "pad_neuron_k0.5": "pad_kappa_0.5",
}  # fmt: skip
TOKENS = {"stsb": 32, "rte": 128}
"""The training-step length whose time and memory stand for each task (`train_cost.py`'s STS-B-like and RTE-like)."""
FILLED_BY = {
    "score": "python benchmarks/glue/glue_quality.py --table frontier",
    "wall_s": "python benchmarks/glue/glue_quality.py --table wholerun --tasks <task> --seeds 42 --parallel 1",
    "train_step_s": "python benchmarks/cost/train_cost.py",
    "train_memory_bytes": "python benchmarks/cost/train_cost.py",
    "latency_b1_s": "python benchmarks/inference/pipeline_latency.py",
    "latency_b32_s": "python benchmarks/inference/pipeline_latency.py",
    "stored_bytes": "python benchmarks/cost/checkpoint_size.py",
}
COSTS = ("wall_s", "train_step_s", "train_memory_bytes", "latency_b1_s", "latency_b32_s", "stored_bytes")
KINDS = ("s", "s", "bytes", "s", "s", "bytes")
"""How each of `COSTS` is written (`_fmt`)."""


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _learning_rate(report: Mapping, variant: str, task: str) -> float | None:
    rate = (report.get("variants", {}).get(variant) or {}).get("learning_rate")
    if rate is None:
        rate = report.get("settings", {}).get("learning_rate")
    return rate.get(task) if isinstance(rate, Mapping) else rate


def quality(report: Mapping, task: str) -> dict[str, dict]:
    """`{config: {"score", "std", "n", "parameters", "learning_rate"}}` from a `glue_quality.py` report (the
    frontier's, or another table's where it names the configuration `QUALITY_NAMES` says)."""
    out = {}
    variants = report.get("stats", {}).get("variants", {})
    for config in CONFIGS:
        name = next((n for n in (config, QUALITY_NAMES.get(config)) if n and (variants.get(n) or {}).get(task)), None)
        if name is None:
            continue
        est = variants[name][task]
        parameters = (report.get("per_variant", {}).get(name) or {}).get("parameters")
        out[config] = {
            "score": est["mean"], "std": est["std"], "n": est["n"], "parameters": parameters,
            "learning_rate": _learning_rate(report, name, task),
        }  # fmt: skip
    return out


def wall_times(report: Mapping) -> dict[str, float]:
    """`{config: wall seconds}` of the whole-run table's runs (seed 42, one at a time)."""
    by_variant = {run["variant"]: run["wall_s"] for run in report.get("runs", [])}
    return {c: by_variant[WHOLERUN_NAMES.get(c, c)] for c in CONFIGS if WHOLERUN_NAMES.get(c, c) in by_variant}


def train_costs(report: Mapping, task: str) -> dict[str, dict[str, float | None]]:
    """`{config: {"train_step_s", "train_memory_bytes"}}` of `train_cost.py` at the task's length, bf16."""
    rows = report.get(f"seq{TOKENS[task]}_bf16", {}).get("rows", {})
    return {
        c: {"train_step_s": row.get("train_step_s"), "train_memory_bytes": row.get("peak_train_bytes")}
        for c in CONFIGS
        if (row := rows.get(COST_NAMES.get(c, c))) is not None
    }


def latencies(report: Mapping) -> dict[str, dict[str, float]]:
    rows = report.get("bf16", {}).get("rows", {})
    return {
        c: {"latency_b1_s": rows[name]["pipeline_b1_s"], "latency_b32_s": rows[name]["pipeline_b32_s"]}
        for c in CONFIGS
        if (name := COST_NAMES.get(c, c)) in rows
    }


def stored_bytes(report: Mapping) -> dict[str, dict[str, int]]:
    """`{config: {"stored_bytes", "parameters"}}` of the bf16 checkpoints (the parameters, as the paper counts them,
    stand in where a configuration has no score yet)."""
    rows = {row["name"]: row for row in report.get("rows", [])}
    return {
        c: {"stored_bytes": rows[name]["bytes_bf16"], "parameters": rows[name].get("parameters")}
        for c in CONFIGS
        if (name := CHECKPOINT_NAMES[c]) in rows
    }


def pareto_front(points: Mapping[str, tuple[float, float]]) -> list[str]:
    """The configurations no other one beats: `points` is `{config: (cost, score)}`; a configuration is dominated when
    another costs no more and scores no less, and is strictly better in one. Sorted by cost."""
    front = [
        name
        for name, (cost, score) in points.items()
        if not any(
            c <= cost and s >= score and (c < cost or s > score)
            for other, (c, s) in points.items()
            if other != name
        )
    ]
    return sorted(front, key=lambda name: points[name][0])


def build(results: Path, quality_files: Sequence[str] = ("glue_frontier.json",)) -> dict:
    """The joined report. `quality_files` (in `results`) give the scores; the first that scores a configuration on a
    task wins. Only the frontier's own complete report makes the table final."""
    reports = [_read(results / name) for name in quality_files]
    frontier = reports[0]
    provisional = list(quality_files) != ["glue_frontier.json"]
    latency, stored = latencies(_read(results / "pipeline_latency.json")), stored_bytes(
        _read(results / "checkpoint_size.json")
    )
    cost_file = _read(results / "train_cost.json")
    tasks = [t for t in TOKENS if any(t in (r.get("tasks") or ()) for r in reports)] or list(TOKENS)
    out: dict = {
        "tasks": {}, "sources": {}, "quality_files": list(quality_files), "provisional": provisional,
        "frontier_complete": bool(frontier.get("complete")) and not provisional,
    }  # fmt: skip
    for task in tasks:
        scores: dict[str, dict] = {}
        for report in reports:
            scores = {**quality(report, task), **scores}
        wholerun = _read(results / f"glue_wholerun_{task}.json")
        walls, training = wall_times(wholerun), train_costs(cost_file, task)
        rows = {}
        for config in CONFIGS:
            step = training.get(config, {})
            row = {**scores.get(config, {}), "wall_s": walls.get(config), "train_step_s": step.get("train_step_s"),
                   "train_memory_bytes": step.get("train_memory_bytes")}  # fmt: skip
            row.update(latency.get(config, {}))
            checkpoint = stored.get(config, {})
            row["stored_bytes"] = checkpoint.get("stored_bytes")
            if not row.get("parameters"):
                row["parameters"] = checkpoint.get("parameters")
            rows[config] = row
        static = rows["static"]
        for row in rows.values():
            for cost in COSTS:
                value, base = row.get(cost), static.get(cost)
                row[f"{cost}_vs_static"] = value / base if value is not None and base else None
        points = {
            c: (r["wall_s_vs_static"], r["score"]) for c, r in rows.items() if "score" in r and r["wall_s_vs_static"]
        }
        out["tasks"][task] = {"rows": rows, "pareto_front": pareto_front(points), "tokens": TOKENS.get(task)}
        out["sources"][task] = {
            "wholerun_commit": (wholerun.get("git") or {}).get("commit"),
            "wholerun_complete": wholerun.get("complete"),
        }
    out["sources"].update(
        quality_commits={name: (r.get("git") or {}).get("commit") for name, r in zip(quality_files, reports)},
        lr_picks=None if provisional else (frontier.get("variants") or {}),
        train_cost_commit=(cost_file.get("setup") or {}).get("commit"),
    )
    return out


def _fmt(value, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "bytes":
        return f"{value / 2**20:.0f} MiB"
    if kind == "s":
        return f"{value:.0f} s" if value >= 10 else f"{value * 1e3:.1f} ms"
    if kind == "ratio":
        return f"{value:.2f}x"
    return str(value)


GLANCE_BEGIN, GLANCE_END = "<!-- frontier:glance -->", "<!-- /frontier:glance -->"
"""Marks around the compact table in `frontier.md`; the README carries the same block (a test compares them)."""


def _ratio_pair(rows: Mapping[str, Mapping], tasks: Sequence[str], config: str, cost: str) -> str:
    return " / ".join(_fmt(rows[t][config].get(f"{cost}_vs_static"), "ratio") for t in tasks)


def _score(row: Mapping, seeds: int) -> str:
    """`mean +- std`, with the seed count where a partial table has fewer seeds for this row than for others."""
    fewer = f" (n={row['n']})" if row["n"] < seeds else ""
    spread = f" +- {row['std']:.2f}" if row["n"] > 1 else ""  # one seed has no spread (not a spread of 0)
    return f"{row['score']:.2f}{spread}{fewer}"


def glance(report: Mapping) -> str:
    """The README's compact table: one row per configuration, the score per task and each cost as a ratio to static
    (a cost that differs per task, training time and memory, as `STS-B / RTE`), between `GLANCE_BEGIN` / `_END`."""
    tasks = list(report["tasks"])
    rows = {task: block["rows"] for task, block in report["tasks"].items()}
    names = {"stsb": "STS-B", "rte": "RTE", "cola": "CoLA", "mrpc": "MRPC"}
    per_task = " / ".join(names.get(t, t) for t in tasks)
    lines = [
        GLANCE_BEGIN,
        "| configuration | params | " + " | ".join(f"{names.get(t, t)} dev" for t in tasks)
        + f" | training time ({per_task}) | training step ({per_task}) | training memory ({per_task})"
        " | latency b1 / b32 | checkpoint |",
        "|---|---:|" + "---:|" * len(tasks) + "---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    seeds = max((r["n"] for t in tasks for r in rows[t].values() if "score" in r), default=0)
    for config in CONFIGS:
        first = next((rows[t][config] for t in tasks if rows[t][config].get("parameters")), {})
        params = f"{first['parameters'] / 1e6:.1f}M" if first else "-"
        scored = (rows[t][config] for t in tasks)
        scores = [_score(r, seeds) if "score" in r else "-" for r in scored]
        first_task = rows[tasks[0]][config]  # latency and bytes do not depend on the task
        latency = " / ".join(_fmt(first_task.get(f"{c}_vs_static"), "ratio") for c in ("latency_b1_s", "latency_b32_s"))
        cells = [
            LABELS[config], params, *scores, _ratio_pair(rows, tasks, config, "wall_s"),
            _ratio_pair(rows, tasks, config, "train_step_s"), _ratio_pair(rows, tasks, config, "train_memory_bytes"),
            latency,
            _fmt(first_task.get("stored_bytes_vs_static"), "ratio"),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(GLANCE_END)
    return "\n".join(lines) + "\n"


def paste_glance(path: Path, table: str) -> None:
    """Replace the block between the glance marks of `path` (the README) with `table`."""
    text = path.read_text(encoding="utf-8")
    if GLANCE_BEGIN not in text or GLANCE_END not in text:
        raise ValueError(f"{path} has no {GLANCE_BEGIN} ... {GLANCE_END} block to replace; add the two marks first.")
    head, rest = text.split(GLANCE_BEGIN, 1)
    tail = rest.split(GLANCE_END, 1)[1]
    path.write_text(head + table.rstrip("\n") + tail, encoding="utf-8")


def markdown(report: Mapping) -> str:
    lines = [
        "# Quality-cost frontier (MiniLM, 8 experts top-2, GLUE dev)",
        "",
        "Dev score: mean +- std over paired seeds at the learning rate in the lr column (in the frontier's own runs, "
        "each model's best dev learning rate, picked on dev as the paper does, so optimistic). Costs as ratios to "
        "static (the plain fine-tuned MiniLM): whole 3-epoch run (bf16, one run at a time; one run per configuration, "
        "all of a task in one session: on this VM the same run's time moves by up to +-30% between sessions), one "
        "training step (median of steps interleaved across configurations in one process, batch 32, bf16: the "
        "steadier relative figure), peak training memory (live tensors, batch 32, bf16), merged inference through "
        "`pipeline` at batch 1 and 32 (bf16), checkpoint bytes (bf16). *On the Pareto front: no other configuration "
        "scores higher for less whole-run time.",
    ]
    if report.get("provisional"):
        files = ", ".join(f"`{name}`" for name in report["quality_files"])
        lines += ["", f"**Provisional:** the scores come from {files}, not from the frontier's runs: each row is at "
                  "the learning rate it names, not necessarily its model's best."]  # fmt: skip
    elif not report["frontier_complete"]:
        lines += ["", "**Partial:** the frontier's quality runs are not all finished."]
    lines += ["", "## At a glance (costs as ratios to static)", "", glance(report).rstrip("\n")]
    missing = set()
    for task, block in report["tasks"].items():
        front = set(block["pareto_front"])
        lines += [
            "",
            f"## {task.upper()} (training step and memory at {block['tokens']} tokens)",
            "",
            "| configuration | lr | dev score | params | whole run | train step | train memory | latency b1 "
            "| latency b32 | stored |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for config, row in block["rows"].items():
            score = _score(row, 0) + f" (n={row['n']})" if "score" in row else "-"
            params = f"{row['parameters'] / 1e6:.1f}M" if row.get("parameters") else "-"
            cells = []
            for cost, kind in zip(COSTS, KINDS):
                if row.get(cost) is None:
                    missing.add(cost)
                    cells.append("-")
                else:
                    cells.append(f"{_fmt(row[f'{cost}_vs_static'], 'ratio')} ({_fmt(row[cost], kind)})")
            if "score" not in row:
                missing.add("score")
            name = LABELS[config] + (" *" if config in front else "")
            rate = f"{row['learning_rate']:g}" if row.get("learning_rate") else "-"
            lines.append(f"| {name} | {rate} | {score} | {params} | " + " | ".join(cells) + " |")
    if missing:
        commands = sorted({FILLED_BY[m] for m in missing})
        lines += ["", "Empty cells are filled by: " + "; ".join(f"`{c}`" for c in commands) + "."]
    return "\n".join(lines) + "\n"


def plot(report: Mapping, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(report["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.5), squeeze=False)
    for axis, task in zip(axes[0], tasks):
        block = report["tasks"][task]
        for i, (config, row) in enumerate(block["rows"].items()):
            if "score" not in row or not row.get("wall_s_vs_static"):
                continue
            axis.errorbar(
                row["wall_s_vs_static"], row["score"], yerr=row["std"] or 0.0, fmt="o", capsize=3, color=f"C{i}",
                label=LABELS[config],
            )  # fmt: skip
        front = block["pareto_front"]
        if len(front) > 1:
            xs = [block["rows"][c]["wall_s_vs_static"] for c in front]
            ys = [block["rows"][c]["score"] for c in front]
            axis.step(xs, ys, where="post", color="grey", linestyle="--", linewidth=1, label="Pareto front")
        axis.set_title(f"{task.upper()} dev")
        axis.set_xlabel("whole 3-epoch run, x static (bf16, CPU)")
        axis.set_ylabel("dev score x100 (mean +- std over seeds)")
        axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results"), help="Where the inputs are.")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "frontier"), help="Output stem.")
    parser.add_argument(
        "--quality", nargs="+", default=["glue_frontier.json"],
        help="Score reports in --results, first match wins (default: the frontier's own; others make it provisional).",
    )  # fmt: skip
    parser.add_argument(
        "--readme", default=None,
        help="Also replace the compact table between the frontier:glance marks of this file (e.g. README.md).",
    )  # fmt: skip
    args = parser.parse_args(argv)
    report = build(Path(args.results), args.quality)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(markdown(report))
    plot(report, out.with_suffix(".png"))
    if args.readme:
        paste_glance(Path(args.readme), glance(report))
    print(out.with_suffix(".md").read_text())
    return report


if __name__ == "__main__":
    main()
