"""Deployment paths, each next to the plain model doing the same: torch.compile(fullgraph=True), torch.export (run
with and without grad), `frozen_pad_weights`, ONNX export + ONNX Runtime with dynamic shapes, `pad-moe export`.

Everything runs with the models' default experts backend, which on a CPU is eager (the per-expert loop with a
host read): while tracing it takes `indexed_experts_forward`. Compile tests use dynamo's `aot_eager` backend
(dynamo and AOTAutograd trace exactly what inductor would get, without its minutes of C++ compilation).
"""

from __future__ import annotations

import pytest
import torch
from _fixtures import count_eq4_formations, save_tiny_bert
from torch import nn
from transformers import (
    AutoModelForImageClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    ResNetConfig,
)

import pad_moe_transformers as pmt
from pad_moe_transformers.cli import main
from pad_moe_transformers.core.pad_weight import PADWeight
from pad_moe_transformers.experts import ExpertWeights, eager_experts_forward, indexed_experts_forward
from pad_moe_transformers.export import export_onnx, frozen_pad_weights, onnx_inputs, verify_onnx

KINDS = ["plain", "element", "neuron"]
"""The plain BERT, element-wise PAD (the paper) and neuron-structured PAD, all tiny, one classifier each."""
ONNX_ATOL = 1e-4  # fp32 ONNX Runtime vs PyTorch: measured ~1e-8 on these models, 7e-8 on the real MiniLM


def _base(layers: int = 2) -> BertConfig:
    return BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip


def _model(kind: str, layers: int = 2) -> nn.Module:
    """A classifier of `kind` with PAD weights that make every term of eq. 4 count (experts apart, a partition)."""
    torch.manual_seed(0)
    if kind == "plain":
        return BertForSequenceClassification(_base(layers)).eval()
    config = pmt.PADMoEConfig(base_config=_base(layers), num_experts=4, partition_granularity=kind)
    model = pmt.PADMoEForSequenceClassification(config).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for moe in model.moe_layers:
            for linear in (moe.fc_in, moe.fc_out):
                linear.expert_weight.add_(torch.randn(linear.expert_weight.shape, generator=generator), alpha=0.05)
                linear.scale_logit.fill_(0.3)
                if kind == "element":
                    linear.mask.copy_(torch.rand(linear.mask.shape, generator=generator) < 0.5)
            if kind == "neuron":
                moe.set_neuron_mask(torch.rand(moe.fc_in.out_features, generator=generator) < 0.5)
    return model


def _batch(batch: int = 3, seq: int = 9, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 64, (batch, seq), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, seq - 3 :] = 0  # padding: the attention mask matters
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.arange(batch) % 2}


