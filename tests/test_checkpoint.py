"""Compact PAD checkpoints (issue #4): format, exact round trips, sharding, dtype, size, bad checkpoints, model card."""

from __future__ import annotations

import copy
import json
import os
import struct

import numpy as np
import pytest
import torch
from conftest import random_batch, tiny_base_configs
from huggingface_hub import ModelCard
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, PreTrainedModel

import pad_moe_transformers as pmt
from pad_moe_transformers import checkpoint as ckpt
from pad_moe_transformers.checkpoint import PADCheckpointError
from pad_moe_transformers.pad_linear import SCALE_FACTOR_NAMES

PREFIX0 = "model.bert.encoder.layer.0.intermediate.dense.fc_in."


# ----------------------------------------------------------------------------------------------- helpers
def make_model(base="bert", cls=pmt.PADMoEForSequenceClassification, kappa: float | None = 0.4, num_experts=4, **cfg):
    """A tiny PAD model whose experts differ; with `kappa`, a random partition as the partition code
    leaves it: mask set, experts zero where M = 0, static weight zero where M = 1, scales moved."""
    config = pmt.PADMoEConfig(base_config=tiny_base_configs()[base], num_experts=num_experts, **cfg)
    model = cls(config).eval()
    with torch.no_grad():
        for moe in model.moe_layers:
            moe.router.weight.normal_(0, 0.5)  # spread the routing so every expert gets tokens
            for linear in moe.pad_linears().values():
                linear.expert_weight.add_(0.05 * torch.randn_like(linear.expert_weight))
                if linear.expert_bias is not None:
                    linear.expert_bias.add_(0.05 * torch.randn_like(linear.expert_bias))
                if kappa is None:
                    continue
                mask = torch.rand(linear.mask.shape) < kappa
                linear.mask.copy_(mask)
                linear.expert_weight.mul_(mask)
                linear.static_weight.mul_(~mask)
                for name in SCALE_FACTOR_NAMES:  # the scale factors the mode has
                    if hasattr(linear, name):
                        getattr(linear, name).fill_(0.3)
    if kappa is not None:
        model.config.partition = {"method": "random", "dynamic_ratio": kappa}
    return model


def outputs(model, vocab_size=99):
    torch.manual_seed(1)
    batch = random_batch(vocab_size)
    with torch.no_grad():
        out = model(**batch)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


def dense_pad_storage(model):
    pmt.dense_pad_storage(model)
    return model


def assert_same_module(a, b):
    """Same tensors, whatever the storage of the PAD weights (a loaded partitioned model has compact storage; the
    dense form of its values is compared: zeros where eq. 4 reads nothing, as a partitioned dense layer holds)."""
    a, b = dense_pad_storage(copy.deepcopy(a)), dense_pad_storage(copy.deepcopy(b))
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


def read_dir(directory):
    tensors, metadata = {}, {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(directory, name), "pt") as f:
                metadata[name] = f.metadata()
                tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors, metadata


def rewrite(path, edit_tensors=None, edit_metadata=None):
    """Rewrite one safetensors file after editing its tensors / metadata in place."""
    tensors = load_file(path)
    with safe_open(path, "pt") as f:
        metadata = dict(f.metadata())
    if edit_tensors:
        edit_tensors(tensors)
    if edit_metadata:
        edit_metadata(metadata)
    save_file(tensors, path, metadata=metadata)


def header_bytes(path):
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


@pytest.fixture
def saved(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path)
    return model, tmp_path


