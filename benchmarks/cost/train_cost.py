"""What a training step costs: trainable parameters, peak live-tensor memory and step time (issue 27, part 2).

    python benchmarks/cost/train_cost.py [--seqs 32,128] [--precisions fp32,bf16] [--steps 8]
                                         [--out benchmarks/results/train_cost.json]
    python benchmarks/cost/train_cost.py --smoke      # tiny shapes, seconds: checks the script runs

Kinds, on a MiniLM-shaped model (6 layers, hidden 384, FFN 1536, vocab 30522; 8 experts, top-2), batch 32 at
STS-B-like (32 tokens) and RTE-like (128 tokens) lengths:

- ``dense``: the plain BERT;
- ``moe``: the MoE as stored (the PAD model's experts used raw: no eq. 4, no scale factors; `speed.py`'s baseline);
- ``pad_k{kappa}``: element-wise PAD (the paper), ``pad_neuron_k{kappa}``: neuron-structured PAD, each with a fixed
  random mask at that dynamic ratio (cost does not depend on which entries are dynamic) and the storage a
  partition leaves (`compact_pad_storage`: only what eq. 4 reads is a parameter).

Memory: each (kind, length, precision) in a fresh interpreter under `MALLOC_MMAP_THRESHOLD_=65536` (every tensor
gets its own mapping, returned on free: the peak RSS is then the peak of live tensor bytes, as in
`partition_cost.py`), building the model and running 3 AdamW steps; reported is the peak RSS minus the RSS before
the model was built (weights + gradients + optimizer moments + activations). Time: one process per (length,
precision) holding every kind, steps interleaved across kinds (drift hits all alike), median after one warm-up
step each; fused AdamW (the Trainer's default optimizer). Ratios are to the MoE and to dense of the same run.
Never run it while another torch process is busy (2 cores: two processes slow each other 2-5x).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _paths
from _paths import ROOT  # noqa: E402
from _provenance import commit_label  # noqa: E402

MINILM = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536, vocab_size=30522)
SMOKE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=30522)
KINDS = ("dense", "moe", "pad_k0.5", "pad_k0.1", "pad_neuron_k0.5", "pad_neuron_k0.3", "pad_neuron_k0.1")
BATCH = 32
MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _kappa(kind: str) -> float:
    return float(kind.rpartition("_k")[2])


def make_model(kind: str, shapes: dict):
    """The model of `kind`, in the storage a partition leaves."""
    import torch
    from speed import PlainMoEFeedForward, partition_neurons_randomly, partition_randomly
    from transformers import BertConfig, BertForSequenceClassification

    import pad_moe_transformers as pmt

    torch.manual_seed(0)
    base = BertConfig(**shapes, num_labels=2)
    if kind == "dense":
        return BertForSequenceClassification(base)
    granularity = "neuron" if kind.startswith("pad_neuron") else "element"
    model = pmt.PADMoEForSequenceClassification(
        pmt.PADMoEConfig(base_config=base, num_experts=8, partition_granularity=granularity)
    )
    for index, moe in enumerate(model.moe_layers):
        if kind == "moe":
            moe.__class__ = PlainMoEFeedForward
        elif granularity == "neuron":
            partition_neurons_randomly(moe, _kappa(kind), seed=index)
        else:
            partition_randomly(moe, _kappa(kind), seed=index)
    pmt.compact_pad_storage(model)  # what `partition_model` leaves; the MoE's all-dynamic masks stay dense
    return model


def _batch(seq: int, vocab: int):
    import torch

    generator = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(1000, vocab - 1, (BATCH, seq), generator=generator),
        "attention_mask": torch.ones(BATCH, seq, dtype=torch.long),
        "labels": torch.randint(0, 2, (BATCH,), generator=generator),
    }


def _autocast(precision: str):
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def _optimizer(model):
    import torch

    return torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)


def _train_step(model, optimizer, batch, precision: str) -> None:
    with _autocast(precision):
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _rss_kib(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def memory_child(kind: str, seq: int, precision: str, shapes: dict) -> dict:
    """In a fresh interpreter under MMAP_ENV: peak live bytes of building `kind` and 3 training steps."""
    import gc

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    batch = _batch(seq, shapes["vocab_size"])
    gc.collect()
    before = _rss_kib()
    model = make_model(kind, shapes)
    model.train()
    optimizer = _optimizer(model)
    after_build = _rss_kib()
    for _ in range(3):
        _train_step(model, optimizer, batch, precision)
    peak = _rss_kib("VmHWM")
    return {
        "peak_train_bytes": (peak - before) * 1024,
        "model_bytes": (after_build - before) * 1024,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def time_child(seq: int, precision: str, steps: int, shapes: dict) -> dict:
    """Median step time of every kind, steps interleaved across kinds."""
    import torch

    batch = _batch(seq, shapes["vocab_size"])
    runs = {}
    for kind in KINDS:
        model = make_model(kind, shapes)
        model.train()
        runs[kind] = (model, _optimizer(model))
        _train_step(*runs[kind], batch, precision)  # warm-up: allocations, index caches, optimizer state
    times = {kind: [] for kind in KINDS}
    for _ in range(steps):
        for kind, (model, optimizer) in runs.items():
            start = time.perf_counter()
            _train_step(model, optimizer, batch, precision)
            times[kind].append(time.perf_counter() - start)
    return {
        "threads": torch.get_num_threads(),
        **{f"{kind}__train_step_s": statistics.median(t) for kind, t in times.items()},
        **{f"{kind}__train_step_all_s": t for kind, t in times.items()},
    }


def _run_child(argv: list[str], env: dict | None = None) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), *argv]
    environment = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", **(env or {}))
    out = subprocess.run(command, env=environment, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def ratios(rows: dict, metric: str) -> dict:
    """`{kind}_vs_moe` and `{kind}_vs_dense` of `metric` for every kind that has it."""
    out = {}
    for baseline in ("moe", "dense"):
        reference = rows.get(baseline, {}).get(metric)
        for kind, row in rows.items():
            if kind != baseline and kind != "dense" and reference and metric in row:
                out[f"{kind}_vs_{baseline}"] = row[metric] / reference
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqs", default="32,128")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-time", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 1 step: checks the script runs")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/ (--smoke: outputs/smoke/)")
    parser.add_argument("--child", choices=("memory", "time"), help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    args = parser.parse_args()
    out_dir = ROOT / ("outputs/smoke" if args.smoke else "benchmarks/results")  # smoke never overwrites results
    args.out = args.out or str(out_dir / "train_cost.json")
    shapes = SMOKE if args.smoke else MINILM
    if args.child == "memory":
        seq, precision = int(args.seqs), args.precisions
        print(json.dumps(memory_child(args.kind, seq, precision, shapes)))
        return
    if args.child == "time":
        print(json.dumps(time_child(int(args.seqs), args.precisions, args.steps, shapes)))
        return

    import torch
    import transformers

    from pad_moe_transformers.precision import native_bf16_available

    steps = 1 if args.smoke else args.steps
    seqs = [int(s) for s in args.seqs.split(",")]
    precisions = [p for p in args.precisions.split(",") if p == "fp32" or native_bf16_available()]
    smoke = ["--smoke"] if args.smoke else []
    report: dict = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "native_bf16": native_bf16_available(),
        },
        "setup": {
            "commit": commit_label(),
            "model": "MiniLM shapes (random init)" if not args.smoke else "smoke",
            "shapes": shapes,
            "batch": BATCH,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "experts_implementation": "eager (the default without CUDA)",
            "pad_storage": "compact (what a partition leaves)",
            "optimizer": "torch.optim.AdamW(fused=True)",
            "timing": f"median of {steps} interleaved steps after 1 warm-up step, one process per (length, precision)",
            "memory": "peak VmHWM - RSS before building the model, MALLOC_MMAP_THRESHOLD_=65536, 3 steps, "
            "one process per (kind, length, precision)",
            "precisions": precisions,
        },
    }
    for seq in seqs:
        for precision in precisions:
            section = f"seq{seq}_{precision}"
            rows: dict = {kind: {} for kind in KINDS}
            if not args.skip_memory:
                for kind in KINDS:
                    argv = ["--child", "memory", "--kind", kind, "--seqs", str(seq), "--precisions", precision]
                    rows[kind].update(_run_child(argv + smoke, MMAP_ENV))
                    print(f"{section} {kind} memory {rows[kind]['peak_train_bytes'] / 2**20:.0f} MiB", flush=True)
            if not args.skip_time:
                argv = ["--child", "time", "--seqs", str(seq), "--precisions", precision, "--steps", str(steps)]
                timed = _run_child(argv + smoke)
                report["setup"]["threads"] = timed.pop("threads")
                for key, value in timed.items():
                    kind, metric = key.split("__", 1)
                    rows[kind][metric] = value
                print(f"{section} times " + ", ".join(f"{k} {r['train_step_s']:.3f}s" for k, r in rows.items()))
            report[section] = {
                "rows": rows,
                "ratios": {
                    metric: ratios(rows, metric)
                    for metric in ("trainable_parameters", "peak_train_bytes", "train_step_s")
                    if any(metric in row for row in rows.values())
                },
            }
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=2))  # written as sections finish
    print(json.dumps({k: v["ratios"] for k, v in report.items() if isinstance(v, dict) and "ratios" in v}, indent=2))


if __name__ == "__main__":
    main()
