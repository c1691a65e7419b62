"""`pad_moe_transformers.analysis`: the dynamic-property measures against a brute-force computation
that materialises every unit's computed weights."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import random_batch, tiny_base_configs
from test_partition import pad_linears
from transformers import BertForSequenceClassification

import pad_moe_transformers as pmt
from pad_moe_transformers.analysis import RunningMoments, dynamic_property, expert_gram
from pad_moe_transformers.partition import perturb_experts


def _pad_model(granularity: str = "element", perturb: float = 0.1) -> tuple:
    """A tiny dense BERT and its upcycled PAD model (4 experts, top-2), experts perturbed apart."""
    base = tiny_base_configs()["bert"]
    dense = BertForSequenceClassification(base).eval()
    config = pmt.PADMoEConfig.from_base(base, num_experts=4, num_experts_per_tok=2, num_labels=2,
                                        partition_granularity=granularity)
    model = pmt.PADMoEForSequenceClassification(config, base_model=copy.deepcopy(dense))
    if perturb:
        perturb_experts(model, relative_std=perturb)
    return dense, model.eval()


def _brute_force(model, batch, unit: str) -> list[tuple[float, float]]:
    """Per layer: (parameter variance, output variance) from explicitly formed per-unit weights."""
    records, hooks = {}, []
    for i, moe in enumerate(model.moe_layers):
        hooks.append(moe.router.register_forward_hook(lambda m, a, o, i=i: records.__setitem__(("r", i), o)))
        hooks.append(moe.register_forward_hook(lambda m, a, o, i=i: records.__setitem__(("y", i), o)))
    with torch.no_grad():
        model(**batch)
    for hook in hooks:
        hook.remove()
    mask = batch["attention_mask"].bool()
    flat = mask.reshape(-1)
    sample = flat.nonzero()[:, 0] // mask.shape[1]
    out = []
    for i, moe in enumerate(model.moe_layers):
        decision = records[("r", i)]
        pi = torch.zeros(decision.gates.shape[0], moe.num_experts, dtype=torch.float64)
        pi.scatter_(1, decision.experts, decision.gates.double())
        if pi.shape[0] == flat.numel():  # the router saw every token, padding included
            pi = pi[flat]
        y = records[("y", i)].reshape(flat.numel(), -1)[flat].double()
        if unit == "sample":
            pi = torch.stack([pi[sample == s].mean(0) for s in range(mask.shape[0])])
            y = torch.stack([y[sample == s].mean(0) for s in range(mask.shape[0])])
        total = numel = 0
        for linear in (moe.fc_in, moe.fc_out):
            weights = linear.effective_weight().detach().double()  # (E, out, in), eq. 4
            theta = torch.einsum("ue,eoi->uoi", pi, weights)  # every unit's computed weights
            total += theta.var(dim=0, unbiased=False).sum().item()
            numel += weights[0].numel()
        out.append((total / numel, y.var(dim=0, unbiased=False).mean().item()))
    return out


@pytest.mark.parametrize("unit", ["token", "sample"])
@pytest.mark.parametrize("granularity", ["element", "neuron"])
def test_matches_brute_force(unit, granularity):
    _, model = _pad_model(granularity)
    generator = torch.Generator().manual_seed(3)
    if granularity == "neuron":
        for moe in model.moe_layers:
            moe.set_neuron_mask(torch.rand(moe.fc_in.out_features, generator=generator) < 0.5)
    else:
        for linear in pad_linears(model).values():
            linear.mask.copy_(torch.rand(linear.mask.shape, generator=generator) < 0.5)
    for linear in pad_linears(model).values():
        with torch.no_grad():
            linear.scale_logit.fill_(0.4)  # l_d != 1
    batch = random_batch(batch=4, seq=9, pad_last=3)
    result = dynamic_property(model, [batch], unit=unit, progress=False)
    expected = _brute_force(model, batch, unit)
    assert len(result.layers) == len(expected) == 2
    for layer, (param_var, out_var) in zip(result.layers, expected):
        assert layer.moe and param_var > 0
        assert layer.parameter_variance == pytest.approx(param_var, rel=1e-5)
        assert layer.output_variance == pytest.approx(out_var, rel=1e-5)
        assert layer.units == (33 if unit == "token" else 4)
    for layer, moe in zip(result.layers, model.moe_layers):
        masks = [moe.fc_in.mask, moe.fc_out.mask]
        assert layer.dynamic_ratio == pytest.approx(sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks))


def test_batches_are_pooled_like_one_batch():
    _, model = _pad_model()
    a, b = random_batch(batch=2, seq=8, pad_last=2), random_batch(batch=3, seq=8, pad_last=0)
    split = dynamic_property(model, [a, b], progress=False)
    joined = dynamic_property(
        model, [{k: torch.cat([a[k], b[k]]) for k in a}], progress=False
    )
    for x, y in zip(split.layers, joined.layers):
        assert x.parameter_variance == pytest.approx(y.parameter_variance, rel=1e-6)
        assert x.output_variance == pytest.approx(y.output_variance, rel=1e-6)


def test_dense_and_upcycled_models_have_zero_parameter_variance():
    dense, model = _pad_model(perturb=0.0)
    batch = random_batch()
    for m in (dense, model):
        result = dynamic_property(m, [batch], progress=False)
        assert [layer.parameter_variance for layer in result.layers] == [0.0, 0.0]
        assert all(layer.output_variance > 0 for layer in result.layers)
    assert [layer.moe for layer in dynamic_property(dense, [batch], progress=False).layers] == [False, False]
    # Upcycled experts are copies: the Gram matrix of the centred experts is exactly zero.
    assert not expert_gram(model.moe_layers[0].fc_in).any()


def test_pad_static_entries_lower_the_parameter_variance():
    """Same routing (layer 0 sees the same inputs): making entries static can only remove variance."""
    _, model = _pad_model()
    batch = random_batch()
    moe_result = dynamic_property(model, [batch], progress=False)
    for linear in pad_linears(model).values():
        linear.mask[: linear.mask.shape[0] // 2] = False
    pad_result = dynamic_property(model, [batch], progress=False)
    assert 0 < pad_result.layers[0].parameter_variance < moe_result.layers[0].parameter_variance


def test_running_moments_match_torch():
    x = torch.randn(50, 4, dtype=torch.float64) * 3 + 100
    moments = RunningMoments(4, full=True)
    for chunk in (x[:7], x[7:8], x[8:]):
        moments.update(chunk)
    assert torch.allclose(moments.variance(), x.var(dim=0, unbiased=False))
    assert torch.allclose(moments.covariance(), torch.cov(x.T, correction=0))


def test_bad_arguments():
    dense, _ = _pad_model()
    with pytest.raises(ValueError, match="unit"):
        dynamic_property(dense, [random_batch()], unit="word")
    with pytest.raises(ValueError, match="at least one batch"):
        dynamic_property(dense, [])
    with pytest.raises(TypeError, match="supported family"):
        dynamic_property(torch.nn.Linear(2, 2), [random_batch()])