# ----------------------------------------------------------------------------------------------- format
def test_mask_packing_is_numpy_little_bitorder():
    mask = torch.rand(7, 13) < 0.3
    packed = ckpt.pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.shape == ((7 * 13 + 7) // 8,)
    assert np.array_equal(packed.numpy(), np.packbits(mask.numpy().ravel(), bitorder="little"))
    assert torch.equal(ckpt.unpack_mask(packed, mask.numel()).view(7, 13), mask)


def test_compact_checkpoint_stores_only_used_entries(saved):
    model, path = saved
    assert sorted(os.listdir(path)) == ["README.md", "config.json", "model.safetensors"]
    tensors, metadata = read_dir(path)
    meta = metadata["model.safetensors"]
    assert meta[ckpt.METADATA_VERSION] == str(ckpt.FORMAT_VERSION) and meta[ckpt.METADATA_LAYOUT] == "compact"
    assert json.loads(meta[ckpt.METADATA_CONFIG])["num_experts"] == 4
    assert not any(k.endswith((".expert_weight", ".static_weight", ".mask")) for k in tensors)
    linears = ckpt.pad_linear_modules(model)
    assert set(json.loads(meta[ckpt.METADATA_LINEARS])) == {p[:-1] for p in linears}
    for prefix, linear in linears.items():
        mask = linear.mask
        nnz, numel = int(mask.sum()), mask.numel()
        packed = tensors[prefix + "mask_packed"]
        assert packed.dtype == torch.uint8 and packed.shape == ((numel + 7) // 8,)
        assert np.array_equal(packed.numpy(), np.packbits(mask.numpy().ravel(), bitorder="little"))
        assert torch.equal(tensors[prefix + "static_values"], linear.static_weight.detach()[~mask])
        values = tensors[prefix + "expert_values"]
        assert values.shape == (4, nnz)
        for e in range(4):
            assert torch.equal(values[e], linear.expert_weight.detach()[e][mask])
        assert torch.equal(tensors[prefix + "expert_bias"], linear.expert_bias.detach())
        stored_scale = tensors[prefix + "scale_logit"]  # 0-d in the file, (1,) in the model (FSDP needs 1-D)
        assert stored_scale.shape == () and linear.scale_logit.shape == (1,)
        assert torch.equal(stored_scale, linear.scale_logit.detach()[0]) and float(stored_scale) == pytest.approx(0.3)


def test_never_partitioned_model_saves_as_plain_moe(tmp_path):
    model = make_model(kappa=None)
    model.save_pretrained(tmp_path)
    tensors, metadata = read_dir(tmp_path)
    assert metadata["model.safetensors"][ckpt.METADATA_LAYOUT] == "moe"
    assert not any(k.endswith((".mask_packed", ".static_values", ".static_weight", ".mask")) for k in tensors)
    assert tensors[PREFIX0 + "expert_weight"].shape == (4, 48, 32)
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert torch.equal(outputs(model), outputs(again))
    for a, b in zip(ckpt.pad_linear_modules(model).values(), ckpt.pad_linear_modules(again).values()):
        assert bool(b.mask.all()) and torch.equal(a.expert_weight, b.expert_weight)
        # The unused static weight is rebuilt as the experts' mean.
        torch.testing.assert_close(b.static_weight, a.expert_weight.mean(0))


def test_fresh_upcycled_moe_keeps_static_weight_exactly(tmp_path):
    model = pmt.PADMoEModel(pmt.PADMoEConfig(base_config=tiny_base_configs()["bert"], num_experts=3))
    model.save_pretrained(tmp_path)
    again = pmt.PADMoEModel.from_pretrained(tmp_path)
    assert_same_module(model, again)  # experts all equal -> static weight = the dense weight, bit for bit


# ----------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("base", sorted(tiny_base_configs()))
def test_round_trip_is_exact_on_every_family(base, tmp_path):
    model = make_model(base)
    model.save_pretrained(tmp_path)
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert type(again) is pmt.PADMoEForSequenceClassification and not again.training
    assert_same_module(model, again)
    assert torch.equal(outputs(model), outputs(again))
    assert again.config.is_partitioned and again.config.partition == model.config.partition


def test_round_trip_tied_weights_masked_lm(tmp_path):
    model = make_model("roberta", cls=pmt.PADMoEForMaskedLM)
    model.save_pretrained(tmp_path)
    tensors, _ = read_dir(tmp_path)
    assert "model.lm_head.decoder.weight" not in tensors  # tied to the word embeddings, stored once
    again = AutoModelForMaskedLM.from_pretrained(tmp_path)
    assert again.model.lm_head.decoder.weight is again.model.roberta.embeddings.word_embeddings.weight
    assert_same_module(model, again)
    assert torch.equal(outputs(model), outputs(again))


def test_round_trip_neuron_granularity(tmp_path):
    model = make_model(kappa=None, partition_granularity="neuron")
    with torch.no_grad():
        for moe in model.moe_layers:
            moe.fc_in.static_bias.normal_()
            moe.set_neuron_mask(torch.rand(48) < 0.5)
            for linear in moe.pad_linears().values():
                linear.expert_weight.mul_(linear.mask)
                linear.static_weight.mul_(~linear.mask)
    model.config.partition = {"method": "random", "granularity": "neuron"}
    model.save_pretrained(tmp_path)
    tensors, _ = read_dir(tmp_path)
    assert PREFIX0 + "static_bias" in tensors and PREFIX0 + "mask_packed" in tensors
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert again.moe_layers[0].partition_granularity == "neuron"
    assert_same_module(model, again)
    assert torch.equal(outputs(model), outputs(again))
    edit_config(tmp_path, partition_granularity="element")
    with pytest.raises(PADCheckpointError, match="'partition_granularity'"):
        load(tmp_path)


def test_saving_twice_gives_identical_bytes(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path / "a")
    model.save_pretrained(tmp_path / "b")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_pad_class_from_pretrained_and_loading_info(saved):
    model, path = saved
    again, info = pmt.PADMoEForSequenceClassification.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert torch.equal(outputs(model), outputs(again))
    assert again.expert_usage()[0] != [] and sum(again.expert_usage()[0]) > 0  # counts start clean, then count
    fresh = pmt.PADMoEForSequenceClassification.from_pretrained(path)
    assert all(c == 0 for counts in fresh.expert_usage().values() for c in counts)


def test_training_continues_identically(saved):
    model, path = saved
    again = AutoModelForSequenceClassification.from_pretrained(path)
    labels = torch.tensor([0, 1, 1])
    for m in (model, again):
        m.train()
        torch.manual_seed(3)
        optimizer = torch.optim.AdamW(m.parameters(), lr=1e-2)
        for _ in range(2):
            optimizer.zero_grad()
            m(**random_batch(), labels=labels).loss.backward()
            optimizer.step()
    linear = ckpt.pad_linear_modules(model)[PREFIX0]
    assert linear.static_weight.grad[linear.mask].abs().sum() == 0  # eq. 4 gradients masked in dense storage
    assert ckpt.pad_linear_modules(again)[PREFIX0].storage == "compact"  # loaded: only what eq. 4 reads
    assert_same_module(model, again)  # dense and compact storage trained to the same values


def test_bfloat16_loading(saved, tmp_path):
    model, path = saved
    bf16 = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.bfloat16)
    assert bf16.moe_layers[0].fc_in.expert_values.dtype == torch.bfloat16
    assert bf16.moe_layers[0].fc_in.mask.dtype == torch.bool
    reference = copy.deepcopy(model).to(torch.bfloat16)  # the same weights cast in memory ...
    for moe_ref, moe in zip(reference.moe_layers, model.moe_layers):  # ... except the routers, kept in fp32
        moe_ref.router.float().weight.data.copy_(moe.router.weight)
    assert bf16.moe_layers[0].router.weight.dtype == torch.float32
    assert_same_module(reference, bf16)
    assert torch.equal(outputs(reference), outputs(bf16))
    # A bf16 model saves bf16 values and loads back as bf16 by default (dtype "auto" = config.dtype).
    bf16.save_pretrained(tmp_path / "bf16")
    tensors, _ = read_dir(tmp_path / "bf16")
    assert tensors[PREFIX0 + "expert_values"].dtype == torch.bfloat16
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "bf16")
    assert_same_module(bf16, again)


