"""Transformers' experts backends (eager / grouped_mm / batched_mm) on PAD layers and models.

The backends must agree with each other and with a per-token reference, in outputs and gradients, on padded
batches, for element and neuron-structured PAD; the default (grouped_mm) forward must trace as one graph.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, BertConfig, BertModel

from pad_moe_transformers import PADMoEConfig, PADMoEFeedForward, apply_partition
from pad_moe_transformers.core import named_pad_linears
from pad_moe_transformers.experts import EXPERTS_IMPLEMENTATIONS, ExpertWeights, run_experts

BACKENDS = EXPERTS_IMPLEMENTATIONS
# benchmarks/gpu/gpu_check.sh runs this file on a GPU with PAD_MOE_TEST_DEVICE=cuda.
DEVICE = torch.device(os.environ.get("PAD_MOE_TEST_DEVICE", "cpu"))


def _layer(hidden: int = 16, inter: int = 32, num_experts: int = 4, seed: int = 0) -> PADMoEFeedForward:
    torch.manual_seed(seed)
    moe = PADMoEFeedForward.from_dense(
        nn.Linear(hidden, inter), nn.GELU(), nn.Linear(inter, hidden), num_experts=num_experts, num_experts_per_tok=2
    )
    with torch.no_grad():  # experts, static weights, masks and scale factors all different
        for linear in (moe.fc_in, moe.fc_out):
            linear.expert_weight.normal_(std=0.3)
            linear.static_weight.normal_(std=0.3)
            linear.expert_bias.normal_()
            linear.mask.copy_(torch.rand_like(linear.mask, dtype=torch.float) < 0.5)
            linear.scale_logit.fill_(0.4)
        moe.router.weight.normal_()
    return moe.to(DEVICE)


def _per_token_reference(moe: PADMoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """Each token through its top-2 experts one at a time, eq. 4 from `effective_weight`, in float64."""
    decision = moe.router(x)
    w_in, w_out = moe.fc_in.effective_weight().double(), moe.fc_out.effective_weight().double()
    b_in, b_out = moe.fc_in.effective_bias().double(), moe.fc_out.effective_bias().double()
    rows = []
    for t in range(x.shape[0]):
        y = torch.zeros(x.shape[1], dtype=torch.double, device=x.device)
        for gate, e in zip(decision.gates[t].tolist(), decision.experts[t].tolist()):
            h = moe.activation(x[t].double() @ w_in[e].T + b_in[e])
            y += gate * (h @ w_out[e].T + b_out[e])
        rows.append(y)
    return torch.stack(rows)


def _run(moe: PADMoEFeedForward, x: torch.Tensor, backend: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output and the gradients of every parameter and of the input, with `backend` forced on the layer."""
    moe.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    decision = moe.router(x)
    experts = ExpertWeights(
        moe.fc_in.effective_weight(), moe.fc_out.effective_weight(),
        moe.fc_in.effective_bias(), moe.fc_out.effective_bias(), moe.activation,
    )  # fmt: skip
    y = run_experts(backend, experts, x, decision.experts, decision.gates)
    upstream = torch.linspace(-1, 1, y.numel(), device=y.device).reshape(y.shape)  # a non-uniform gradient
    (y * upstream).sum().backward()
    grads = {name: p.grad.clone() for name, p in moe.named_parameters() if p.grad is not None}
    grads["input"] = x.grad.clone()
    return y.detach(), grads


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_per_token_reference(backend):
    moe = _layer()
    x = torch.randn(13, 16, device=DEVICE)
    y, _ = _run(moe, x, backend)
    torch.testing.assert_close(y.double(), _per_token_reference(moe, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["grouped_mm", "batched_mm"])
def test_backend_gradients_equal_eager(backend):
    moe = _layer()
    x = torch.randn(21, 16, device=DEVICE)
    y_eager, g_eager = _run(moe, x, "eager")
    y, g = _run(moe, x, backend)
    torch.testing.assert_close(y, y_eager, atol=1e-5, rtol=1e-5)
    assert set(g) == set(g_eager) and {"fc_in.expert_weight", "fc_in.scale_logit", "router.weight", "input"} <= set(g)
    for name in g:
        torch.testing.assert_close(g[name], g_eager[name], atol=1e-5, rtol=1e-4, msg=name)


def test_unaligned_shapes_fall_back_to_eager():
    """grouped_mm needs 16-byte strides; a hidden size of 6 (24 bytes) takes the eager experts, same result."""
    moe = _layer(hidden=6, inter=10)
    x = torch.randn(7, 6, device=DEVICE)
    y, _ = _run(moe, x, "grouped_mm")
    torch.testing.assert_close(y.double(), _per_token_reference(moe, x), atol=1e-5, rtol=1e-5)


def test_autocast_runs_the_experts_in_bf16():
    """grouped_mm is not an autocast op: the layer casts the eq. 4 weights itself, as F.linear would."""
    moe = _layer()
    x = torch.randn(16, 16, device=DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        outs = {backend: _run(moe, x, backend)[0] for backend in BACKENDS}
    reference = _per_token_reference(moe, x).float()
    for backend, y in outs.items():
        assert y.dtype == torch.float32  # the layer returns its input's dtype
        torch.testing.assert_close(y, reference, atol=0.1, rtol=0.05, msg=backend)
        assert not torch.equal(y, reference)  # bf16 rounding is visible: the matmuls did run in bf16


# ------------------------------------------------------------------------------------------- models
@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dense")
    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )  # fmt: skip
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    return path


def _padded_batch():
    torch.manual_seed(1)
    ids = torch.randint(5, 64, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 1])}
    return {key: value.to(DEVICE) for key, value in batch.items()}