def _loss_and_grads(model: nn.Module, call=None, batch=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = (model if call is None else call)(**(batch or _batch()))
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_grads_close(grads: dict, expected: dict) -> None:
    assert set(grads) == set(expected) and expected
    for name in expected:
        torch.testing.assert_close(grads[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)


# ------------------------------------------------------------------------------------------- experts
def test_indexed_experts_equal_eager_values_and_gradients():
    """The traced form of the eager experts: same outputs and gradients, also with an expert that gets no token
    and under bf16 autocast (where both accumulate in fp32 and return the input's dtype)."""
    torch.manual_seed(0)
    num_experts, hidden, inter = 5, 8, 12
    weights = [torch.randn(num_experts, inter, hidden), torch.randn(num_experts, hidden, inter)]
    biases = [torch.randn(num_experts, inter), torch.randn(num_experts, hidden)]
    params = [t.requires_grad_() for t in (*weights, *biases)]
    x = torch.randn(9, hidden, requires_grad=True)
    top_k_index = torch.randint(0, num_experts - 1, (9, 2))  # expert 4 gets no token
    top_k_index[:, 1] = (top_k_index[:, 0] + 1) % (num_experts - 1)
    gates = torch.rand(9, 2).softmax(dim=-1)
    results = []
    for forward in (eager_experts_forward, indexed_experts_forward):
        experts = ExpertWeights(params[0], params[1], params[2], params[3], nn.GELU())
        y = forward(experts, x, top_k_index, gates)
        (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        results.append((y.detach(), [t.grad.clone() for t in (*params, x)]))
        for t in (*params, x):
            t.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results[-1] += (forward(experts.to_autocast_dtype(), x, top_k_index, gates).detach(),)
    (y_eager, g_eager, bf16_eager), (y_indexed, g_indexed, bf16_indexed) = results
    torch.testing.assert_close(y_indexed, y_eager, atol=1e-5, rtol=1e-5)
    for got, expected in zip(g_indexed, g_eager):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert bf16_indexed.dtype == bf16_eager.dtype == torch.float32
    torch.testing.assert_close(bf16_indexed, bf16_eager, atol=0.02, rtol=0.02)


# ------------------------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("kind", KINDS)
def test_compile_fullgraph_forward_and_backward(kind):
    model = _model(kind, layers=1)
    if kind != "plain":
        default = "grouped_mm" if torch.cuda.is_available() else "eager"
        assert {moe.experts_implementation for moe in model.moe_layers} == {default}
    logits_eager, grads_eager = _loss_and_grads(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break raises
    logits, grads = _loss_and_grads(model, compiled)
    torch.testing.assert_close(logits, logits_eager, atol=1e-5, rtol=1e-5)
    _assert_grads_close(grads, grads_eager)


# ------------------------------------------------------------------------------------------- torch.export
@pytest.mark.parametrize("kind", KINDS)
def test_exported_program_runs_with_and_without_grad(kind):
    model = _model(kind, layers=1)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=64)
    shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}, "labels": {0: batch}}
    exported = torch.export.export(model, (), _batch(), dynamic_shapes=shapes).module()
    logits_eager, grads_eager = _loss_and_grads(model)
    logits, grads = _loss_and_grads(exported, exported)  # grad enabled: autograd through the exported graph
    torch.testing.assert_close(logits, logits_eager, atol=1e-5, rtol=1e-5)
    _assert_grads_close(grads, grads_eager)
    other = _batch(batch=5, seq=13, seed=2)  # dynamic batch and length
    with torch.no_grad():
        torch.testing.assert_close(exported(**other).logits, model(**other).logits, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------- vision
def _vision(kind: str) -> nn.Module:
    base = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3)
    torch.manual_seed(0)
    if kind == "plain":
        return AutoModelForImageClassification.from_config(base).eval()
    pad = pmt.PADDyConvForImageClassification(pmt.PADDyConvConfig(base_config=base)).eval()
    with torch.no_grad():
        for conv in pad.pad_convs:
            conv.mask.copy_(torch.rand(conv.mask.shape) < 0.5)
            conv.expert_weight.add_(torch.randn_like(conv.expert_weight), alpha=0.1)
    return pad


@pytest.mark.parametrize("kind", ["plain", "pad"])
def test_vision_compiles_and_exports_with_dynamic_batch(kind):
    """ResNet with PAD dynamic convolutions (the batch folded into the grouped convolution's groups), next to the
    plain ResNet: compile fullgraph (forward + backward) and export with a dynamic batch, run with grad."""
    model = _vision(kind)
    images, labels = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2])

    def loss_and_grads(call, module):
        module.zero_grad(set_to_none=True)
        out = call(pixel_values=images, labels=labels)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}

    logits_eager, grads_eager = loss_and_grads(model, model)
    torch._dynamo.reset()
    logits, grads = loss_and_grads(torch.compile(model, fullgraph=True, backend="aot_eager"), model)
    torch.testing.assert_close(logits, logits_eager, atol=1e-5, rtol=1e-5)
    _assert_grads_close(grads, grads_eager)
    batch = torch.export.Dim("batch")
    exported = torch.export.export(
        model, (), {"pixel_values": images, "labels": labels},
        dynamic_shapes={"pixel_values": {0: batch}, "labels": {0: batch}},
    ).module()  # fmt: skip
    logits, grads = loss_and_grads(exported, exported)
    torch.testing.assert_close(logits, logits_eager, atol=1e-5, rtol=1e-5)
    _assert_grads_close(grads, grads_eager)
    other = {"pixel_values": torch.randn(5, 3, 32, 32), "labels": torch.arange(5) % 3}  # the exported signature
    with torch.no_grad():
        torch.testing.assert_close(exported(**other).logits, model(**other).logits, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------- frozen weights
@pytest.mark.parametrize("kind", ["element", "neuron"])
def test_frozen_weights_are_constants_of_the_exported_graph(kind, monkeypatch):
    model = _model(kind)
    batch = _batch()
    del batch["labels"]
    with torch.no_grad():
        expected = model(**batch).logits
    calls = count_eq4_formations(monkeypatch, kind)
    with torch.no_grad(), frozen_pad_weights(model):
        merged_on_entry = calls[0]
        with frozen_pad_weights(model):  # nested: the outer block's values
            program = torch.export.export(model, (), batch)
        torch.testing.assert_close(model(**batch).logits, expected, atol=1e-6, rtol=1e-6)
        assert calls[0] == merged_on_entry  # neither the trace nor the forward formed eq. 4 again
    signature = program.graph_signature
    frozen = [name for name in signature.buffers if "_pad_frozen_" in name]
    assert len(frozen) == (12 if kind == "neuron" else 4)  # 6 slices per neuron layer; 1 weight per PAD linear
    # Eq. 4 is not in the graph: the masks, expert and static weights and scale factors are read by no node.
    readers = {node.name: len(node.users) for node in program.graph.nodes if node.op == "placeholder"}
    pad_state = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}
    eq4_inputs = [n for n, t in pad_state.items() if t.rsplit(".", 1)[-1] in ("mask", "expert_weight", "scale_logit")]
    assert len(eq4_inputs) == 12 and not any(readers[n] for n in eq4_inputs)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(**batch).logits, expected, atol=1e-6, rtol=1e-6)
    # Restored on exit; with grad enabled inside the block the layers form eq. 4 (gradients reach the PAD weights).
    assert not any("_pad_frozen_" in name for name, _ in model.named_buffers())
    assert all(name not in vars(m) for m in model.modules() for name in ("_merge_experts", "_neuron_weights"))
    with frozen_pad_weights(model):
        model(**_batch()).loss.backward()
    assert all(m.expert_weight.grad is not None for m in model.modules() if isinstance(m, PADWeight))