def test_sharded_save_and_load(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path)  # first a single file, then shards into the same directory
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    files = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
    assert len(files) > 2 and "model.safetensors" not in files  # the stale single file is gone
    with open(tmp_path / ckpt.WEIGHTS_INDEX_NAME) as f:
        index = json.load(f)
    assert index["metadata"][ckpt.METADATA_VERSION] == "1"
    tensors, metadata = read_dir(tmp_path)
    assert set(index["weight_map"]) == set(tensors)
    for prefix in ckpt.pad_linear_modules(model):  # one PAD linear never straddles two shards
        assert len({index["weight_map"][k] for k in tensors if k.startswith(prefix)}) == 1
    assert all(m[ckpt.METADATA_LAYOUT] == "compact" for m in metadata.values())
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert_same_module(model, again)
    assert torch.equal(outputs(model), outputs(again))


def test_load_state_dict_accepts_checkpoint_tensors(saved):
    """What Trainer does on resume: `load_file` + `model.load_state_dict` (here strict)."""
    model, path = saved
    fresh = make_model(kappa=None)
    fresh.load_state_dict(load_file(path / "model.safetensors"))
    assert_same_module(model, fresh)


def test_trainer_style_state_dict_argument(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path, state_dict=model.state_dict())
    assert torch.equal(outputs(model), outputs(AutoModelForSequenceClassification.from_pretrained(tmp_path)))


