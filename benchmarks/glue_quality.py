"""GLUE quality of static vs MoE vs PAD (vs MoE-P) on the packaged MiniLM (paper Tables 1, 3, 5).

    python benchmarks/glue_quality.py --data_dir ../shared/data/glue            # the full table
    python benchmarks/glue_quality.py --data_dir ../shared/data/glue --kappa_sweep  # + Table 3 sweep

Runs `examples/run_glue.py` once per (task, mode, seed) with identical settings for every mode,
and writes `benchmarks/results/glue_minilm.json`, `glue_minilm.md` (scores, average, parameter
counts, wall time per run) and `glue_minilm.png`.

Budget (CPU, 2 cores, about two hours in the background): 1500 training rows of RTE, MRPC and
STS-B and 4000 of CoLA (whose sentences are about 5x shorter), drawn at random with seed 0 (the same
rows for every run: the files are sorted by source/genre, and the first 1500 rows of STS-B gave a
static Pearson of 53.7 instead of about 85), 2 epochs, batch 32, lr 1e-4, max length 128; two runs
at a time, one thread each. Why: the full training sets for 3 epochs do not fit. Measured on this
2-core machine (1 thread, other work running): CoLA static alone took 1048 s for 3 full epochs,
the four tasks hold about 7x CoLA's tokens, and the MoE-like modes cost about 1.8x the static one:
about 6 hours for the 4 x 4 table. With 1500 CoLA rows x 2 epochs the static model stayed at MCC
0 (majority class), hence 4000. lr 1e-4 is the paper's grid value that suits a small model with
new routers. `--max_train_samples 0 --epochs 3` runs the full sets (the setting of
`results/glue_minilm_h100_partial.*`, run on a GPU). The paper's 5-20 epochs x 4 learning rates x
5 seeds grid does not fit either way.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _paths import DEFAULT_GLUE_DIR, ROOT, portable_path, relative_path  # benchmarks/_paths.py

TASKS = ("cola", "rte", "mrpc", "stsb")
MODES = ("static", "moe", "pad", "moe_pruned")
MAIN_METRIC = {"cola": "matthews_correlation", "rte": "accuracy", "mrpc": "f1", "stsb": "pearson"}


def train_rows(spec: str, task: str) -> int:
    """Training rows for `task` from `--max_train_samples`: "N" for every task, or "task=N,..." (0: all)."""
    if "=" not in spec:
        return int(spec)
    table = dict(item.split("=") for item in spec.split(","))
    return int(table.get(task, 0))


def glue_command(
    task: str, mode: str, seed: int, args: argparse.Namespace, dynamic_ratio: float, output_dir: Path
) -> list[str]:
    """The `examples/run_glue.py` command line of one run, run from the repository root; its paths are relative
    to it (they are recorded in the result files)."""
    command = [
        sys.executable, os.path.join("examples", "run_glue.py"),
        "--task_name", task, "--data_dir", relative_path(args.data_dir), "--mode", mode,
        "--dynamic_ratio", str(dynamic_ratio), "--partition", "imp", "--partition_batches", "10",
        "--num_train_epochs", str(args.epochs), "--learning_rate", str(args.learning_rate),
        "--per_device_train_batch_size", str(args.batch_size), "--per_device_eval_batch_size", "128",
        "--seed", str(seed), "--output_dir", relative_path(output_dir), "--overwrite_output_dir",
        "--do_train", "--do_eval", "--save_strategy", "no", "--report_to", "none",
        "--logging_steps", "50", "--disable_tqdm", "true",
    ]  # fmt: skip
    if args.max_steps:
        command += ["--max_steps", str(args.max_steps)]
    rows = train_rows(args.max_train_samples, task)
    if rows:  # a random sample (seed 0, the same rows for every run): the files are sorted by genre
        command += ["--max_train_samples", str(rows), "--train_sample_seed", "0"]
    command += list(args.extra)
    if args.model_name_or_path:
        model = args.model_name_or_path  # a local folder (relative to the root) or a hub id
        command += ["--model_name_or_path", relative_path(model) if os.path.exists(model) else model]
    return command


def run_one(task: str, mode: str, seed: int, args: argparse.Namespace, dynamic_ratio: float, out_root: Path) -> dict:
    output_dir = out_root / f"{task}_{mode}_k{dynamic_ratio}_s{seed}"
    command = glue_command(task, mode, seed, args, dynamic_ratio, output_dir)
    record = output_dir / "benchmark_run.json"
    if args.resume and record.is_file():
        previous = json.loads(record.read_text())
        if previous.get("argv") == command[2:]:  # finished earlier with the very same arguments
            return previous
        print(f"{output_dir.name}: arguments changed since the recorded run; running it again.", flush=True)
    start = time.time()
    # Each run gets its share of the cores: two 1-thread runs on 2 cores do not oversubscribe them.
    threads = str(max(1, (os.cpu_count() or 1) // args.parallel))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    completed = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.time() - start
    if completed.returncode != 0:
        raise RuntimeError(f"run_glue failed for {task}/{mode}/seed {seed}:\n{completed.stderr[-4000:]}")
    results = json.loads((output_dir / "all_results.json").read_text())
    run = {"task": task, "mode": mode, "seed": seed, "dynamic_ratio": dynamic_ratio, "wall_s": wall, "results": results}
    run["argv"] = command[2:]
    record.write_text(json.dumps(run, indent=2))
    return run


def main_score(task: str, results: dict) -> float:
    key = next(k for k in results if k.endswith(MAIN_METRIC[task]) and k.startswith("eval_"))
    return 100.0 * results[key]


def summarise(runs: list[dict]) -> dict:
    table: dict[str, dict] = {}
    for run in runs:
        name = run["mode"] if run["mode"] != "pad" else f"pad_k{run['dynamic_ratio']}"
        row = table.setdefault(name, {"scores": {}, "wall_s": 0.0, "parameters": None})
        row["scores"].setdefault(run["task"], []).append(main_score(run["task"], run["results"]))
        row["wall_s"] += run["wall_s"]
        row["parameters"] = run["results"].get("parameters_total", row["parameters"])
    tasks = {run["task"] for run in runs}
    for row in table.values():
        row["mean"] = {task: statistics.mean(v) for task, v in row["scores"].items()}
        # An average over a subset of the tasks would not compare with the other rows.
        row["average"] = statistics.mean(row["mean"].values()) if set(row["mean"]) == tasks else None
    return table


def write_markdown(table: dict, path: Path, args: argparse.Namespace) -> None:
    tasks = [t for t in TASKS if any(t in row["mean"] for row in table.values())]
    lines = [
        f"GLUE dev, MiniLM-L6 (H384), 8 experts top-2, {args.epochs} epochs, lr {args.learning_rate}, "
        f"train rows {args.max_train_samples} (random, seed 0), "
        f"batch {args.batch_size}, seeds {args.seeds}, "
        f"{max(1, (os.cpu_count() or 1) // args.parallel)} CPU threads per run "
        f"({args.parallel} at a time); wall = sum over the row's runs. Main metric x100: "
        + ", ".join(f"{t}: {MAIN_METRIC[t]}" for t in tasks)
        + ".",
        "",
        "| model | #params | " + " | ".join(tasks) + " | avg | wall (s) |",
        "|---|---:|" + "---:|" * len(tasks) + "---:|---:|",
    ]
    for name, row in table.items():
        params = f"{row['parameters'] / 1e6:.1f}M" if row["parameters"] else "?"
        scores = " | ".join(f"{row['mean'][t]:.1f}" if t in row["mean"] else "-" for t in tasks)
        average = "-" if row["average"] is None else f"{row['average']:.1f}"
        lines.append(f"| {name} | {params} | {scores} | {average} | {row['wall_s']:.0f} |")
    path.write_text("\n".join(lines) + "\n")


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in TASKS if any(t in row["mean"] for row in table.values())]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(1, len(table))
    for i, (name, row) in enumerate(table.items()):
        ax.bar([j + i * width for j in range(len(tasks))], [row["mean"].get(t, 0) for t in tasks], width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], tasks)
    ax.set_ylabel("dev score (x100)")
    ax.set_title("GLUE dev on MiniLM-L6: static vs MoE vs PAD")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data_dir", default=str(ROOT / DEFAULT_GLUE_DIR), help="GLUE root (default: ../shared/data/glue)"
    )
    parser.add_argument("--model_name_or_path", default=None)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--seeds", nargs="+", type=int, default=[42])
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument(
        "--max_train_samples",
        default="cola=4000,rte=1500,mrpc=1500,stsb=1500",
        help="Training rows, drawn at random with seed 0: N for every task or task=N,... (0 or a task left out: all).",
    )
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="Further run_glue.py arguments, last.")
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_steps", type=int, default=0, help="Cap on steps per run (smoke runs only).")
    parser.add_argument(
        "--parallel",
        type=int,
        default=2,
        help="Runs at a time; each gets cpu_count // parallel threads "
        "(wall times are then per run at that thread count).",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="Reuse the runs already finished in --work_dir (their benchmark_run.json) instead of running them again.",
    )
    parser.add_argument(
        "--kappa_sweep",
        nargs="*",
        type=float,
        default=None,
        help="Also PAD at these kappas on RTE and STS-B (the flag alone: 0.1 0.3 0.7, as the paper's Table 3).",
    )
    parser.add_argument("--work_dir", default=str(ROOT / "outputs" / "glue_quality"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "glue_minilm"))
    args = parser.parse_args()

    # Mode-major order: a run cut short by the time budget loses the last mode (MoE-P), not a task.
    plan = [(t, m, s, 0.5) for m in args.modes for t in args.tasks for s in args.seeds]
    if args.kappa_sweep is not None:
        kappas = args.kappa_sweep or (0.1, 0.3, 0.7)
        plan += [(t, "pad", s, k) for t in ("rte", "stsb") if t in args.tasks for k in kappas for s in args.seeds]
    runs: list[dict] = []
    # With --parallel N each run is limited to cpu_count // N threads, so runs do not fight over cores.
    from concurrent.futures import ThreadPoolExecutor, as_completed

    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        futures = [pool.submit(run_one, t, m, s, args, k, Path(args.work_dir)) for t, m, s, k in plan]
        for future in as_completed(futures):
            run = future.result()
            print(
                f"{run['task']:5s} {run['mode']:10s} k={run['dynamic_ratio']} seed={run['seed']}: "
                f"{main_score(run['task'], run['results']):.2f} ({run['wall_s']:.0f}s)",
                flush=True,
            )
            runs.append(run)
            write_report(runs, args, final=len(runs) == len(plan))  # partial results survive a kill
    print(Path(args.out).with_suffix(".md").read_text())


def write_report(runs: list[dict], args: argparse.Namespace, final: bool) -> None:
    import platform

    import torch

    order = {(t, m): i for i, (t, m) in enumerate((t, m) for m in MODES for t in TASKS)}
    runs = sorted(runs, key=lambda r: (order[(r["task"], r["mode"])], r["dynamic_ratio"], r["seed"]))
    table = summarise(runs)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("work_dir", "out", "resume")}
    settings["data_dir"] = relative_path(args.data_dir)
    if args.model_name_or_path and os.path.exists(args.model_name_or_path):
        settings["model_name_or_path"] = portable_path(args.model_name_or_path)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    report = {
        "complete": final,
        "settings": settings,
        "device": device,
        "platform": platform.platform(),
        "torch": torch.__version__,
        "table": table,
        "runs": runs,
    }
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    write_markdown(table, out.with_suffix(".md"), args)
    plot(table, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