def _model(dense_dir, granularity: str = "element", **kwargs):
    config = PADMoEConfig.from_base(dense_dir, num_labels=2, partition_granularity=granularity)
    torch.manual_seed(2)
    model = AutoModelForSequenceClassification.from_pretrained(dense_dir, config=config, **kwargs)
    with torch.no_grad():  # experts apart, a partition-like mask (neuron-structured for the neuron form)
        for moe in model.moe_layers:
            for linear in (moe.fc_in, moe.fc_out):
                linear.expert_weight.add_(torch.randn_like(linear.expert_weight), alpha=0.05)
            if granularity == "neuron":
                moe.set_neuron_mask(torch.arange(moe.fc_in.out_features) % 2 == 0)
            else:
                for linear in (moe.fc_in, moe.fc_out):
                    linear.mask.copy_(torch.rand_like(linear.mask, dtype=torch.float) < 0.5)
    return model.to(DEVICE)


def _loss_and_grads(model, call=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and parameter gradients of one padded batch through `call` (default: the model itself)."""
    model.zero_grad(set_to_none=True)
    out = (model if call is None else call)(**_padded_batch())
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_default_backend_and_standard_selection(dense_dir):
    model = _model(dense_dir)
    # Transformers' default (grouped_mm) where CUDA is present; on a CPU-only machine the faster per-expert loop
    default = "grouped_mm" if torch.cuda.is_available() else "eager"
    assert model.config._experts_implementation == default
    assert all(moe.experts_implementation == default for moe in model.moe_layers)
    model.set_experts_implementation("grouped_mm")
    assert all(moe.experts_implementation == "grouped_mm" for moe in model.moe_layers)
    model.set_experts_implementation("eager")
    assert all(moe.experts_implementation == "eager" for moe in model.moe_layers)
    loaded = _model(dense_dir, experts_implementation="batched_mm")
    assert [moe.experts_implementation for moe in loaded.moe_layers] == ["batched_mm"] * 2
    with pytest.raises(ValueError, match="experts_implementation"):
        model.set_experts_implementation("no_such_backend")


def test_pad_checkpoint_loads_with_each_backend(dense_dir, tmp_path):
    model = _model(dense_dir)
    masks = {ref.short_name: ref.module.mask.clone() for ref in named_pad_linears(model)}
    apply_partition(model, masks, {"method": "manual"})  # records the hand-made masks, as saving requires
    model.save_pretrained(tmp_path / "pad")
    for backend in BACKENDS:
        loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "pad", experts_implementation=backend)
        assert [moe.experts_implementation for moe in loaded.moe_layers] == [backend] * 2


@pytest.mark.parametrize("granularity", ["element", "neuron"])
def test_models_agree_across_backends_on_padded_batches(dense_dir, granularity):
    model = _model(dense_dir, granularity)
    results = {}
    for backend in BACKENDS:
        model.set_experts_implementation(backend)
        results[backend] = _loss_and_grads(model)
    logits_eager, grads_eager = results["eager"]
    for backend in ("grouped_mm", "batched_mm"):
        logits, grads = results[backend]
        torch.testing.assert_close(logits, logits_eager, atol=1e-5, rtol=1e-5, msg=backend)
        assert set(grads) == set(grads_eager)
        for name in grads:
            torch.testing.assert_close(grads[name], grads_eager[name], atol=1e-5, rtol=1e-4, msg=f"{backend} {name}")


def test_forward_and_backward_trace_as_one_graph(dense_dir):
    """With grouped_mm, no host synchronisation and no data-dependent Python control flow: dynamo traces the whole model
    (forward with losses and usage counts, then backward) without a graph break. The `eager` dynamo backend
    checks the tracing without inductor's minutes of C++ compilation; `benchmarks/cost/speed.py` runs inductor."""
    model = _model(dense_dir, experts_implementation="grouped_mm")
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    logits_eager, grads_eager = _loss_and_grads(model)
    model.reset_expert_usage()
    logits, grads = _loss_and_grads(model, compiled)
    torch.testing.assert_close(logits, logits_eager, atol=1e-5, rtol=1e-5)
    for name in grads_eager:
        torch.testing.assert_close(grads[name], grads_eager[name], atol=1e-5, rtol=1e-4, msg=name)
    real_slots = int(_padded_batch()["attention_mask"].sum()) * 2  # top-2: each real token counted twice
    assert [sum(row) for row in model.expert_usage().values()] == [real_slots, real_slots]


def test_bucketed_rows_are_few_and_close_above():
    from pad_moe_transformers.experts import bucketed_rows

    buckets = [bucketed_rows(n) for n in range(1, 8193)]
    assert all(b >= n for n, b in zip(range(1, 8193), buckets))
    assert all(b <= n * 1.125 + 1e-9 for n, b in zip(range(1, 8193), buckets) if n > 256)
    assert len(set(buckets)) <= 80  # vs 8192 distinct row counts: oneDNN's kernel cache holds them all


def test_bf16_eager_experts_pad_rows_without_changing_the_result():
    """bf16 on the CPU: each expert's rows are zero-padded to a bucketed count (oneDNN compiles a kernel per shape);
    outputs and gradients equal the unpadded computation's (the zero rows are dropped and add nothing)."""
    from pad_moe_transformers import experts as experts_module

    torch.manual_seed(0)
    num_experts, hidden, inter, tokens = 4, 16, 32, 37
    weights = [torch.randn(num_experts, inter, hidden), torch.randn(num_experts, hidden, inter)]
    biases = [torch.randn(num_experts, inter), torch.randn(num_experts, hidden)]
    x = torch.randn(tokens, hidden)
    index = torch.randint(0, num_experts, (tokens, 2))
    gates = torch.rand(tokens, 2)
    results = []
    for pad in (True, False):
        params = [t.clone().to(torch.bfloat16).requires_grad_() for t in (*weights, *biases)]
        inputs = x.to(torch.bfloat16).requires_grad_()
        experts = ExpertWeights(params[0], params[1], params[2], params[3], nn.GELU())
        original = experts_module._pads_rows
        experts_module._pads_rows = lambda *_, pad=pad: pad
        try:
            y = experts_module.eager_experts_forward(experts, inputs, index, gates)
        finally:
            experts_module._pads_rows = original
        y.float().square().sum().backward()
        results.append([y.detach(), inputs.grad, *(p.grad for p in params)])
    assert experts_module._pads_rows(ExpertWeights(*(t.bfloat16() for t in (*weights, *biases)), nn.GELU()), x)
    for padded, plain in zip(*results):
        torch.testing.assert_close(padded.float(), plain.float(), rtol=1e-2, atol=1e-2)