# ----------------------------------------------------------------------------------------------- scale factors
# `(1,)` parameters in the model (FSDP1/FSDP2 refuse 0-d ones), 0-d tensors in the files (format version 1).
LEGACY = os.path.join(os.path.dirname(__file__), "data", "legacy_0d_scales")
SCALE_MODES = ["sum2", "static_only", "dynamic_only", "free"]


def header_shapes(path):
    with open(path, "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def scale_keys(model):
    return [
        prefix + name
        for prefix, linear in ckpt.pad_linear_modules(model).items()
        for name in SCALE_FACTOR_NAMES
        if hasattr(linear, name)
    ]


@pytest.mark.parametrize("kappa", [0.4, None], ids=["compact", "moe"])
@pytest.mark.parametrize("mode", SCALE_MODES)
def test_scale_factors_are_stored_0d(tmp_path, mode, kappa):
    model = make_model(kappa=kappa, scale_factor_mode=mode)
    keys = scale_keys(model)
    assert keys and all(model.get_parameter(k).shape == (1,) for k in keys)
    model.save_pretrained(tmp_path, max_shard_size="20KB")  # shards too
    shapes = {}
    for name in os.listdir(tmp_path):
        if name.endswith(".safetensors"):
            shapes.update(header_shapes(tmp_path / name))
    assert {k: shapes[k] for k in keys} == dict.fromkeys(keys, [])
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    for key in keys:
        assert again.get_parameter(key).shape == (1,) and torch.equal(
            again.get_parameter(key), model.get_parameter(key)
        )
    if kappa is not None:  # the moe layout rebuilds the unused static weight
        assert_same_module(model, again)
    assert torch.equal(outputs(model), outputs(again))


@pytest.mark.parametrize("name", ["sum2_compact", "free_moe"])
def test_checkpoints_of_0d_parameters_load_and_resave_byte_identically(tmp_path, name):
    """Files written by the code whose scale factors were 0-d parameters (commit a322b30, `model_card=False`):
    they load into the `(1,)` parameters, and saving the loaded model writes the same bytes."""
    legacy = os.path.join(LEGACY, name)
    model = AutoModelForSequenceClassification.from_pretrained(legacy)
    stored = load_file(os.path.join(legacy, "model.safetensors"))
    keys = scale_keys(model)
    assert len(keys) == (2 if name.startswith("sum2") else 4)
    for key in keys:
        assert stored[key].shape == () and model.get_parameter(key).shape == (1,)
        assert torch.equal(model.get_parameter(key).detach()[0], stored[key])
    model.save_pretrained(tmp_path, model_card=False)
    assert (tmp_path / "model.safetensors").read_bytes() == open(os.path.join(legacy, "model.safetensors"), "rb").read()
    fresh = AutoModelForSequenceClassification.from_config(model.config)
    fresh.load_state_dict(stored)  # what Trainer's resume does with such a file
    assert_same_module(model, fresh)


@pytest.mark.parametrize("mode", SCALE_MODES)
def test_state_dict_with_0d_scale_factors_loads(mode):
    """A state dict of the earlier 0-d parameters: `load_state_dict` reshapes them; outputs are identical."""
    model = make_model(scale_factor_mode=mode)
    old = {k: (v.reshape(()) if k in scale_keys(model) else v) for k, v in model.state_dict().items()}
    assert sum(v.dim() == 0 for v in old.values()) == len(scale_keys(model)) > 0
    torch.manual_seed(5)
    fresh = make_model(scale_factor_mode=mode)
    for key in scale_keys(fresh):
        fresh.get_parameter(key).data.fill_(-1.0)
    fresh.load_state_dict(old)
    assert_same_module(model, fresh)
    assert torch.equal(outputs(model), outputs(fresh))


def test_stored_scale_factor_shapes(saved):
    """A `(1,)` scale factor in a file loads too; any other shape is refused."""
    model, path = saved
    rewrite(
        path / "model.safetensors", lambda t: t.update({PREFIX0 + "scale_logit": t[PREFIX0 + "scale_logit"].reshape(1)})
    )
    assert header_shapes(path / "model.safetensors")[PREFIX0 + "scale_logit"] == [1]
    assert_same_module(model, load(path))
    rewrite(path / "model.safetensors", lambda t: t.update({PREFIX0 + "scale_logit": torch.zeros(2)}))
    with pytest.raises(
        PADCheckpointError, match=r"fc_in\.scale_logit' has shape \[2\]; a scale factor is stored as \[\]"
    ):
        load(path)


# ----------------------------------------------------------------------------------------------- size
def test_file_size_matches_theory(tmp_path):
    bert = tiny_base_configs()["bert"]
    bert.hidden_size, bert.intermediate_size = 128, 512
    config = pmt.PADMoEConfig(base_config=bert, num_experts=4)
    model = pmt.PADMoEForSequenceClassification(config)
    with torch.no_grad():
        for linear in ckpt.pad_linear_modules(model).values():
            mask = torch.rand(linear.mask.shape) < 0.3
            linear.mask.copy_(mask)
    model.config.partition = {"method": "random"}
    model.save_pretrained(tmp_path)
    theory = ckpt.theoretical_checkpoint_size(model)
    file = tmp_path / "model.safetensors"
    assert os.path.getsize(file) - header_bytes(file) == theory["total_bytes"]  # payload: exactly the theory
    assert abs(os.path.getsize(file) / theory["total_bytes"] - 1) < 0.01  # with the header: within 1%
    report = model.parameter_report()
    assert theory["stored_values"] == report.total  # the paper's count is what is stored
    moe = make_model(kappa=None)
    moe_theory = ckpt.theoretical_checkpoint_size(moe)
    assert moe_theory["layout"] == "moe" and moe_theory["mask_bytes"] == 0


# ----------------------------------------------------------------------------------------------- bad checkpoints
def load(path):
    return AutoModelForSequenceClassification.from_pretrained(path)


def test_truncated_file_is_refused(saved):
    _, path = saved
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:-100])
    with pytest.raises(PADCheckpointError, match=r"model\.safetensors is truncated"):
        load(path)
    file.write_bytes(data[:5])
    with pytest.raises(PADCheckpointError, match=r"model\.safetensors is truncated"):
        load(path)


