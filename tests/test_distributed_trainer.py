"""Distributed (issue #7): 2 CPU ranks (torchrun, gloo) run the HF Trainer with `IMPTrainerCallback`; the masks
are bit-identical on both ranks, training moves the weights identically, and the rank-0 save loads."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open
from transformers import AutoModelForSequenceClassification

from pad_moe_transformers.partition.units import linears_by_name

WORKER = os.path.join(os.path.dirname(__file__), "distributed_worker.py")
TIMEOUT_S = 180



def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    out = tmp_path_factory.mktemp("ddp")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        WORKER,
        str(out),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(__file__), env.get("PYTHONPATH")]))
    # Own process group, so that a hang is cleaned up completely (torchrun and both workers).
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    try:
        log, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in {TIMEOUT_S} s (a hang):\n{log[-4000:]}")
    assert proc.returncode == 0, log[-4000:]
    ranks = []
    for rank in range(2):
        with open(out / f"rank{rank}.json") as f:
            info = json.load(f)
        with np.load(out / f"rank{rank}.npz") as arrays:
            info["arrays"] = {k: arrays[k] for k in arrays.files}
        ranks.append(info)
    return out, ranks


def test_masks_are_bit_identical_across_ranks(two_ranks):
    _, (r0, r1) = two_ranks
    assert r0["world_size"] == r1["world_size"] == 2
    masks = [k for k in r0["arrays"] if k.startswith("mask/")]
    assert len(masks) == 4
    for key in masks:
        assert r0["arrays"][key].dtype == np.bool_
        assert np.array_equal(r0["arrays"][key], r1["arrays"][key]), key
        assert 0.35 < r0["arrays"][key].mean() < 0.45  # kappa = 0.4
    assert r0["partition"] == r1["partition"]
    assert r0["partition"]["world_size"] == 2 and r0["partition"]["num_batches"] == 2


def test_training_proceeds_in_step_on_both_ranks(two_ranks):
    _, (r0, r1) = two_ranks
    assert r0["global_step"] == r1["global_step"] == 4
    assert len(r0["losses"]) == 4 and all(np.isfinite(r0["losses"]))
    assert any(name.endswith("expert_weight") for name in r0["changed"])
    assert any(name.endswith("classifier.weight") for name in r0["changed"])
    for key in (k for k in r0["arrays"] if k.startswith("param/")):  # DDP keeps the replicas equal
        assert np.array_equal(r0["arrays"][key], r1["arrays"][key]), key


def test_rank0_save_loads(two_ranks):
    out, (r0, _) = two_ranks
    model = AutoModelForSequenceClassification.from_pretrained(out / "final")
    assert model.config.partition == r0["partition"]
    for name, linear in linears_by_name(model).items():
        assert np.array_equal(linear.mask.numpy(), r0["arrays"][f"mask/{name}"]), name
    # The ranks trained in dense storage (the callback keeps DDP dense); the loaded model is compact: its values
    # are the entries eq. 4 reads of the rank's dense weights, bit for bit.
    dense_names = {"expert_values": "expert_weight", "static_values": "static_weight"}
    short_names = {id(linear): short for short, linear in linears_by_name(model).items()}
    compared = 0
    for name, param in model.named_parameters():
        prefix, _, leaf = name.rpartition(".")
        if leaf in dense_names:
            mask = torch.from_numpy(r0["arrays"][f"mask/{short_names[id(model.get_submodule(prefix))]}"])
            dense = torch.from_numpy(r0["arrays"][f"param/{prefix}.{dense_names[leaf]}"])
            expected = dense[:, mask] if leaf == "expert_values" else dense[~mask]
        else:
            expected = torch.from_numpy(r0["arrays"][f"param/{name}"])
        assert torch.equal(param.detach(), expected), name
        compared += leaf in dense_names
    assert compared == 2 * len(linears_by_name(model))
    assert not any(entry.startswith(".pad_moe_save-") for entry in os.listdir(out / "final"))


def test_a_rank_without_batches_fails_on_every_rank(two_ranks):
    _, ranks = two_ranks
    for info in ranks:
        assert info["zero_batches"].startswith("Mode partition got zero batches"), info["zero_batches"]


def test_the_logged_ddp_loss_is_the_mean_loss(two_ranks):
    """A fresh classifier head gives logits ~0, so the first loss is ln 2 + 0.01 * aux (aux ~1). Trainer would
    multiply it by the number of ranks if the PAD model advertised loss kwargs (dense BERT does: 1.39 here)."""
    _, (r0, _) = two_ranks
    assert abs(r0["losses"][0] - (np.log(2) + 0.01)) < 0.03, r0["losses"]


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    """Single process: 2 accumulated batches of 4 make the same SGD step as one batch of 8."""
    from test_callback import _PairDataset
    from transformers import BertConfig, Trainer, TrainingArguments

    import pad_moe_transformers as pmt

    def step(batch_size, accumulation):
        torch.manual_seed(0)
        base = BertConfig(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            vocab_size=50,
            max_position_embeddings=32,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        model = pmt.PADMoEForSequenceClassification(
            pmt.PADMoEConfig(base_config=base, num_experts=4, router_aux_loss_coef=0.0)
        )
        args = TrainingArguments(
            output_dir=str(tmp_path / f"{batch_size}x{accumulation}"),
            use_cpu=True,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
            optim="sgd",
            learning_rate=0.5,
            max_grad_norm=0.0,
            lr_scheduler_type="constant",
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            seed=0,
        )
        initial = model.model.classifier.weight.detach().clone()
        Trainer(model=model, args=args, train_dataset=_PairDataset(n=8)).train()
        assert not torch.equal(model.model.classifier.weight, initial)  # the step moved the weights
        return model

    one, accumulated = step(8, 1), step(4, 2)
    for (name, a), b in zip(one.named_parameters(), accumulated.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------------------ FSDP
# torch's own FSDP APIs on CPU (Trainer ignores `fsdp=` on CPU); what docs/distributed.md states.
def _fsdp(two_ranks):
    _, (r0, _) = two_ranks
    if "unavailable" in r0["fsdp"]:
        pytest.skip(f"FSDP APIs unavailable: {r0['fsdp']['unavailable']}")
    return r0["fsdp"]


def test_fsdp_accepts_the_scale_factors_of_every_mode(two_ranks):
    """The scale factors are (1,) parameters: FSDP2 and FSDP1 (which refuse 0-d ones) shard and train every
    scale_factor_mode, the default "sum2" included, and the scale factors receive gradients."""
    _, (r0, r1) = two_ranks
    fsdp = _fsdp(two_ranks)
    expected = {
        "sum2": ["scale_logit"],
        "none": [],
        "static_only": ["lambda_static"],
        "dynamic_only": ["lambda_dynamic"],
        "free": ["lambda_static", "lambda_dynamic"],
    }
    assert set(fsdp["modes"]) == set(expected)
    for mode, names in expected.items():
        info, other = fsdp["modes"][mode], r1["fsdp"]["modes"][mode]
        assert sorted(info["fsdp2_grad"]) == sorted(names), mode
        for name in names:
            # FSDP2 shards dim 0: one rank holds the value, the other an empty shard.
            assert info["fsdp2_local_numel"][name] + other["fsdp2_local_numel"][name] == 1, (mode, name)
            assert info["fsdp2_grad"][name] > 0, (mode, name)
            before, after = info["fsdp1_scales"][name]
            assert len(before) == len(after) == 1 and before != after, (mode, name)  # FSDP1 training moved it
            assert info["fsdp1_scales"][name] == other["fsdp1_scales"][name], (mode, name)


def test_fsdp2_shards_experts_keeps_masks_whole_and_eval_consistent(two_ranks):
    """The default model (scale_factor_mode="sum2") under FSDP2, one unit per BertLayer."""
    fsdp = _fsdp(two_ranks)
    # Compact storage (the partition's default): `expert_values` (4 experts, nnz(M) = 0.5 * 32 * 16), dim 0 (experts)
    # split over the 2 ranks.
    assert fsdp["storage"] == "compact"
    assert fsdp["dynamic_local_shape"] == [2, 256]
    assert fsdp["scale_logit_shape"] == [1]
    assert fsdp["mask_shape"] == [32, 16]  # a buffer: never sharded, the whole mask on every rank
    assert len(fsdp["scale_logit_grads"]) == 3 and all(g > 0 for g in fsdp["scale_logit_grads"])
    assert fsdp["scale_logit_moved"][0] == 0.0 and fsdp["scale_logit_moved"][1] != 0.0
    assert fsdp["masks_unchanged"] and fsdp["eval_moved"]
    assert fsdp["cached_minus_uncached"] == 0.0  # no-grad and autograd eval agree on the weights FSDP gathers
    assert fsdp["partition_sharded"].startswith("Mode partition needs the full (unsharded) weights")


def test_full_state_dicts_of_fsdp_models_save_and_load(two_ranks):
    out, _ = two_ranks
    fsdp = _fsdp(two_ranks)
    assert "_fsdp_wrapped_module" in fsdp["fsdp1_module_names"] and fsdp["fsdp1_save"] == "saved"
    scale = "model.bert.encoder.layer.0.intermediate.dense.fc_in.scale_logit"
    for name in ("fsdp2", "fsdp1"):
        with safe_open(str(out / name / "model.safetensors"), "pt") as f:
            assert f.get_slice(scale).get_shape() == []  # stored 0-d, as format version 1 specifies
        model = AutoModelForSequenceClassification.from_pretrained(out / name)
        assert model.config.scale_factor_mode == "sum2"
        with np.load(out / f"{name}_state.npz") as state:
            loaded = model.state_dict()
            assert set(state.files) == set(loaded)
            for key in state.files:
                assert state[key].shape == loaded[key].shape and np.array_equal(state[key], loaded[key].numpy()), (
                    name,
                    key,
                )
            assert state[scale].shape == (1,)
