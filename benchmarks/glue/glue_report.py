"""The report of one GLUE table: statistics over paired seeds, the pairing check, markdown and plot.

`build` turns the run records of `glue_quality.py` into the report's statistics (`glue_stats.summarise`) and
checks that the runs of one (task, seed) were really paired: the same data order, the same head
initialisation, the same router initialisation among the variants that have routers.
"""

from __future__ import annotations

import math
import statistics
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import glue_stats  # benchmarks/glue/glue_stats.py

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _provenance
from _provenance import state_label  # noqa: E402


def pairing_check(runs: Sequence[dict]) -> dict:
    """`{"groups", "ok", "problems"}`: every (task, seed) group of runs must share the data order and the head
    checksum (at init and before the first step), and its MoE-like runs the router checksum at init."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for run in runs:
        groups[(run["task"], run["seed"])].append(run)
    problems = []
    for (task, seed), members in sorted(groups.items()):
        checks = {
            "data order": {r["data_order"] for r in members},
            "head init": {r["head_init_checksum"] for r in members},
            "router init": {r["router_init_checksum"] for r in members if r["router_init_checksum"]},
            "head at step 0": {(r.get("step0") or {}).get("head") for r in members} | set(),
        }
        for name, values in checks.items():
            if len(values) > 1:
                variants = ", ".join(r["variant"] for r in members)
                problems.append(f"{task} seed {seed}: {name} differs across {variants}")
    return {"groups": len(groups), "ok": not problems, "problems": problems}


def host_probe_mean(runs: Sequence[dict]) -> dict[str, float] | None:
    """The mean of the host probes taken before and after `runs` (timed tables: `_timing.host_probe`), or None."""
    probes = [p for r in runs if r.get("host_probe") for p in r["host_probe"].values()]
    if not probes:
        return None
    return {key: round(statistics.fmean(p[key] for p in probes), 2) for key in probes[0]}


def counted_score(run: Mapping) -> float:
    """The score a run counts with. A diverged run can predict one constant, and a correlation of a constant is
    undefined (STS-B Pearson: NaN); it counts as 0 (no correlation), since leaving it out would flatter the setting
    that diverged (a learning rate, say). The record keeps the NaN."""
    return 0.0 if math.isnan(run["score"]) else run["score"]


def build(table, runs: Sequence[dict], main_metric: Mapping[str, str], tasks: Sequence[str]) -> dict:
    """Statistics and pairing check of `runs` (records with `task`, `variant`, `seed`, `score`)."""
    scores: dict[str, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for run in runs:
        scores[run["variant"]][run["task"]][run["seed"]] = counted_score(run)
    undefined = [f"{r['task']} {r['variant']} seed {r['seed']}" for r in runs if math.isnan(r["score"])]
    order = [v for v in table.variants if v in scores]
    comparisons = () if table.best_of else table.comparisons  # with a selection: compared at the picks
    stats = glue_stats.summarise({v: scores[v] for v in order}, list(tasks), comparisons)
    extras = {}
    for variant in order:
        members = [r for r in runs if r["variant"] == variant]
        params = [r["parameters_total"] for r in members if r.get("parameters_total")]
        extras[variant] = {
            "parameters": statistics.median(params) if params else None,
            "wall_s_mean": statistics.fmean(r["wall_s"] for r in members),
            "runs": len(members),
            "host_probe_ms": host_probe_mean(members),
        }
    paper = {}
    for name, values in table.paper.items():
        row = {t: values[t] for t in tasks if t in values}
        if len(row) == len(tasks):  # the paper's average over exactly these tasks
            row["avg"] = round(statistics.fmean(row.values()), 2)
        if row:
            paper[name] = row
    selection = select_best(table, scores, tasks) if table.best_of else None
    return {
        "table": table.name, "title": table.title, "claim": table.claim, "tasks": list(tasks), "selection": selection,
        "main_metric": {t: main_metric[t] for t in tasks}, "variants": {v: table.variants[v] for v in table.variants},
        "comparisons": [f"{a} - {b}" for a, b in table.comparisons], "stats": stats, "per_variant": extras,
        "paper_bert_base": paper, "pairing": pairing_check(runs), "undefined_scores": sorted(undefined),
    }  # fmt: skip


def select_best(table, scores: Mapping[str, Mapping[str, Mapping[int, float]]], tasks: Sequence[str]) -> dict:
    """Each model of `table.best_of` at its best variant per task (highest dev mean over the seeds it finished), and
    `table.comparisons` made between the models at those picks (paired by seed, as everywhere).

    `{"picks": {model: {task: variant}}, "complete": bool, "stats": glue_stats.summarise(...)}`; `complete` is False
    while some candidate of a pick has fewer seeds than the most any candidate has (the pick may still change)."""
    picks: dict[str, dict[str, str]] = {}
    picked: dict[str, dict[str, dict[int, float]]] = {}
    complete = True
    for model, candidates in table.best_of.items():
        for task in tasks:
            finished = {v: scores[v][task] for v in candidates if scores.get(v, {}).get(task)}
            if not finished:
                continue
            most = max(len(s) for s in finished.values())
            complete &= len(finished) == len(candidates) and all(len(s) == most for s in finished.values())
            best = max(finished, key=lambda v: statistics.fmean(finished[v].values()))
            picks.setdefault(model, {})[task] = best
            picked.setdefault(model, {})[task] = dict(finished[best])
    stats = glue_stats.summarise(picked, list(tasks), table.comparisons)
    return {"picks": picks, "complete": complete, "stats": stats}


def provenance(runs: Sequence[dict], timed: bool = False) -> list[str]:
    """A line saying which commits and thread counts the runs themselves had: reused runs keep the commit they
    were run at, while the header gives the report writer's."""
    commits: dict[str, int] = defaultdict(int)
    layouts: dict[str, int] = defaultdict(int)
    for run in runs:
        commits[state_label(run.get("git"))] += 1
        layouts[f"{run.get('threads', '?')} thread(s)"] += 1
    if not runs:
        return []

    def counts(tally: dict[str, int]) -> str:
        return ", ".join(f"{key}: {n}" for key, n in sorted(tally.items()))

    note = " (wall times compare only within one thread count)" if timed else ""
    return [f"Runs by commit: {counts(commits)}; by threads per run: {counts(layouts)}{note}."]