def test_mask_bit_count_must_match_values(saved):
    _, path = saved

    def flip_one_bit(t):
        t[PREFIX0 + "mask_packed"][0] ^= 1

    rewrite(path / "model.safetensors", flip_one_bit)
    with pytest.raises(
        PADCheckpointError, match=r"fc_in\.expert_values stores \d+ values .*fc_in\.mask_packed has \d+ set bits"
    ):
        load(path)


def test_mask_padding_bits_must_be_zero(tmp_path):
    bert = tiny_base_configs()["bert"]
    bert.hidden_size, bert.num_attention_heads, bert.intermediate_size = 30, 2, 45  # 1350 entries: 2 padding bits
    config = pmt.PADMoEConfig(base_config=bert, num_experts=2, partition={"method": "random"})
    model = pmt.PADMoEForSequenceClassification(config)
    with torch.no_grad():
        model.moe_layers[0].fc_in.mask.copy_(torch.rand(45, 30) < 0.5)
    model.save_pretrained(tmp_path)
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    # Entries outside their mode are not stored (they load as zeros); eq. 4 never reads them.
    assert torch.equal(outputs(model), outputs(again))
    assert torch.equal(model.moe_layers[0].fc_in.mask, again.moe_layers[0].fc_in.mask)

    def set_padding_bit(t):
        t[PREFIX0 + "mask_packed"][-1] |= 0x80

    rewrite(tmp_path / "model.safetensors", set_padding_bit)
    with pytest.raises(PADCheckpointError, match=r"fc_in\.mask_packed' has bits set past the 1350 mask entries"):
        load(tmp_path)


