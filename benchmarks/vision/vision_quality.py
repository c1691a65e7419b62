"""Digits accuracy of static vs CondConv vs DY-Conv vs PAD (paper Table 2 / Fig. 4 / Fig. 3, small scale).

    python benchmarks/vision/vision_quality.py                          # the table: 6 variants x 3 seeds
    python benchmarks/vision/vision_quality.py --max_train_samples 300  # fewer training images (harder)
    python benchmarks/vision/vision_quality.py --kappa_sweep            # + PAD at kappa 0.1 / 0.5 / 0.7 (Fig. 3)
    python benchmarks/vision/vision_quality.py --smoke                  # seconds: proves the pipeline only

Runs `examples/run_image_classification.py` once per (variant, seed) with identical settings: scikit-learn's
digits (fixed stratified 70/30 split, 1,257 / 540 images, upsampled to 32x32), a narrow ResNet-10 (width x0.25:
16-32-64-128 channels, trained from scratch as the paper does), SGD momentum 0.9, cosine with 10% warm-up.
Variants: static, CondConv (k=8), DY-Conv (k=4), PAD kappa 0.3 with IMP, MP and Random partitions (Fig. 4).
Writes `benchmarks/results/vision_digits.json`, `.md` (mean +- std over seeds, parameters, wall time per run)
and `.png`; each finished run is recorded in --work_dir and reused by `--resume` when its arguments match.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _paths
from _paths import ROOT, relative_path  # noqa: E402

VARIANTS = {  # name -> run_image_classification.py arguments
    "static": ["--mode", "static"],
    "condconv": ["--mode", "condconv", "--condconv_experts", "8"],
    "dyconv": ["--mode", "dyconv", "--num_kernels", "4"],
    "pad_imp": ["--mode", "pad", "--partition_method", "imp"],
    "pad_mp": ["--mode", "pad", "--partition_method", "mp"],
    "pad_random": ["--mode", "pad", "--partition_method", "random"],
}


def run_command(variant: str, kappa: float, seed: int, args: argparse.Namespace, output_dir: Path) -> list[str]:
    command = [
        sys.executable, os.path.join("examples", "run_image_classification.py"), *VARIANTS[variant],
        "--kappa", str(kappa), "--model_config", "resnet10", "--width_multiplier", str(args.width),
        "--image_size", str(args.image_size), "--num_train_epochs", str(args.epochs),
        "--learning_rate", str(args.learning_rate), "--per_device_train_batch_size", str(args.batch_size),
        "--partition_batches", str(args.partition_batches), "--seed", str(seed),
        "--output_dir", relative_path(output_dir), "--do_train", "--do_eval",
        "--use_cpu", "--disable_tqdm", "true", "--logging_steps", "20",
    ]  # fmt: skip
    if args.max_train_samples:
        command += ["--max_train_samples", str(args.max_train_samples)]
    if args.max_eval_samples:
        command += ["--max_eval_samples", str(args.max_eval_samples)]
    return command + list(args.extra)


def run_one(variant: str, kappa: float, seed: int, args: argparse.Namespace) -> dict:
    output_dir = Path(args.work_dir) / f"{variant}_k{kappa}_s{seed}"
    command = run_command(variant, kappa, seed, args, output_dir)
    record = output_dir / "benchmark_run.json"
    if args.resume and record.is_file():
        previous = json.loads(record.read_text())
        if previous.get("argv") == command[2:]:
            return previous
    threads = str(max(1, (os.cpu_count() or 1) // args.parallel))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    start = time.time()
    completed = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.time() - start
    if completed.returncode != 0:
        raise RuntimeError(f"run_image_classification failed for {variant} seed {seed}:\n{completed.stderr[-4000:]}")
    results = json.loads((output_dir / "all_results.json").read_text())
    run = {"variant": variant, "kappa": kappa, "seed": seed, "wall_s": wall, "results": results, "argv": command[2:]}
    record.write_text(json.dumps(run, indent=2))
    return run


def row_name(run: dict) -> str:
    return run["variant"] if not run["variant"].startswith("pad") else f"{run['variant']}_k{run['kappa']}"


def summarise(runs: list[dict]) -> dict:
    table: dict[str, dict] = {}
    for run in runs:
        row = table.setdefault(row_name(run), {"accuracy": [], "wall_s": [], "parameters": None})
        row["accuracy"].append(100.0 * run["results"]["eval_accuracy"])
        row["wall_s"].append(run["wall_s"])
        row["parameters"] = run["results"].get("parameters_total")
    for row in table.values():
        row["mean"] = statistics.mean(row["accuracy"])
        row["std"] = statistics.stdev(row["accuracy"]) if len(row["accuracy"]) > 1 else 0.0
        row["wall_s_per_run"] = statistics.mean(row["wall_s"])
    return table


def write_report(runs: list[dict], args: argparse.Namespace, complete: bool) -> None:
    import torch

    order = list(VARIANTS)
    runs = sorted(runs, key=lambda r: (order.index(r["variant"]), r["kappa"], r["seed"]))
    table = summarise(runs)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("work_dir", "out", "resume")}
    report = {"complete": complete, "settings": settings, "platform": platform.platform(), "torch": torch.__version__}
    out.with_suffix(".json").write_text(json.dumps(report | {"table": table, "runs": runs}, indent=2))
    train = args.max_train_samples or 1257
    lines = [
        f"Digits (scikit-learn, {train} training / {args.max_eval_samples or 540} test images, {args.image_size}x"
        f"{args.image_size}), ResNet-10 x{args.width} from scratch, {args.epochs} epochs, batch {args.batch_size}, "
        f"lr {args.learning_rate}, seeds {args.seeds}; PAD kappa {args.kappa}, k=4; CondConv k=8. Test accuracy "
        f"(%) mean +- std over seeds; wall = seconds per run ({max(1, (os.cpu_count() or 1) // args.parallel)} "
        f"CPU threads, {args.parallel} runs at a time).",
        "",
        "| model | #params | accuracy | runs | wall (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in table.items():
        params = f"{row['parameters'] / 1e6:.3f}M" if row["parameters"] else "?"
        lines.append(
            f"| {name} | {params} | {row['mean']:.2f} +- {row['std']:.2f} | {len(row['accuracy'])} "
            f"| {row['wall_s_per_run']:.0f} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(table, out.with_suffix(".png"), lines[0])


def plot(table: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names)), 3.8))
    ax.bar(range(len(names)), [table[n]["mean"] for n in names], yerr=[table[n]["std"] for n in names], capsize=4)
    ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
    low = min(table[n]["mean"] - table[n]["std"] for n in names)
    ax.set_ylim(max(0.0, low - 5), 100)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("\n".join(title[i : i + 110] for i in range(0, min(len(title), 220), 110)), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--kappa", type=float, default=0.3)
    parser.add_argument("--kappa_sweep", nargs="*", type=float, default=None, help="PAD (IMP) at these kappas too")
    parser.add_argument("--epochs", type=float, default=10.0)
    parser.add_argument("--learning_rate", type=float, default=0.1)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--width", type=float, default=0.25, help="ResNet-10 channel multiplier")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--partition_batches", type=int, default=10)
    parser.add_argument("--max_train_samples", type=int, default=0, help="fewer training images (0: all 1,257)")
    parser.add_argument("--max_eval_samples", type=int, default=0)
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time (each gets cpu_count // parallel)")
    parser.add_argument("--resume", action="store_true", help="reuse the finished runs in --work_dir")
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run of every variant (pipeline check)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="further example arguments, last")
    parser.add_argument("--work_dir", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    suffix = "_smoke" if args.smoke else ""
    args.work_dir = args.work_dir or str(ROOT / "outputs" / f"vision_quality{suffix}")
    args.out = args.out or str(ROOT / ("outputs" if args.smoke else "benchmarks/results") / f"vision_digits{suffix}")
    if args.smoke:
        args.seeds, args.epochs, args.width, args.image_size = args.seeds[:2], 1.0, 0.125, 16
        args.max_train_samples, args.max_eval_samples, args.partition_batches = 48, 32, 2
        args.batch_size = 16

    plan = [(v, args.kappa, s) for v in args.variants for s in args.seeds]
    if args.kappa_sweep is not None:
        plan += [("pad_imp", k, s) for k in (args.kappa_sweep or (0.1, 0.5, 0.7)) for s in args.seeds]
    runs: list[dict] = []
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        futures = [pool.submit(run_one, v, k, s, args) for v, k, s in plan]
        for future in as_completed(futures):
            run = future.result()
            print(f"{row_name(run):16s} seed {run['seed']}: {100 * run['results']['eval_accuracy']:.2f}% "
                  f"({run['wall_s']:.0f}s)", flush=True)  # fmt: skip
            runs.append(run)
            write_report(runs, args, complete=len(runs) == len(plan))  # partial results survive a kill
    print(Path(args.out).with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