def table_head(intro: str, first: str, keys: Sequence[str], align: str) -> list[str]:
    """The lines that open a markdown table: a blank line, `intro`, a blank line, the header and its rule."""
    return ["", intro, "", f"| {first} | " + " | ".join(keys) + " |", "|---|" + f"{align}|" * len(keys)]


def _run_count(done: int, planned: int, complete: bool) -> str:
    if complete:
        return f"Complete: {done} runs."
    return f"**Partial**: {done} of {planned} runs ({planned - done} still missing)."


def markdown(table, report: dict, main_metric: Mapping[str, str]) -> str:
    s, tasks = report["settings"], report["tasks"]
    lines = [f"# {report['title']}", ""] + ([f"Claim checked: {report['claim']}.", ""] if report["claim"] else [])
    if report["status"] != "ok":
        return "\n".join([*lines, f"**{report['status']}** (no runs; precision would be {report['precision']}).", ""])
    git, extra = report["git"], s["extra"]
    # Wall times are costs only in a timed table (one run at a time); elsewhere runs shared the cores and may have
    # been paused for a timed job, so a column would read as a cost it is not (the JSON keeps each `wall_s`).
    timed = table.timed
    experts = f"{extra[extra.index('--num_experts') + 1] if '--num_experts' in extra else 8} experts top-2"
    lines += [
        f"Model {s['model']}, {experts}; {s['epochs']:g} epochs"
        + (f" capped at {s['max_steps']} steps" if s["max_steps"] else "")
        + f", lr {_lr_label(s['learning_rate'])}, batch {s['batch_size']}, train rows: {s['max_train_samples']}; seeds "
        f"{', '.join(map(str, s['seeds']))}; precision: {report['precision']}; {report['device']}, "
        f"{s['parallel_runs']} run(s) at a time, {s['threads_per_run']} thread(s) each; commit "
        f"{state_label(git)}."
        + (" **Smoke run: tiny model, 3 steps; the numbers mean nothing.**" if s["smoke"] else ""),
        *provenance(report["runs"], timed),
        _run_count(len(report["runs"]), len(tasks) * len(table.variants) * len(s["seeds"]), report["complete"])
        + " Main metric x100: " + ", ".join(f"{t}: {m}" for t, m in main_metric.items() if t in tasks) + ".",
    ]
    if s["learning_rate"] == "per variant" and not table.best_of:  # (an lr table's variant names carry the rate)
        lines.append(f"Learning rate per variant ({' / '.join(tasks)}): " + "; ".join(
            f"{name} " + " / ".join(_lr_label(_task_rate(settings.get("learning_rate"), t)) for t in tasks)
            for name, settings in report["variants"].items()) + ".")  # fmt: skip
    pairing = report["pairing"]
    if pairing["ok"]:
        lines.append(
            f"Pairing verified for {pairing['groups']} (task, seed) groups: same data order, head and router init."
        )
    else:
        lines.append("**Pairing broken:** " + "; ".join(pairing["problems"]))
    if report.get("undefined_scores"):
        lines.append(
            "Diverged, scored 0: " + ", ".join(report["undefined_scores"]) + " (the metric is undefined, NaN: the "
            "predictions are constant or not finite; counted as no correlation rather than left out, which would "
            "flatter the setting that diverged)."
        )
    stats, keys = report["stats"], [*tasks, "avg"]
    probed = timed and any(info.get("host_probe_ms") for info in report["per_variant"].values())
    extra_heads = (["wall/run (s)"] if timed else []) + (["host probe matmul / memory (ms)"] if probed else [])
    lines += table_head("Mean +- std over seeds:", "variant", ["#params", *keys, *extra_heads], "---:")
    for variant, est in stats["variants"].items():
        info = report["per_variant"][variant]
        params = info["parameters"]
        params = "?" if not params else f"{params / 1e6:.1f}M" if params >= 1e5 else f"{params:,.0f}"
        cells = [params, *(glue_stats.format_estimate(est.get(k)) for k in keys)]
        if timed:
            cells.append(f"{info['wall_s_mean']:.0f}")
        if probed:
            host = info.get("host_probe_ms")
            cells.append(f"{host['matmul_ms']:.1f} / {host['memory_ms']:.0f}" if host else "-")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    if not timed:
        lines += [
            "",
            "No wall times here: these runs shared the cores and are not costs (each run's `wall_s` is in the JSON)."
            " Costs: the whole-run tables (`--table wholerun`) and `benchmarks/cost/`.",
        ]
    if probed:
        lines += [
            "",
            "Host probe: two fixed workloads timed in a fresh process before and after each run"
            " (`benchmarks/_timing.py`: a bf16 FFN on 32 x 128 tokens, one pass over 216 MiB), the mean of both; a"
            " slower host shows as a larger figure. Whole runs move by up to +-30% between sessions here.",
        ]
    if report.get("selection"):
        lines += selection_markdown(report["selection"], report, keys)
        stats = report["selection"]["stats"]
    lines += table_head(
        "Paired differences, mean [95% CI] (Student t over the seeds both variants finished; * = the CI excludes 0); "
        "below each, the paper's BERT-base difference:",
        "difference" + (" (at the picks)" if report.get("selection") else ""),
        keys,
        "---:",
    )
    for name in report["comparisons"]:
        diff = stats["differences"].get(name)
        if diff is None:
            continue
        cells = " | ".join(glue_stats.format_estimate(diff.get(k), signed=True) for k in keys)
        lines.append(f"| {name} | {cells} |")
        if name in report["paper_bert_base"]:
            paper = report["paper_bert_base"][name]
            cells = " | ".join(f"{paper[k]:+.1f}" if k in paper else "-" for k in keys)
            lines.append(f"| paper (BERT-base) | {cells} |")
    verdicts = [name for name in report["comparisons"] if name in stats["differences"]]
    if verdicts:
        lines += table_head(
            "Verdict on each claim `a > b`: holds (CI above 0), reversed (CI below 0) or unresolved (CI spans 0); "
            "and where the paper's BERT-base difference lies against the CI:",
            "claim",
            keys,
            "---",
        )
        for name in verdicts:
            diff, paper = stats["differences"][name], report["paper_bert_base"].get(name, {})
            cells = " | ".join(glue_stats.verdict(diff.get(k), paper.get(k)) for k in keys)
            lines.append(f"| {name.replace(' - ', ' > ')} | {cells} |")
    return "\n".join(lines) + "\n"