def test_wrong_shape_outside_the_pad_layers_is_handled_as_transformers_does(saved):
    """A non-PAD tensor of the wrong shape: refused unless `ignore_mismatched_sizes=True`, as for a plain BERT."""
    _, path = saved
    rewrite(path / "model.safetensors", lambda t: t.update({"model.classifier.weight": torch.zeros(3, 32)}))
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        load(path)
    model, info = AutoModelForSequenceClassification.from_pretrained(
        path, ignore_mismatched_sizes=True, output_loading_info=True
    )
    assert [key for key, *_ in info["mismatched_keys"]] == ["model.classifier.weight"]


def test_wrong_packed_mask_shape_is_refused(saved):
    _, path = saved
    rewrite(
        path / "model.safetensors",
        lambda t: t.update({PREFIX0 + "mask_packed": t[PREFIX0 + "mask_packed"][:-1].clone()}),
    )
    with pytest.raises(PADCheckpointError, match=r"fc_in\.mask_packed' has shape"):
        load(path)


@pytest.mark.parametrize("key", [PREFIX0 + "static_values", PREFIX0 + "mask_packed", PREFIX0 + "scale_logit"])
def test_missing_tensor_is_refused(saved, key):
    _, path = saved
    rewrite(path / "model.safetensors", lambda t: t.pop(key))
    with pytest.raises(PADCheckpointError, match="Missing tensor '" + key.replace(".", r"\.") + "'"):
        load(path)


def test_missing_tensor_outside_the_pad_layers_is_reported_as_transformers_does(saved):
    _, path = saved
    rewrite(path / "model.safetensors", lambda t: t.pop("model.bert.embeddings.LayerNorm.weight"))
    _, info = AutoModelForSequenceClassification.from_pretrained(path, output_loading_info=True)
    assert "model.bert.embeddings.LayerNorm.weight" in info["missing_keys"]


def test_unexpected_and_dense_tensors_are_refused(saved):
    _, path = saved
    rewrite(path / "model.safetensors", lambda t: t.update({PREFIX0 + "expert_weight": torch.zeros(4, 48, 32)}))
    with pytest.raises(PADCheckpointError, match=r"Unexpected tensor.*fc_in\.expert_weight"):
        load(path)


def test_future_format_version_is_refused(saved):
    _, path = saved
    rewrite(path / "model.safetensors", edit_metadata=lambda m: m.update({ckpt.METADATA_VERSION: "2"}))
    with pytest.raises(PADCheckpointError, match=r"pad_moe\.format_version=2 is newer .* Upgrade"):
        load(path)


def test_checkpoint_written_by_transformers_own_writer_loads(tmp_path):
    """The fallback of `save_pretrained` (PEFT / distributed / quantized) is Transformers' own writer: no PAD
    metadata. Transformers' loader reads it back exactly, as it would for a plain model."""
    model = make_model()
    PreTrainedModel.save_pretrained(model, tmp_path)
    assert not any(k.startswith("pad_moe.") for k in read_dir(tmp_path)[1]["model.safetensors"])
    again = load(tmp_path)
    assert_same_module(model, again)
    assert torch.equal(outputs(model), outputs(again))


def edit_config(path, **changes):
    with open(path / "config.json") as f:
        config = json.load(f)
    for key, value in changes.items():
        target = config
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    with open(path / "config.json", "w") as f:
        json.dump(config, f)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_experts": 2}, r"Config field 'num_experts' .* has 2, the tensors were written with 4"),
        ({"moe_layers": [1]}, r"Config field 'moe_layers'"),
        ({"scale_factor_mode": "free"}, r"Config field 'scale_factor_mode'"),
        ({"partition": None}, r"Config field 'partition'"),
        ({"base_config.intermediate_size": 40}, r"saved with weight shape \[48, 32\] but the config builds \[40, 32\]"),
    ],
)
def test_config_that_does_not_match_the_tensors(saved, change, message):
    _, path = saved
    edit_config(path, **change)
    with pytest.raises(PADCheckpointError, match=message):
        load(path)


