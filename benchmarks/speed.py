"""Speed and memory of dense FFN vs plain MoE vs element-wise and neuron-structured PAD-MoE, in one run.

    python benchmarks/speed.py [--repeats 7] [--out benchmarks/results/speed.json]

Measures, on a MiniLM-sized model (6 layers, hidden 384, FFN 1536, 8 experts, top-2, kappa 0.5)
and on one BERT-base-sized layer (hidden 768, FFN 3072):
- FFN layer forward (batch 32 x 128 tokens), training mode (weights of eq. 4 formed each call),
  forward + backward, and inference mode (eval + no_grad; eq. 4 formed in every forward, no cache);
- a full training step of the whole model (forward + backward + AdamW, batch 32 x 128);
- whole-model inference at batch 1 and batch 32 (sequence 128);
- peak resident memory of a process that builds the model and runs 2 training steps.
Every number is a median over repeats; ratios are to the plain MoE and to the dense FFN of the
same run. "Plain MoE" is the same routing/dispatch code with raw expert weights (no eq. 4), so the
ratio isolates what PAD adds. Never run it while another torch process is busy: on 2 cores, two
processes slow each other 2-5x.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

import pad_moe_transformers as pmt

MINILM = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536, vocab_size=30522)
BATCH, SEQ = 32, 128


class PlainMoEFeedForward(pmt.PADMoEFeedForward):
    """Baseline: identical routing and dispatch, experts used as stored (no eq. 4, no scale factors)."""

    def _experts_forward(self, x: torch.Tensor, gates: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        # PADMoEFeedForward._experts_forward with `expert_weight` in place of `effective_weight()` (eq. 4).
        weight_in, weight_out = self.fc_in.expert_weight, self.fc_out.expert_weight  # (E, I, H), (E, H, I)
        bias_in, bias_out = self.fc_in.effective_bias(), self.fc_out.effective_bias()  # biases are not partitioned

        def expert_fn(expert: int, x_e: torch.Tensor) -> torch.Tensor:
            h = self.activation(F.linear(x_e, weight_in[expert], None if bias_in is None else bias_in[expert]))
            return F.linear(h, weight_out[expert], None if bias_out is None else bias_out[expert])

        return self._dispatch(x, gates, experts, expert_fn)


def partition_randomly(moe: pmt.PADMoEFeedForward, kappa: float, seed: int = 0) -> None:
    """A fixed random mask at ratio kappa (speed does not depend on which entries are dynamic)."""
    generator = torch.Generator().manual_seed(seed)
    for linear in (moe.fc_in, moe.fc_out):
        linear.mask.copy_(torch.rand(linear.mask.shape, generator=generator) < kappa)


def partition_neurons_randomly(moe: pmt.PADMoEFeedForward, kappa: float, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    num_neurons = moe.fc_in.out_features
    neurons = torch.zeros(num_neurons, dtype=torch.bool)
    neurons[torch.randperm(num_neurons, generator=generator)[: round(kappa * num_neurons)]] = True
    moe.set_neuron_mask(neurons)


KINDS = ("dense", "moe", "pad", "pad_neuron")
"""dense FFN; plain MoE; element-wise PAD (the paper); neuron-structured PAD."""


def _granularity(kind: str) -> str:
    return "neuron" if kind == "pad_neuron" else "element"


def _partition(kind: str, moe: pmt.PADMoEFeedForward, kappa: float, seed: int) -> None:
    if kind == "moe":
        moe.__class__ = PlainMoEFeedForward
    elif kind == "pad":
        partition_randomly(moe, kappa, seed)
    elif kind == "pad_neuron":
        partition_neurons_randomly(moe, kappa, seed)


def make_ffn(kind: str, hidden: int, inter: int, kappa: float = 0.5) -> nn.Module:
    fc_in, fc_out = nn.Linear(hidden, inter), nn.Linear(inter, hidden)
    if kind == "dense":
        return nn.Sequential(fc_in, nn.GELU(), fc_out)
    moe = pmt.PADMoEFeedForward.from_dense(
        fc_in, nn.GELU(), fc_out, num_experts=8, num_experts_per_tok=2, partition_granularity=_granularity(kind)
    )
    _partition(kind, moe, kappa, seed=0)
    return moe


def make_model(kind: str, kappa: float = 0.5) -> nn.Module:
    base = BertConfig(**MINILM, num_labels=2)
    if kind == "dense":
        return BertForSequenceClassification(base)
    config = pmt.PADMoEConfig(base_config=base, num_experts=8, partition_granularity=_granularity(kind))
    model = pmt.PADMoEForSequenceClassification(config)
    for index, moe in enumerate(model.moe_layers):
        _partition(kind, moe, kappa, seed=index)
    return model


def median_time(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_layer(hidden: int, inter: int, repeats: int) -> dict:
    x = torch.randn(BATCH, SEQ, hidden)
    results = {}
    for kind in KINDS:
        torch.manual_seed(0)
        ffn = make_ffn(kind, hidden, inter)
        ffn.train()
        with torch.no_grad():
            results[f"{kind}__forward_train_mode_s"] = median_time(lambda ffn=ffn: ffn(x), repeats)
        results[f"{kind}__forward_backward_s"] = median_time(lambda ffn=ffn: ffn(x).sum().backward(), repeats)
        ffn.eval()
        with torch.no_grad():
            results[f"{kind}__forward_inference_s"] = median_time(lambda ffn=ffn: ffn(x), repeats)
    return results


def bench_model(repeats: int) -> dict:
    results = {}
    ids = torch.randint(1000, 30000, (BATCH, SEQ))
    labels = torch.randint(0, 2, (BATCH,))
    for kind in KINDS:
        torch.manual_seed(0)
        model = make_model(kind)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def train_step(model=model, optimizer=optimizer):
            model.train()
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        results[f"{kind}__train_step_s"] = median_time(train_step, max(3, repeats // 2), warmup=1)
        model.eval()
        for batch in (1, BATCH):
            with torch.no_grad():
                inputs = ids[:batch]
                results[f"{kind}__inference_b{batch}_s"] = median_time(
                    lambda model=model, inputs=inputs: model(input_ids=inputs), repeats
                )
    return results


def _peak_memory_worker(kind: str, queue) -> None:
    torch.manual_seed(0)
    model = make_model(kind)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(1000, 30000, (BATCH, SEQ))
    labels = torch.randint(0, 2, (BATCH,))
    for _ in range(2):
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    queue.put(_peak_rss_bytes())


def _peak_rss_bytes() -> int:
    """Peak resident set of this process (VmHWM; unlike ru_maxrss it is not inherited across exec)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def bench_memory() -> dict:
    results = {}
    context = mp.get_context("spawn")
    for kind in KINDS:
        queue = context.Queue()
        process = context.Process(target=_peak_memory_worker, args=(kind, queue))
        process.start()
        results[f"{kind}__peak_rss_train_bytes"] = queue.get()
        process.join()
    return results


def ratios(results: dict) -> dict:
    """`{kind}_vs_moe__{metric}` and `{kind}_vs_dense__{metric}` for every measured `{kind}__{metric}`."""
    out = {}
    for key, value in results.items():
        kind, metric = key.split("__", 1)
        for baseline in ("moe", "dense"):
            reference = results.get(f"{baseline}__{metric}")
            if kind != baseline and kind != "dense" and reference:
                out[f"{kind}_vs_{baseline}__{metric}"] = value / reference
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "speed.json"))
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()

    report = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "setup": {
            "batch": BATCH,
            "seq": SEQ,
            "num_experts": 8,
            "top_k": 2,
            "dynamic_ratio": 0.5,
            "repeats": args.repeats,
        },
        "minilm_layer": bench_layer(384, 1536, args.repeats),
        "bert_base_layer": bench_layer(768, 3072, args.repeats),
        "minilm_model": bench_model(args.repeats),
    }
    if not args.skip_memory:
        report["minilm_memory"] = bench_memory()
    for section in ("minilm_layer", "bert_base_layer", "minilm_model", "minilm_memory"):
        if section in report:
            report[f"{section}_ratios"] = ratios(report[section])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k.endswith("ratios")}, indent=2))


if __name__ == "__main__":
    main()
