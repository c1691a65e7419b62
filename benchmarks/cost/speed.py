"""Speed and memory of dense FFN vs plain MoE vs element-wise and neuron-structured PAD-MoE, in one run.

    python benchmarks/cost/speed.py [--repeats 5] [--precisions fp32,bf16] [--out benchmarks/results/speed.json]

Measures, on a MiniLM-sized model (6 layers, hidden 384, FFN 1536, 8 experts, top-2, kappa 0.5)
and on one BERT-base-sized layer (hidden 768, FFN 3072):
- FFN layer forward (batch 32 x 128 tokens), training mode (weights of eq. 4 formed each call),
  forward + backward, and inference mode (eval + no_grad, inside `merged_pad_weights()`: eq. 4 formed once
  for the block; `*_unmerged_s` rows: formed in every forward);
- a full training step of the whole model (forward + backward + AdamW, batch 32 x 128);
- whole-model inference at batch 1 and batch 32 (sequence 128);
- peak resident memory of a process that builds the model and runs 2 training steps;
- each in fp32 and under bf16 autocast (where the CPU has native bf16), and the layers also
  compiled (`torch.compile`, inductor) when `--compile` is given.
PAD kinds have the storage a partition leaves (compact: only what eq. 4 reads is a parameter).
Kinds: ``dense`` FFN; ``moe`` (the PAD layer with raw expert weights: no eq. 4, no scale factors, so the
ratio isolates what PAD adds); ``pad`` (element-wise, the paper); ``pad_neuron`` (neuron-structured);
``hf_moe`` (Transformers' own `use_experts_implementation` experts on the same shapes and routing, run by
its grouped_mm: an outside reference for the MoE). MoE kinds use the model's default experts backend (eager
without CUDA, grouped_mm with it); ``@grouped_mm`` rows force grouped_mm, ``@compiled`` rows are grouped_mm
under `torch.compile`. Every number is a median over repeats; ratios
are to the plain MoE and to the dense FFN of the same run. Never run it while another torch process is
busy: on 2 cores, two processes slow each other 2-5x.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import platform
import resource
import sys
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, PretrainedConfig
from transformers.integrations.moe import use_experts_implementation

import pad_moe_transformers as pmt
from pad_moe_transformers.experts import ExpertWeights
from pad_moe_transformers.precision import native_bf16_available

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _paths
import _timing as timing  # noqa: E402
from _paths import ROOT  # noqa: E402
from _provenance import commit_label  # noqa: E402

MINILM = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536, vocab_size=30522)
BATCH, SEQ = 32, 128
DEVICE = torch.device("cpu")


class PlainMoEFeedForward(pmt.PADMoEFeedForward):
    """Baseline: identical routing and experts backend, experts used as stored (no eq. 4, no scale factors)."""

    def expert_weights(self) -> ExpertWeights:
        return ExpertWeights(
            self.fc_in.expert_weight, self.fc_out.expert_weight,
            self.fc_in.effective_bias(), self.fc_out.effective_bias(), self.activation,
        )  # fmt: skip


@use_experts_implementation(has_gate=False, has_bias=True)
class TransformersExperts(nn.Module):
    """Experts as a Transformers MoE model declares them (3-D parameters, dispatched by the experts interface)."""

    def __init__(self, config: PretrainedConfig, hidden: int, inter: int, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.up_proj = nn.Parameter(torch.randn(num_experts, inter, hidden) * 0.02)
        self.up_proj_bias = nn.Parameter(torch.zeros(num_experts, inter))
        self.down_proj = nn.Parameter(torch.randn(num_experts, hidden, inter) * 0.02)
        self.down_proj_bias = nn.Parameter(torch.zeros(num_experts, hidden))
        self.act_fn = nn.GELU()

    def forward(self, hidden_states, top_k_index, top_k_weights):
        """Eager experts (used only with `experts_implementation="eager"`; the benchmark selects grouped_mm)."""
        out = torch.zeros_like(hidden_states)
        for expert in range(self.num_experts):
            token, slot = torch.where(top_k_index == expert)
            h = self.act_fn(nn.functional.linear(hidden_states[token], self.up_proj[expert], self.up_proj_bias[expert]))
            y = nn.functional.linear(h, self.down_proj[expert], self.down_proj_bias[expert])
            out.index_add_(0, token, y * top_k_weights[token, slot, None].to(y.dtype))
        return out


class TransformersMoE(nn.Module):
    """Router (the same TopKRouter) + Transformers-declared experts, run by Transformers' grouped_mm."""

    def __init__(self, hidden: int, inter: int, num_experts: int = 8) -> None:
        super().__init__()
        config = PretrainedConfig()
        config._experts_implementation = "grouped_mm"
        self.router = pmt.TopKRouter(hidden, num_experts, 2)
        self.router.reset_parameters()
        self.experts = TransformersExperts(config, hidden, inter, num_experts)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        decision = self.router(x)
        return self.experts(x, decision.experts, decision.gates).reshape(hidden_states.shape)


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