def test_config_mismatch_without_metadata_hint_names_tensor(saved):
    """Even with a consistent-looking fingerprint, the tensor shapes are checked against the config."""
    _, path = saved
    edit_config(path, num_experts=2)
    rewrite(
        path / "model.safetensors",
        edit_metadata=lambda m: m.update(
            {ckpt.METADATA_CONFIG: m[ckpt.METADATA_CONFIG].replace('"num_experts": 4', '"num_experts": 2')}
        ),
    )
    with pytest.raises(PADCheckpointError, match=r"holds 4 experts but config field 'num_experts' is 2"):
        load(path)


def test_moe_layout_with_partitioned_config_is_refused(tmp_path):
    make_model(kappa=None).save_pretrained(tmp_path)
    edit_config(tmp_path, partition={"method": "random"})
    with pytest.raises(PADCheckpointError, match=r"'partition'"):
        load(tmp_path)


def test_sharded_index_inconsistencies(tmp_path):
    make_model().save_pretrained(tmp_path, max_shard_size="20KB")
    index_path = tmp_path / ckpt.WEIGHTS_INDEX_NAME
    index = json.loads(index_path.read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    broken = dict(index, weight_map=dict(index["weight_map"], **{"model.extra.weight": first}))
    index_path.write_text(json.dumps(broken))
    with pytest.raises(PADCheckpointError, match=r"index lists tensor 'model\.extra\.weight'"):
        load(tmp_path)
    index_path.write_text(json.dumps(index))
    shard = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))[-1]
    os.remove(tmp_path / shard)
    with pytest.raises(PADCheckpointError, match=rf"Shard file '{shard}'"):
        load(tmp_path)