def _task_rate(rate, task: str):
    return rate.get(task, "-") if isinstance(rate, Mapping) else rate


def _lr_label(value) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def selection_markdown(selection: Mapping, report: Mapping, keys: Sequence[str]) -> list[str]:
    """The picks of a `best_of` table: each model's chosen variant per task and its score there."""
    stats = selection["stats"]["variants"]
    lines = table_head(
        "Each model at its best variant per task, picked on the dev mean over seeds (the paper picks its learning "
        "rates on dev too). The picks and the differences below use the same dev scores, so the picked scores are "
        "optimistic by the selection; every model had the same candidates."
        + ("" if selection["complete"] else " **Partial:** some candidates lack seeds; a pick may still change."),
        "model",
        [*(f"{t} pick" for t in report["tasks"]), *keys],
        "---:",
    )
    for model, picks in selection["picks"].items():
        chosen = [picks.get(t, "-").split("@")[-1] for t in report["tasks"]]
        cells = [glue_stats.format_estimate(stats.get(model, {}).get(k)) for k in keys]
        lines.append(f"| {model} | " + " | ".join([*chosen, *cells]) + " |")
    return lines


def plot(table, report: dict, path: Path) -> None:
    """Left: mean +- std per variant; right: paired differences with their 95% CI (x: the paper's value)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats, keys = report["stats"], [*report["tasks"], "avg"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    if report.get("selection"):  # each model's score along its candidates (e.g. over learning rates), per task
        _plot_candidates(left, table, stats, report["tasks"])
        stats = report["selection"]["stats"]
    else:
        _plot_variants(left, stats, keys)
    differences = [name for name in report["comparisons"] if name in stats["differences"]]
    width = 0.8 / max(1, len(differences))
    for i, name in enumerate(differences):
        diff, paper = stats["differences"][name], report["paper_bert_base"].get(name, {})
        xs = [j + i * width for j, k in enumerate(keys) if k in diff]
        means = [diff[k]["mean"] for k in keys if k in diff]
        errors = [diff[k]["half_width"] or 0.0 for k in keys if k in diff]
        right.bar(xs, means, width, yerr=errors, capsize=2, label=name)
        paper_x = [j + i * width for j, k in enumerate(keys) if k in paper]
        right.scatter(paper_x, [paper[k] for k in keys if k in paper], marker="x", color="black", zorder=3)
    right.axhline(0.0, color="grey", linewidth=0.8)
    right.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))], keys)
    right.set_ylabel("paired difference (95% CI); x = paper, BERT-base")
    if differences:  # none yet while only one variant has finished
        right.legend(fontsize=7)
    fig.suptitle(report["title"], fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_variants(axis, stats: Mapping, keys: Sequence[str]) -> None:
    variants = list(stats["variants"])
    width = 0.8 / max(1, len(variants))
    for i, variant in enumerate(variants):
        est = stats["variants"][variant]
        xs = [j + i * width for j, k in enumerate(keys) if k in est]
        means = [est[k]["mean"] for k in keys if k in est]
        stds = [est[k]["std"] or 0.0 for k in keys if k in est]
        axis.bar(xs, means, width, yerr=stds, capsize=2, label=variant)
    axis.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))], keys)
    axis.set_ylabel("dev score x100 (mean +- std over seeds)")
    axis.legend(fontsize=7)


def _plot_candidates(axis, table, stats: Mapping, tasks: Sequence[str]) -> None:
    """One line per (model, task) over the model's candidates (x: the part of their name after `@`, log scale
    when numeric), mean +- std over seeds."""
    styles = ["-", "--", ":", "-."]
    for m, (model, candidates) in enumerate(table.best_of.items()):
        for t, task in enumerate(tasks):
            points = [(c, stats["variants"][c][task]) for c in candidates if task in stats["variants"].get(c, {})]
            if not points:
                continue
            xs = [float(c.split("@")[-1]) for c, _ in points]
            axis.errorbar(
                xs, [e["mean"] for _, e in points], yerr=[e["std"] or 0.0 for _, e in points], capsize=2,
                linestyle=styles[t % len(styles)], color=f"C{m}", marker="o", label=f"{model} {task}",
            )  # fmt: skip
    axis.set_xscale("log")
    axis.set_xlabel("learning rate")
    axis.set_ylabel("dev score x100 (mean +- std over seeds)")
    axis.legend(fontsize=7)