LAYER_KINDS = (
    "dense", "moe", "pad", "pad_neuron", "hf_moe", "moe@grouped_mm", "pad@grouped_mm", "pad_neuron@grouped_mm"
)  # fmt: skip
MODEL_KINDS = ("dense", "moe", "pad", "pad_neuron")
"""dense FFN; plain MoE; element-wise PAD (the paper); neuron-structured PAD; `@backend`: that experts backend
instead of the model's default (eager without CUDA, grouped_mm with it)."""


def _default_backend() -> str:
    """What a PAD model picks when none is requested (`PADMoEPreTrainedModel.get_correct_experts_implementation`)."""
    return "grouped_mm" if DEVICE.type == "cuda" else "eager"


def _split(kind: str) -> tuple[str, str]:
    """`"pad@grouped_mm"` -> `("pad", "grouped_mm")`; without `@`, the model's default backend."""
    name, _, backend = kind.partition("@")
    return name, backend or _default_backend()


def _granularity(kind: str) -> str:
    return "neuron" if _split(kind)[0] == "pad_neuron" else "element"


def _partition(kind: str, moe: pmt.PADMoEFeedForward, kappa: float, seed: int) -> None:
    name = _split(kind)[0]
    if name == "moe":
        moe.__class__ = PlainMoEFeedForward
    elif name == "pad":
        partition_randomly(moe, kappa, seed)
    elif name == "pad_neuron":
        partition_neurons_randomly(moe, kappa, seed)


def make_ffn(kind: str, hidden: int, inter: int, kappa: float = 0.5) -> nn.Module:
    name, backend = _split(kind)
    if name == "hf_moe":
        return TransformersMoE(hidden, inter)
    fc_in, fc_out = nn.Linear(hidden, inter), nn.Linear(inter, hidden)
    if name == "dense":
        return nn.Sequential(fc_in, nn.GELU(), fc_out)
    config = PretrainedConfig()
    config._experts_implementation = backend
    moe = pmt.PADMoEFeedForward.from_dense(
        fc_in, nn.GELU(), fc_out, num_experts=8, num_experts_per_tok=2,
        partition_granularity=_granularity(kind), config=config,
    )  # fmt: skip
    _partition(kind, moe, kappa, seed=0)
    pmt.compact_pad_storage(moe)  # the storage a partition leaves (all-dynamic masks stay dense)
    return moe


def make_model(kind: str, kappa: float = 0.5) -> nn.Module:
    base = BertConfig(**MINILM, num_labels=2)
    if kind == "dense":
        return BertForSequenceClassification(base)
    config = pmt.PADMoEConfig(base_config=base, num_experts=8, partition_granularity=_granularity(kind))
    model = pmt.PADMoEForSequenceClassification(config)
    model.set_experts_implementation(_split(kind)[1])
    for index, moe in enumerate(model.moe_layers):
        _partition(kind, moe, kappa, seed=index)
    pmt.compact_pad_storage(model)  # the storage a partition leaves (all-dynamic masks stay dense)
    return model


