"""Compact trainable storage (issue 27 part 1): after a partition a PAD weight's parameters are only what eq. 4 reads
(`expert_values` `(K, nnz(M))`, `static_values` `(numel - nnz(M),)`). Checked against the dense layout it replaces:
outputs and gradients on padded batches (element and neuron MoE, dynamic convolution), trainable counts, checkpoint
bytes, loading, the Trainer's optimizer re-binding, and the errors for what cannot work."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from test_callback import _args, _PairDataset
from test_partition import _batches, _tiny_model
from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification, ResNetConfig, Trainer

import pad_moe_transformers as pmt
from pad_moe_transformers import optimizer as optimizer_module
from pad_moe_transformers.core.pad_weight import PADWeight, compact_pad_storage
from pad_moe_transformers.pad_linear import PADExpertLinear
from pad_moe_transformers.vision.dynamic_conv import PADDynamicConv2d


def _pad_weights(model):
    return [m for m in model.modules() if isinstance(m, PADWeight)]


def _partitioned(granularity: str = "element", compact: bool = True, ratio: float = 0.4):
    model = _tiny_model(seed=0, partition_granularity=granularity)
    pmt.partition_model(
        model, _batches(), dynamic_ratio=ratio, num_batches=2, rounds=2, progress=False, compact_storage=compact
    )
    return model


def _grads(model) -> dict[str, torch.Tensor]:
    """Every gradient, PAD weights in dense form (a compact layer's gradient scattered to the dense positions)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, PADWeight):
            if module.storage == "compact":
                dyn, sta = module.compact_index()
                k = module.num_experts
                expert = torch.zeros(k, module.mask.numel()).index_copy(1, dyn, module.expert_values.grad)
                static = torch.zeros(module.mask.numel()).index_copy(0, sta, module.static_values.grad)
            else:
                expert = module.expert_weight.grad.reshape(module.num_experts, -1)
                static = module.static_weight.grad.reshape(-1)
            out[name + ".expert"], out[name + ".static"] = expert, static
    for name, parameter in model.named_parameters():
        if not name.endswith(("expert_weight", "static_weight", "expert_values", "static_values")):
            out[name] = parameter.grad
    return out


@pytest.mark.parametrize("granularity", ["element", "neuron"])
def test_compact_model_equals_the_dense_layout_outputs_and_gradients(granularity):
    dense = _partitioned(granularity, compact=False)
    compact = _partitioned(granularity, compact=True)
    assert {m.storage for m in _pad_weights(dense)} == {"dense"}
    assert {m.storage for m in _pad_weights(compact)} == {"compact"}
    batch = _batches(n=1, seed=7)[0]  # padded: the first row ends in 3 padding tokens
    logits = []
    for model in (dense, compact):
        model.train()
        torch.manual_seed(3)  # the same dropout masks
        out = model(**batch)
        out.loss.backward()
        logits.append(out.logits)
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=1e-6)
    dense_grads, compact_grads = _grads(dense), _grads(compact)
    assert dense_grads.keys() == compact_grads.keys()
    for name, grad in dense_grads.items():
        torch.testing.assert_close(compact_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    # eval mode merges: the stored compact eq. 4 gives the same values, and its backward the same gradients
    for model in (dense, compact):
        model.zero_grad()
        model.eval()
        model(**batch).loss.backward()
    for name, grad in _grads(dense).items():
        torch.testing.assert_close(_grads(compact)[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_trainable_entries_are_what_eq4_reads():
    dense, compact = _partitioned(compact=False), _partitioned(compact=True)
    expected = sum(p.numel() for p in dense.parameters())
    for layer in _pad_weights(dense):
        nnz, numel = layer.num_dynamic(), layer.mask.numel()
        expected -= layer.num_experts * numel + numel  # the dense tensors ...
        expected += layer.num_experts * nnz + (numel - nnz)  # ... become what eq. 4 reads
    assert sum(p.numel() for p in compact.parameters()) == expected
    assert expected < sum(p.numel() for p in dense.parameters())
    report = compact.parameter_report()
    assert report.total == dense.parameter_report().total


def test_layer_parity_and_refusals():
    torch.manual_seed(0)
    layer = PADExpertLinear(6, 5, 3)
    with torch.no_grad():
        layer.expert_weight.normal_()
        layer.static_weight.normal_()
        layer.mask.copy_(torch.rand(5, 6) < 0.5)
        layer.scale_logit.fill_(0.2)
    reference = copy.deepcopy(layer)
    layer.compact_storage_()
    torch.testing.assert_close(layer.effective_weight(), reference.effective_weight(), rtol=0, atol=0)
    assert [n for n, _ in layer.named_parameters()] == ["expert_values", "static_values", "scale_logit", "expert_bias"]
    with pytest.raises(AttributeError, match="dense_expert_weight"):
        _ = layer.expert_weight
    with torch.no_grad():
        layer.mask[0, 0] = ~layer.mask[0, 0]
    with pytest.raises(RuntimeError, match="mask of this PADExpertLinear changed"):
        layer.effective_weight()
    with torch.no_grad():
        layer.mask[0, 0] = ~layer.mask[0, 0]
    layer.dense_storage_()
    torch.testing.assert_close(layer.effective_weight(), reference.effective_weight(), rtol=0, atol=0)


def test_dynamic_convolution_compact_parity():
    torch.manual_seed(0)
    conv = PADDynamicConv2d(4, 6, 3, padding=1, num_kernels=3)
    with torch.no_grad():
        conv.expert_weight.normal_()
        conv.static_weight.normal_()
        conv.mask.copy_(torch.rand_like(conv.mask, dtype=torch.float) < 0.3)
        conv.expert_weight.masked_fill_(~conv.mask, 0.0)
        conv.static_weight.masked_fill_(conv.mask, 0.0)
    compact = copy.deepcopy(conv).compact_storage_()
    x = torch.randn(5, 4, 7, 7)
    out_dense, out_compact = conv(x), compact(x)
    torch.testing.assert_close(out_compact, out_dense, rtol=1e-6, atol=1e-6)
    out_dense.square().sum().backward()
    out_compact.square().sum().backward()
    dyn, sta = compact.compact_index()
    torch.testing.assert_close(compact.expert_values.grad, conv.expert_weight.grad.reshape(3, -1)[:, dyn])
    torch.testing.assert_close(compact.static_values.grad, conv.static_weight.grad.reshape(-1)[sta])


def test_vision_partition_gives_compact_storage_and_reloads(tmp_path):
    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3)
    model = AutoModelForImageClassification.from_config(pmt.PADDyConvConfig.from_base(config))
    images = [{"pixel_values": torch.randn(6, 3, 16, 16), "labels": torch.randint(0, 3, (6,))} for _ in range(2)]
    pmt.partition_model(model, images, dynamic_ratio=0.5, num_batches=2, progress=False)
    assert {m.storage for m in _pad_weights(model)} == {"compact"}
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert {m.storage for m in _pad_weights(loaded)} == {"compact"}
    model.eval(), loaded.eval()
    torch.testing.assert_close(loaded(**images[0]).logits, model(**images[0]).logits)


def test_checkpoint_bytes_do_not_depend_on_the_storage(tmp_path):
    dense = _partitioned(compact=False)
    dense.save_pretrained(tmp_path / "dense")
    compact_pad_storage(dense)
    dense.save_pretrained(tmp_path / "compact")
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "dense" / name).read_bytes() == (tmp_path / "compact" / name).read_bytes(), name


@pytest.mark.parametrize("granularity", ["element", "neuron"])
def test_loading_a_partitioned_checkpoint_gives_compact_storage(tmp_path, granularity):
    model = _partitioned(granularity)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert {m.storage for m in _pad_weights(loaded)} == {"compact"}
    for a, b in zip(_pad_weights(model), _pad_weights(loaded)):
        assert torch.equal(a.expert_values, b.expert_values) and torch.equal(a.static_values, b.static_values)
    # `load_state_dict` of an upcycled (dense, all-dynamic) model takes the compact storage it loads
    fresh = _tiny_model(seed=1, partition_granularity=granularity)
    fresh.load_state_dict(model.state_dict())
    assert {m.storage for m in _pad_weights(fresh)} == {"compact"}
    batch = _batches(n=1, seed=3)[0]
    model.eval(), fresh.eval(), loaded.eval()
    torch.testing.assert_close(fresh(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loading_never_forms_dense_experts(tmp_path, monkeypatch, dtype):
    """The compact values load straight into compact parameters: no dense decode, no dense -> compact conversion,
    and the dense names the model was built with are not reported missing."""
    model = _partitioned()
    model.save_pretrained(tmp_path)
    from pad_moe_transformers.checkpoint import load as load_module

    def refuse(*args, **kwargs):
        raise AssertionError("a dense form of the experts was built while loading")

    monkeypatch.setattr(load_module, "decode_compact", refuse)
    monkeypatch.setattr(PADWeight, "compact_storage_", refuse)
    loaded, info = AutoModelForSequenceClassification.from_pretrained(tmp_path, dtype=dtype, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    for a, b in zip(_pad_weights(model), _pad_weights(loaded)):
        assert b.storage == "compact" and b.expert_values.dtype == dtype and b.mask.dtype == torch.bool
        assert torch.equal(a.mask, b.mask)
        assert torch.equal(a.expert_values.to(dtype), b.expert_values)
        assert torch.equal(a.static_values.to(dtype), b.static_values)
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}


def test_repartition_of_a_compact_model():
    model = _partitioned(ratio=0.5)
    result = pmt.partition_model(model, _batches(), dynamic_ratio=0.3, num_batches=2, progress=False, overwrite=True)
    assert {m.storage for m in _pad_weights(model)} == {"compact"}
    for name, layer in zip(result.masks, _pad_weights(model)):
        assert torch.equal(layer.mask, result.masks[name])
        assert layer.expert_values.shape[1] == int(result.masks[name].sum())


def _train(tmp_path, model, callbacks, steps: int = 4):
    args = _args(tmp_path, max_steps=steps, learning_rate=1e-3, optim="adamw_torch")
    trainer = Trainer(model=model, args=args, train_dataset=_PairDataset(), callbacks=callbacks)
    trainer.train()
    return trainer


def test_callback_rebinds_the_trainers_optimizer(tmp_path):
    """Partitioning inside `Trainer.train()` (after the optimizer exists) trains exactly as partitioning first."""
    inside = _tiny_model(seed=0)
    callback = pmt.IMPTrainerCallback(dynamic_ratio=0.4, num_batches=2, rounds=2, progress=False)
    trainer = _train(tmp_path / "inside", inside, [callback])
    assert {m.storage for m in _pad_weights(inside)} == {"compact"}
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in inside.parameters() if p.requires_grad}

    first = _tiny_model(seed=0)
    # the batches the callback took: the Trainer's first two, from the same seeded sampler
    pmt.partition_model(
        first, callback_batches(tmp_path / "probe"), dynamic_ratio=0.4, num_batches=2, rounds=2, progress=False, seed=0
    )
    _train(tmp_path / "first", first, [])
    for (name, a), b in zip(inside.named_parameters(), first.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def callback_batches(tmp_path):
    """The first two batches of a Trainer's train dataloader with the settings `_train` uses."""
    trainer = Trainer(
        model=_tiny_model(seed=0), args=_args(tmp_path, max_steps=4, optim="adamw_torch"), train_dataset=_PairDataset()
    )
    loader = iter(trainer.get_train_dataloader())
    return [next(loader) for _ in range(2)]


def test_a_stale_optimizer_is_refused(tmp_path, monkeypatch):
    """Without the re-binding the optimizer would step tensors the model no longer reads: that is an error."""
    monkeypatch.setattr("pad_moe_transformers.callbacks.rebind_optimizer", lambda optimizer, replaced: 0)
    callback = pmt.IMPTrainerCallback(dynamic_ratio=0.4, num_batches=2, rounds=2, progress=False)
    with pytest.raises(RuntimeError, match="no longer has"):
        _train(tmp_path, _tiny_model(seed=0), [callback])


def test_rebind_refuses_an_optimizer_that_has_stepped():
    model = _tiny_model(seed=0)
    before = optimizer_module.dense_parameters(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(**_batches(n=1)[0]).loss.backward()
    optimizer.step()
    pmt.partition_model(model, _batches(), dynamic_ratio=0.4, num_batches=2, progress=False)
    with pytest.raises(RuntimeError, match="already holds state"):
        optimizer_module.rebind_optimizer(optimizer, optimizer_module.storage_replacements(before))


def test_resumed_optimizer_state_of_another_storage_is_refused(tmp_path):
    model = _partitioned()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(**_batches(n=1)[0]).loss.backward()
    optimizer.step()
    state = optimizer.state_dict()
    dense = _partitioned(compact=False)  # same parameter count, other shapes
    other = torch.optim.AdamW(dense.parameters(), lr=1e-3)
    other.load_state_dict(state)
    with pytest.raises(RuntimeError, match="saved for another storage"):
        optimizer_module.check_optimizer_bound(dense, other)


def test_gradient_checkpointing_with_compact_storage():
    model = _partitioned()
    reference = copy.deepcopy(model)
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    batch = _batches(n=1, seed=5)[0]
    for m in (model, reference):
        m.train()  # checkpointing is active in train mode; the recomputation replays the dropout RNG
        torch.manual_seed(4)
        m(**batch).loss.backward()
    # Transformers 5.25 renames the flag (is_gradient_checkpointing warns there); 5.23 has only the old name
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    for name, grad in _grads(reference).items():
        torch.testing.assert_close(_grads(model)[name], grad, msg=name)


def test_checkpoint_files_name_the_compact_values(tmp_path):
    model = _partitioned()
    model.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(os.path.join(tmp_path, "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert not any(k.endswith(("expert_weight", "static_weight")) for k in keys)
    assert sum(k.endswith("mask_packed") for k in keys) == len(_pad_weights(model))


@pytest.mark.filterwarnings("ignore:`export_memory_timeline` is deprecated:FutureWarning")
def test_training_step_peak_memory_follows_the_stored_entries(tmp_path):
    """Live tensor bytes of an AdamW step (torch's memory timeline): compact storage at kappa 0.1 keeps gradients and
    both moments for the entries eq. 4 reads only, so its peak is below the dense layout's (same model, same masks).
    The figures for the MiniLM: `benchmarks/cost/train_cost.py`."""
    from test_partition_cost import traced_peak_bytes

    batch = _batches(n=1)[0]
    peaks = {}
    for compact in (False, True):
        model = _partitioned(compact=compact, ratio=0.1)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step(model=model, optimizer=optimizer):
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()  # the moments exist from here on: the second step's peak is the steady state
        peaks[compact] = traced_peak_bytes(lambda step=step: step, tmp_path)
    pad_bytes = sum(
        4 * (m.num_experts * m.mask.numel() + m.mask.numel()) for m in _pad_weights(_partitioned(compact=False))
    )
    # At kappa 0.1 the dense layout keeps most of its PAD weights, their gradients and both moments for nothing:
    # the saving exceeds one whole copy of the dense PAD weights (measured: 462 kB dense, 386 kB compact, 41 kB).
    assert peaks[True] < peaks[False] - pad_bytes, (peaks, pad_bytes)


@pytest.mark.parametrize("granularity", ["element", "neuron"])
def test_bf16_autocast_forms_eq4_in_bf16_with_the_same_values(granularity):
    """Under autocast a compact layer forms eq. 4 in bf16 directly (no fp32 weights written, then cast): the same
    bf16 weights as the dense layout's fp32 eq. 4 cast to bf16, so the same outputs; the gradients differ at most
    by the order of the fp32 sum over the experts (the static term's)."""
    dense = _partitioned(granularity, compact=False)
    compact = _partitioned(granularity, compact=True)
    batch = _batches(n=1)[0]
    losses = []
    for model in (dense, compact):
        model.train()
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        losses.append(loss.detach())
    assert torch.equal(losses[0], losses[1])
    expected, got = _grads(dense), _grads(compact)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)
    if granularity == "element":
        linear = next(m for m in _pad_weights(compact) if isinstance(m, PADExpertLinear))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert linear.effective_weight(dtype=torch.bfloat16).dtype == torch.bfloat16
            with torch.no_grad():  # not training: the stored / full-precision weights
                assert linear.effective_weight(dtype=torch.bfloat16).dtype == torch.float32
