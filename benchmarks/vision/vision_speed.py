"""CPU speed and peak memory of PAD vs DY-Conv vs static ResNet-50 (forward and training step, batch 32).

    python benchmarks/vision/vision_speed.py                 # ResNet-50, batch 32, 224x224, 3 repeats
    python benchmarks/vision/vision_speed.py --smoke         # a tiny ResNet in seconds (pipeline check)

Each kind runs in its own fresh process (spawned, one after the other): build the model, one warm-up
iteration, then the median over `--repeats` of a forward pass (eval mode, no autograd) and of a training
step (forward + backward + SGD momentum step), and the process's peak resident memory (`ru_maxrss`) after
the training steps. Kinds: ``static`` (Transformers' ResNet), ``dyconv`` (k = 4, every conv but the stem,
fully dynamic), ``pad`` (k = 4, kappa 0.3; masks at random with exactly kappa of each kernel dynamic: the
cost does not depend on which entries are). Ratios are PAD / DY-Conv, PAD / static and DY-Conv / static.
Writes `benchmarks/results/vision_speed.json` and `.md`. Never run it while another torch process is busy.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _paths
from _paths import ROOT  # noqa: E402
from _timing import median_time  # noqa: E402

KINDS = ("static", "dyconv", "pad")


def build(kind: str, smoke: bool, kappa: float):
    from transformers import AutoModelForImageClassification, ResNetConfig, ResNetForImageClassification

    import pad_moe_transformers  # noqa: F401
    from pad_moe_transformers.core import named_pad_linears
    from pad_moe_transformers.vision import PADDyConvConfig

    if smoke:
        config = ResNetConfig(
            layer_type="basic", depths=[1, 1], hidden_sizes=[16, 32], embedding_size=16, num_labels=10
        )
    else:  # ResNet-50, ImageNet head
        config = ResNetConfig(
            layer_type="bottleneck", depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048], embedding_size=64,
            num_labels=1000, downsample_in_bottleneck=True,
        )  # fmt: skip
    torch.manual_seed(0)
    if kind == "static":
        return ResNetForImageClassification(config)
    pad_config = PADDyConvConfig.from_base(config, num_kernels=4, dynamic_ratio=1.0 if kind == "dyconv" else kappa)
    model = AutoModelForImageClassification.from_config(pad_config)
    if kind == "pad":
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for ref in named_pad_linears(model):
                mask = torch.zeros(ref.module.mask.numel(), dtype=torch.bool)
                mask[torch.randperm(mask.numel(), generator=generator)[: round(kappa * mask.numel())]] = True
                ref.module.mask.copy_(mask.view_as(ref.module.mask))
    return model


def measure(kind: str, args: argparse.Namespace, queue) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(kind, args.smoke, args.kappa)
    pixels = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    labels = torch.randint(0, model.config.num_labels, (args.batch_size,))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def forward():
        model.eval()
        with torch.no_grad():
            model(pixels)

    def train_step():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        model(pixels, labels=labels).loss.backward()
        optimizer.step()

    result = {"kind": kind, "forward_s": median_time(forward, args.repeats)}
    result["train_step_s"] = median_time(train_step, args.repeats)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["parameters"] = sum(p.numel() for p in model.parameters())
    queue.put(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kappa", type=float, default=0.3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    parser.add_argument("--smoke", action="store_true", help="a tiny ResNet, batch 4, 32x32, 1 repeat")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.smoke:
        args.batch_size, args.image_size, args.repeats = 4, 32, 1
    out = Path(args.out or ROOT / ("outputs/vision_speed_smoke" if args.smoke else "benchmarks/results/vision_speed"))
    context = mp.get_context("spawn")
    results = {}
    for kind in KINDS:
        queue = context.Queue()
        process = context.Process(target=measure, args=(kind, args, queue))
        process.start()
        results[kind] = queue.get()
        process.join()
        print(f"{kind:7s} forward {results[kind]['forward_s']:.3f}s, train step {results[kind]['train_step_s']:.3f}s, "
              f"peak RSS {results[kind]['peak_rss_mb']:.0f} MB", flush=True)  # fmt: skip
    metrics = ("forward_s", "train_step_s", "peak_rss_mb")
    pairs = (("pad", "dyconv"), ("pad", "static"), ("dyconv", "static"))
    ratios = {f"{a}/{b}": {m: results[a][m] / results[b][m] for m in metrics} for a, b in pairs}
    report = {
        "model": "tiny ResNet (smoke)" if args.smoke else "ResNet-50",
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "threads": args.threads or torch.get_num_threads(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "results": results,
        "ratios": ratios,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    lines = [
        f"{report['model']}, batch {args.batch_size}, {args.image_size}x{args.image_size}, CPU "
        f"({report['threads']} threads), median of {args.repeats}; PAD k=4 kappa {args.kappa}, DY-Conv k=4.",
        "",
        "| ratio | forward | train step | peak memory |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {n} | {r['forward_s']:.2f} | {r['train_step_s']:.2f} | {r['peak_rss_mb']:.2f} |" for n, r in ratios.items()
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