def test_frozen_weights_refuse_a_mask_that_is_not_neuron_structured():
    model = _model("neuron")
    with torch.no_grad():
        model.moe_layers[0].fc_in.mask[0, 0] = ~model.moe_layers[0].fc_in.mask[0, 0]
    with pytest.raises(ValueError, match="neuron-structured"), frozen_pad_weights(model):
        pass
    assert not any("_pad_frozen_" in name for name, _ in model.named_buffers())


# ------------------------------------------------------------------------------------------- ONNX
@pytest.mark.parametrize("kind", KINDS)
def test_onnx_matches_pytorch_at_other_batch_sizes_and_lengths(kind, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = _model(kind, layers=1)
    if kind == "element":  # grouped_mm (the CUDA default) has no ONNX operator: the export traces eager experts
        model.set_experts_implementation("grouped_mm")
    result = export_onnx(model, tmp_path / "model.onnx")  # traced at 2 x 16
    if kind == "element":
        assert model.moe_layers[0].experts_implementation == "grouped_mm"  # restored
    assert result.input_names == ["input_ids", "attention_mask", "token_type_ids"]
    assert result.output_names == ["logits"] and result.max_abs_diff <= ONNX_ATOL
    import onnx

    graph = onnx.load(str(result.path)).graph
    assert [[d.dim_param for d in i.type.tensor_type.shape.dim] for i in graph.input] == [["batch", "sequence"]] * 3
    if kind != "plain":  # only the selected experts run: their tokens are found by NonZero
        assert sum(node.op_type == "NonZero" for node in graph.node) == model.config.num_experts
    for batch_size in (1, 5):
        for seq_len in (7, 40):
            diff = verify_onnx(result.path, model, onnx_inputs(model, batch_size, seq_len, seed=seq_len))
            assert diff <= ONNX_ATOL, (batch_size, seq_len, diff)


def test_onnx_export_refuses_a_vision_model(tmp_path):
    pytest.importorskip("onnxscript")
    with pytest.raises(TypeError, match="torch.export"):
        export_onnx(_vision("pad"), tmp_path / "model.onnx")


def test_cli_export_writes_a_verified_serving_folder(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    dense = tmp_path / "dense"
    save_tiny_bert(dense, "the a cat dog man is on park".split())
    config = pmt.PADMoEConfig.from_base(str(dense), num_experts=4, num_labels=2)
    model = pmt.PADMoEForSequenceClassification.from_pretrained(dense, config=config)
    batch = {**onnx_inputs(model, 2, 8), "labels": torch.tensor([0, 1])}
    pmt.partition_model(model, [batch], method="random", dynamic_ratio=0.5, progress=False)
    model.save_pretrained(tmp_path / "pad")
    AutoTokenizer.from_pretrained(dense).save_pretrained(tmp_path / "pad")  # as `pad-moe convert` leaves it
    code = main(["export", str(tmp_path / "pad"), str(tmp_path / "onnx"), "--seq_len", "9", "-q"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert {"model.onnx", "config.json", "tokenizer.json"} <= {p.name for p in (tmp_path / "onnx").iterdir()}
    assert "inputs input_ids, attention_mask, token_type_ids" in out and "outputs logits" in out
    diff = float(out.split("max abs diff ")[1].split()[0])
    assert diff <= ONNX_ATOL
    reloaded = pmt.PADMoEForSequenceClassification.from_pretrained(tmp_path / "pad")
    assert verify_onnx(tmp_path / "onnx" / "model.onnx", reloaded, onnx_inputs(reloaded, 4, 21)) <= ONNX_ATOL
    # Bad input: OUT is a file (exit 2, one line naming it).
    (tmp_path / "file").write_text("x")
    code = main(["export", str(tmp_path / "pad"), str(tmp_path / "file"), "-q"])
    assert code == 2 and "OUT must be a folder" in capsys.readouterr().err
