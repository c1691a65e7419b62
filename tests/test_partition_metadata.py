"""What `config.partition` records is what the masks are: every partition passes
`verify_partition_metadata`, every contradiction raises, re-partitioning records the new masks."""

from __future__ import annotations

import json

import pytest
import torch
from test_partition import _batches, _tiny_model, pad_linears

from pad_moe_transformers.partition import apply_partition, partition_model, verify_partition_metadata


def _partitioned(method: str = "random", granularity: str = "element", ratio: float = 0.3):
    kwargs = {"partition_granularity": "neuron", "inter": 31} if granularity == "neuron" else {}
    model = _tiny_model(**kwargs)
    partition_model(model, _batches(), method=method, dynamic_ratio=ratio, rounds=2, progress=False)
    return model


@pytest.mark.parametrize(
    "method, granularity",
    [("imp", "element"), ("mp", "element"), ("random", "element"), ("moe_p", "element"),
     ("imp", "neuron"), ("mp", "neuron"), ("random", "neuron")],
)
def test_every_partition_records_its_masks(method, granularity):
    model = _partitioned(method, granularity)
    verify_partition_metadata(model)
    meta = model.config.partition
    assert meta["method"] == method and meta["granularity"] == granularity
    assert meta["achieved_dynamic_ratio"] == {n: lin.dynamic_ratio() for n, lin in pad_linears(model).items()}
    if method != "moe_p":
        assert abs(meta["achieved_dynamic_ratio_total"] - 0.3) < 0.02
    json.dumps(model.config.to_dict())


def _raises(model, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        verify_partition_metadata(model)


def test_each_contradiction_raises_and_names_it():
    model = _partitioned()
    meta = dict(model.config.partition)

    edited = {**meta["achieved_dynamic_ratio"], "layer.0.fc_in": 0.5}
    model.config.partition = {**meta, "achieved_dynamic_ratio": edited}
    _raises(model, r"achieved_dynamic_ratio\['layer\.0\.fc_in'\] is 0\.5 in config\.partition but 0\.3")
    model.config.partition = {**meta, "achieved_dynamic_ratio_total": 0.25}
    _raises(model, r"achieved_dynamic_ratio_total is 0\.25 in config\.partition")
    renamed = {f"x.{n}": r for n, r in meta["achieved_dynamic_ratio"].items()}
    model.config.partition = {**meta, "achieved_dynamic_ratio": renamed}
    _raises(model, r"achieved_dynamic_ratio names \['x\.layer\.0\.fc_in'.* but the model's units are \['layer\.0")

    model.config.partition, model.config.dynamic_ratio = {**meta, "target_dynamic_ratio": 0.9}, 0.9
    _raises(model, r"records target_dynamic_ratio=0\.9, but the masks are 0\.3\d* dynamic .*within 1\.95e-03")
    model.config.partition, model.config.dynamic_ratio = meta, 0.5
    _raises(model, r"config\.dynamic_ratio is 0\.5 but config\.partition\['target_dynamic_ratio'\] is 0\.3")
    model.config.dynamic_ratio = 0.3
    verify_partition_metadata(model)

    model.config.partition = None
    _raises(model, r"config\.partition is None .* of layer\.0\.fc_in, layer\.0\.fc_out, layer\.1\.fc_in, layer\.1")
    model.config.partition = meta
    with torch.no_grad():
        pad_linears(model)["layer.1.fc_out"].mask[0, 0] ^= True  # a hand edit after the partition
    _raises(model, r"achieved_dynamic_ratio\['layer\.1\.fc_out'\]")
    with torch.no_grad():
        pad_linears(model)["layer.1.fc_out"].mask[0, 0] ^= True
    model.config.partition = {**meta, "granularity": "neuron"}  # element masks are not neuron-structured
    _raises(model, r"records granularity 'neuron', but the masks are not neuron-structured")
    verify_partition_metadata(_tiny_model())  # never partitioned: None and all-dynamic masks agree


def test_neuron_and_moe_p_contradictions():
    model = _partitioned(granularity="neuron")
    meta = dict(model.config.partition)
    model.config.partition = {**meta, "dynamic_neurons": {**meta["dynamic_neurons"], "layer.1": 3}}
    _raises(model, r"dynamic_neurons\['layer\.1'\] is 3 in config\.partition")
    model.config.partition = meta
    with torch.no_grad():
        pad_linears(model)["layer.0.fc_in"].mask[0, :5] = ~pad_linears(model)["layer.0.fc_in"].mask[0, :5]
    _raises(model, r"granularity 'neuron', but the masks are not neuron-structured.*layer\.0")

    pruned = _partitioned("moe_p")
    linear = pad_linears(pruned)["layer.0.fc_in"]
    with torch.no_grad():
        linear.expert_weight[linear.expert_weight == 0] = 1e-3  # the pruned entries were trained
    _raises(pruned, r"MoE-P model with \d+ kept expert entries, but \d+ expert entries are non-zero")
    with torch.no_grad():
        linear.mask[0, 0] = False
    pruned.config.partition = {k: v for k, v in pruned.config.partition.items() if not k.startswith("achieved")}
    _raises(pruned, r"method 'moe_p' .* but some masks have static entries")


def test_repartition_records_what_the_masks_have():
    model = _partitioned("random", ratio=0.5)
    result = partition_model(model, _batches(), method="mp", dynamic_ratio=0.3, overwrite=True, progress=False)
    meta = model.config.partition
    assert meta["method"] == "mp" and meta["target_dynamic_ratio"] == model.config.dynamic_ratio == 0.3
    assert meta["achieved_dynamic_ratio"] == result.dynamic_ratios
    assert all(abs(r - 0.3) <= 1 / 512 for r in result.dynamic_ratios.values())
    verify_partition_metadata(model)

    masks = {n: lin.mask.clone() for n, lin in pad_linears(model).items()}
    with pytest.raises(ValueError, match=r"asks for 307 dynamic elements in layer\.0\.fc_in, but only 154 of 512"):
        partition_model(model, _batches(), method="random", dynamic_ratio=0.6, overwrite=True, progress=False)
    assert model.config.partition == meta and model.config.dynamic_ratio == 0.3
    assert all(torch.equal(masks[n], lin.mask) for n, lin in pad_linears(model).items())


def test_apply_partition_refuses_contradicting_metadata_and_changes_nothing():
    model = _tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masks = {n: torch.rand(lin.mask.shape) < 0.3 for n, lin in pad_linears(model).items()}
    with pytest.raises(ValueError, match=r"records target_dynamic_ratio=0\.7"):
        apply_partition(model, masks, {"method": "manual", "target_dynamic_ratio": 0.7})
    assert model.config.partition is None and model.config.dynamic_ratio == 0.5
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    apply_partition(model, masks, {"method": "manual"})
    verify_partition_metadata(model)
