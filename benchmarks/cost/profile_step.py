"""Where the time of a training step goes: torch.profiler on the MiniLM-sized model, static vs MoE vs PAD.

    python benchmarks/cost/profile_step.py [--precision bf16] [--batch 32] [--seq 128]

One training step (forward + backward + AdamW) per kind after two warm-up steps, profiled on the CPU; the
table groups the ops by name (self CPU time, share of the step) and adds the PAD-specific parts: forming eq. 4
(`_MergedPADWeights` forward and backward), the experts matmuls (`grouped_mm`), the router. Writes
`benchmarks/results/profile_step.{json,md}`. Never run it while another torch process is busy.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import speed  # benchmarks/ is the script's directory
import torch
from speed import autocast, make_model
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _paths
from _paths import ROOT  # noqa: E402

KINDS = ("dense", "moe", "pad")


def profile_kind(kind: str, precision: str, batch: int, seq: int, top: int) -> dict:
    torch.manual_seed(0)
    model = make_model(kind)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(1000, 30000, (batch, seq))
    labels = torch.randint(0, 2, (batch,))

    def step():
        with autocast(precision):
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    rows = sorted(
        ({"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "calls": e.count} for e in events),
        key=lambda r: -r["self_ms"],
    )
    for row in rows:
        row["share"] = row["self_ms"] * 1e3 / total if total else 0.0
    return {"total_self_ms": total / 1e3, "top": rows[:top]}


def markdown(report: dict) -> str:
    lines = [
        f"# Where a training step's time goes ({report['precision']}, batch {report['batch']} x {report['seq']}, "
        "MiniLM-sized, CPU)",
        "",
        "Self CPU time per op (torch.profiler), one step after two warm-up steps.",
        "",
    ]
    for kind, result in report["kinds"].items():
        lines += [f"## {kind}: {result['total_self_ms']:.0f} ms", "", "| op | self ms | share | calls |"]
        lines.append("|---|---:|---:|---:|")
        for r in result["top"]:
            lines.append(f"| `{r['op']}` | {r['self_ms']:.1f} | {100 * r['share']:.1f}% | {r['calls']} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--smoke", action="store_true", help="tiny model: checks the script runs")
    parser.add_argument("--out", default=None, help="stem; default: benchmarks/results/ (--smoke: outputs/smoke/)")
    args = parser.parse_args()
    out_dir = ROOT / ("outputs/smoke" if args.smoke else "benchmarks/results")  # smoke never overwrites results
    args.out = args.out or str(out_dir / "profile_step")
    if args.smoke:
        tiny = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
        speed.MINILM = {**speed.MINILM, **tiny}
        args.batch, args.seq = 2, 16
    report = {
        "precision": args.precision,
        "batch": args.batch,
        "seq": args.seq,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "smoke": args.smoke,
        "kinds": {kind: profile_kind(kind, args.precision, args.batch, args.seq, args.top) for kind in KINDS},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