def autocast(precision: str):
    """bf16 autocast on the device (the router stays fp32 inside it), or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(DEVICE.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def median_time(fn, repeats: int, warmup: int = 2) -> float:
    def run():
        fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    return timing.median_time(run, repeats, warmup)


def bench_layer(hidden: int, inter: int, repeats: int, precision: str, compile_layers: bool) -> dict:
    x = torch.randn(BATCH, SEQ, hidden, device=DEVICE)
    results = {}
    # compiled: the grouped_mm backend (the eager loop's host sync would split the graph)
    kinds = list(LAYER_KINDS) + (["moe@compiled", "pad@compiled"] if compile_layers else [])
    for kind in kinds:
        torch.manual_seed(0)
        ffn = make_ffn(kind.replace("@compiled", "@grouped_mm"), hidden, inter).to(DEVICE)
        call = torch.compile(ffn) if kind.endswith("@compiled") else ffn
        ffn.train()
        with torch.no_grad(), autocast(precision):
            results[f"{kind}__forward_train_mode_s"] = median_time(lambda call=call: call(x), repeats)
        with autocast(precision):
            results[f"{kind}__forward_backward_s"] = median_time(
                lambda call=call: call(x).float().sum().backward(), repeats
            )
        ffn.eval()
        with torch.no_grad(), autocast(precision):
            results[f"{kind}__forward_inference_unmerged_s"] = median_time(lambda call=call: call(x), repeats)
            with pmt.merged_pad_weights():  # eq. 4 formed once for the block, as an inference loop would
                results[f"{kind}__forward_inference_s"] = median_time(lambda call=call: call(x), repeats)
    return results


def bench_model(repeats: int, precision: str) -> dict:
    results = {}
    ids = torch.randint(1000, 30000, (BATCH, SEQ), device=DEVICE)
    labels = torch.randint(0, 2, (BATCH,), device=DEVICE)
    for kind in MODEL_KINDS:
        torch.manual_seed(0)
        model = make_model(kind).to(DEVICE)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def train_step(model=model, optimizer=optimizer):
            model.train()
            with autocast(precision):
                loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        results[f"{kind}__train_step_s"] = median_time(train_step, max(3, repeats // 2), warmup=1)
        model.eval()
        if hasattr(model, "unmerge_pad_weights"):  # eval() merges a PAD model: the unmerged rows opt out explicitly
            model.unmerge_pad_weights()
        for batch in (1, BATCH):
            with torch.no_grad(), autocast(precision):
                inputs = ids[:batch]
                results[f"{kind}__inference_b{batch}_unmerged_s"] = median_time(
                    lambda model=model, inputs=inputs: model(input_ids=inputs), repeats
                )
                with pmt.merged_pad_weights():
                    results[f"{kind}__inference_b{batch}_s"] = median_time(
                        lambda model=model, inputs=inputs: model(input_ids=inputs), repeats
                    )
    return results


def _peak_memory_worker(kind: str, settings: dict, queue) -> None:
    """A fresh process: build the model, run 2 training steps, report the peak memory (RSS, or CUDA allocated)."""
    global BATCH, SEQ, MINILM
    BATCH, SEQ, MINILM = settings["batch"], settings["seq"], settings["minilm"]
    device = torch.device(settings["device"])
    torch.manual_seed(0)
    model = make_model(kind).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(1000, 30000, (BATCH, SEQ), device=device)
    labels = torch.randint(0, 2, (BATCH,), device=device)
    for _ in range(2):
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    queue.put(torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _peak_rss_bytes())


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
    settings = {"batch": BATCH, "seq": SEQ, "minilm": MINILM, "device": str(DEVICE)}
    key = "peak_cuda_allocated_train_bytes" if DEVICE.type == "cuda" else "peak_rss_train_bytes"
    for kind in MODEL_KINDS:
        queue = context.Queue()
        process = context.Process(target=_peak_memory_worker, args=(kind, settings, queue))
        process.start()
        results[f"{kind}__{key}"] = queue.get()
        process.join()
    return results


def ratios(results: dict) -> dict:
    """`{kind}_vs_moe__{metric}` and `{kind}_vs_dense__{metric}` for every measured `{kind}__{metric}`."""
    out = {}
    for key, value in results.items():
        kind, metric = key.split("__", 1)
        for baseline in ("moe", "dense"):
            reference = results.get(f"{baseline}__{metric}")
            if kind != baseline and kind != "dense" and reference:  # "moe@eager" vs "moe": the backend's effect
                out[f"{kind}_vs_{baseline}__{metric}"] = value / reference
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precisions", default="fp32,bf16", help="bf16 rows run only where the CPU has native bf16")
    parser.add_argument("--compile", action="store_true", help="add torch.compile (inductor) rows for the layers")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/ (--smoke: outputs/smoke/)")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and 1 repeat: checks the script runs")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    out_dir = ROOT / ("outputs/smoke" if args.smoke else "benchmarks/results")  # smoke never overwrites results
    args.out = args.out or str(out_dir / "speed.json")
    global BATCH, SEQ, MINILM, DEVICE
    DEVICE = torch.device(args.device)
    layer_shapes = {"minilm_layer": (384, 1536), "bert_base_layer": (768, 3072)}
    if args.smoke:
        BATCH, SEQ, args.repeats = 2, 16, 1
        MINILM = dict(MINILM, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                      vocab_size=30522)  # fmt: skip
        layer_shapes = {"minilm_layer": (32, 64)}
    bf16_ok = DEVICE.type == "cuda" or native_bf16_available()
    precisions = [p for p in args.precisions.split(",") if p == "fp32" or bf16_ok]

    report = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu",
            "native_bf16": bf16_ok,
        },
        "setup": {
            "commit": commit_label(),
            "batch": BATCH,
            "seq": SEQ,
            "num_experts": 8,
            "top_k": 2,
            "dynamic_ratio": 0.5,
            "repeats": args.repeats,
            "experts_implementation": f"{_default_backend()} (the default here; @grouped_mm rows: grouped_mm)",
            "precisions": precisions,
            "smoke": args.smoke,
        },
    }
    for precision in precisions:
        suffix = "" if precision == "fp32" else f"_{precision}"
        for section, (hidden, inter) in layer_shapes.items():
            # inductor compiles take minutes on a CPU: compiled rows for the MiniLM layer only
            compiled = args.compile and section == "minilm_layer"
            report[section + suffix] = bench_layer(hidden, inter, args.repeats, precision, compiled)
        report["minilm_model" + suffix] = bench_model(args.repeats, precision)
    if not args.skip_memory:
        report["minilm_memory"] = bench_memory()
    for section in [k for k in report if k not in ("machine", "setup")]:
        report[f"{section}_ratios"] = ratios(report[section])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k.endswith("ratios")}, indent=2))


if __name__ == "__main__":
    main()