def test_pickle_checkpoints_are_never_loaded(tmp_path):
    make_model().save_pretrained(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04 this would be unpickled by torch.load")
    with pytest.raises(PADCheckpointError, match=r"pytorch_model\.bin \(a pickle file\).*safetensors only"):
        load(tmp_path)
    with pytest.raises(PADCheckpointError, match="safetensors only"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path, use_safetensors=False)


def test_partial_compact_group_in_load_state_dict_is_refused(saved):
    model, path = saved
    tensors = load_file(path / "model.safetensors")
    del tensors[PREFIX0 + "expert_values"]
    with pytest.raises(RuntimeError, match=r"lacks .*fc_in\.expert_values"):
        model.load_state_dict(tensors, strict=False)


# ----------------------------------------------------------------------------------------------- model card
def test_model_card_metadata_and_body(tmp_path):
    model = make_model()
    model.config.base_config._name_or_path = "google-bert/bert-base-uncased"
    (tmp_path / "eval_results.json").write_text(json.dumps({"eval_accuracy": 0.875, "eval_runtime": 1.5, "epoch": 3.0}))
    model.save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == "google-bert/bert-base-uncased"
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-classification"
    assert {"pad-net", "mixture-of-experts", "bert"} <= set(card.data.tags)
    report = model.parameter_report()
    text = card.text
    assert "| Experts per MoE layer | 4 |" in text and "| Experts per token (top-k) | 2 |" in text
    assert "| Dynamic ratio kappa (target) | 0.5 |" in text
    assert f"{report.total:,}" in text and f"{report.moe_equivalent:,}" in text
    assert f"{report.dynamic:,}" in text and f"{report.static:,}" in text
    l_s, l_d = (float(x.detach()) for x in model.moe_layers[1].fc_out.scale_factors())
    row = next(r for r in report.layers if r.layer == 1 and r.linear == "fc_out")
    assert (
        f"| 1 | fc_out | {row.dynamic_ratio:.4f} | {row.dynamic:,} | {row.static:,} | {l_s:.4f} | {l_d:.4f} |" in text
    )
    assert "| eval_accuracy | 0.8750 |" in text and "eval_runtime" not in text
    model.config.base_config._name_or_path = str(tmp_path)  # a local directory is not a hub id
    assert pmt.build_model_card(model).data.base_model is None


def test_model_card_reads_the_scale_factors_of_the_given_state_dict(tmp_path):
    """`save_pretrained(state_dict=...)` (the FSDP save, where the module's own parameters are shards) writes
    the scale factors of that state dict into the card, as it does into the weights."""
    model = make_model(scale_factor_mode="free")
    state = model.state_dict()
    key = "model.bert.encoder.layer.1.intermediate.dense.fc_out."
    state[key + "lambda_static"], state[key + "lambda_dynamic"] = torch.tensor([0.25]), torch.tensor(1.75)  # (1,), 0-d
    model.save_pretrained(tmp_path, state_dict=state)
    row = next(r for r in model.parameter_report().layers if r.layer == 1 and r.linear == "fc_out")
    expected = f"| 1 | fc_out | {row.dynamic_ratio:.4f} | {row.dynamic:,} | {row.static:,} | 0.2500 | 1.7500 |"
    assert expected in ModelCard.load(tmp_path / "README.md").text
    assert model.moe_layers[1].fc_out.lambda_static.item() == pytest.approx(0.3)  # the module is unchanged
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert [float(x.detach()) for x in again.moe_layers[1].fc_out.scale_factors()] == [0.25, 1.75]


def test_model_card_options(tmp_path):
    model = make_model(kappa=None)
    model.save_pretrained(tmp_path, base_model="org/dense", eval_results={"glue/sst2": {"accuracy": 0.9}}, tags=["x"])
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == "org/dense" and "x" in card.data.tags
    assert "not been partitioned" in card.text and "| glue/sst2 / accuracy | 0.9000 |" in card.text
    (tmp_path / "README.md").write_text("my own card")  # a hand-written card is kept
    model.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == "my own card"
    model.save_pretrained(tmp_path / "nocard", model_card=False)
    assert not (tmp_path / "nocard" / "README.md").exists()


def test_documented_numpy_rebuild(saved):
    """The recipe of docs/checkpoint_format.md, without this package."""
    model, path = saved
    with safe_open(str(path / "model.safetensors"), "np") as f:
        shapes = json.loads(f.metadata()["pad_moe.linears"])
        assert shapes
        for prefix, (out, inn) in shapes.items():
            numel = out * inn
            mask = np.unpackbits(f.get_tensor(prefix + ".mask_packed"), bitorder="little")[:numel].astype(bool)
            experts = f.get_tensor(prefix + ".expert_values")
            static_values = f.get_tensor(prefix + ".static_values")
            expert_weight = np.zeros((experts.shape[0], numel), experts.dtype)
            expert_weight[:, mask] = experts
            static_weight = np.zeros(numel, static_values.dtype)
            static_weight[~mask] = static_values
            linear = model.get_submodule(prefix)
            assert np.array_equal(expert_weight.reshape(-1, out, inn), linear.expert_weight.detach().numpy())
            assert np.array_equal(static_weight.reshape(out, inn), linear.static_weight.detach().numpy())
            assert np.array_equal(mask.reshape(out, inn), linear.mask.numpy())


def test_package_exports():
    assert pmt.CHECKPOINT_FORMAT_VERSION == ckpt.FORMAT_VERSION
    assert pmt.PADCheckpointError is PADCheckpointError and issubclass(PADCheckpointError, ValueError)


def test_trainer_checkpoints_are_compact_and_resume(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = make_model()
    torch.manual_seed(0)
    data = [
        {"input_ids": torch.randint(5, 99, (8,)), "attention_mask": torch.ones(8, dtype=torch.long), "labels": i % 2}
        for i in range(8)
    ]

    def run(max_steps, resume=None):
        args = TrainingArguments(
            output_dir=str(tmp_path),
            max_steps=max_steps,
            save_steps=2,
            per_device_train_batch_size=4,
            report_to=[],
            use_cpu=True,
            learning_rate=1e-2,
            save_only_model=False,
            seed=0,
            disable_tqdm=True,
        )
        trainer = Trainer(model=copy.deepcopy(model), args=args, train_dataset=data)
        trainer.train(resume_from_checkpoint=resume)
        return trainer.model

    trained = run(2)
    assert not torch.equal(trained.model.classifier.weight, model.model.classifier.weight)
    checkpoint = tmp_path / "checkpoint-2"
    tensors, metadata = read_dir(checkpoint)
    assert metadata["model.safetensors"][ckpt.METADATA_LAYOUT] == "compact"
    assert not any(k.endswith(".expert_weight") for k in tensors)
    # Resuming reads model.safetensors with `load_state_dict` (our override decodes it).
    resumed = run(2, resume=str(checkpoint))
    assert_same_module(trained, resumed)
    assert_same_module(trained, AutoModelForSequenceClassification.from_pretrained(checkpoint))
