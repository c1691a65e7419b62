"""One rank of `tests/test_distributed_trainer.py`, launched by torchrun (CPU, gloo):

    python -m torch.distributed.run --nproc_per_node 2 --master_port PORT tests/distributed_worker.py OUT_DIR

HF Trainer with `IMPTrainerCallback` on a tiny PAD model. Each rank writes `OUT_DIR/rank{r}.npz` (its
masks, bit for bit, and its final parameters) and `OUT_DIR/rank{r}.json` (losses, partition metadata,
what the zero-batch check raised); the Trainer saves the final model to `OUT_DIR/final` (rank 0 writes).
Then the FSDP checks of docs/distributed.md (`fsdp_checks`), with torch's own FSDP APIs: on CPU, Trainer
ignores `fsdp=` (accelerate runs plain DDP there).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
from test_callback import _PairDataset
from test_partition import _batches, _tiny_model
from transformers import BertConfig, Trainer, TrainingArguments
from transformers.models.bert.modeling_bert import BertLayer

import pad_moe_transformers as pmt
from pad_moe_transformers.configuration_pad_moe import SCALE_FACTOR_MODES
from pad_moe_transformers.pad_linear import SCALE_FACTOR_NAMES
from pad_moe_transformers.partition import partition_model
from pad_moe_transformers.partition.units import linears_by_name


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    model = _tiny_model(seed=0)  # dropout on; the same initial weights on every rank
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    callback = pmt.IMPTrainerCallback(dynamic_ratio=0.4, num_batches=2, rounds=2, progress=False)
    args = TrainingArguments(
        output_dir=os.path.join(out_dir, "trainer"),
        use_cpu=True,
        ddp_backend="gloo",
        ddp_timeout=120,
        per_device_train_batch_size=4,
        max_steps=4,
        learning_rate=1e-3,
        logging_strategy="steps",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_PairDataset(n=32), callbacks=[callback])
    trainer.train()
    trainer.save_model(os.path.join(out_dir, "final"))  # the main process writes; the others wait

    # A rank without partition batches: every rank must raise (none may wait in a collective).
    try:
        partition_model(_tiny_model(seed=0), _batches(n=1) if rank == 0 else [], progress=False)
        zero_batches = "no error"
    except ValueError as error:
        zero_batches = str(error)

    fsdp = fsdp_checks(out_dir, rank)

    masks = {f"mask/{n}": lin.mask.numpy() for n, lin in linears_by_name(model).items()}
    params = {f"param/{n}": p.detach().numpy() for n, p in model.named_parameters()}
    np.savez(os.path.join(out_dir, f"rank{rank}.npz"), **masks, **params)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(
            {
                "world_size": dist.get_world_size(),
                "partition": model.config.partition,
                "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
                "global_step": trainer.state.global_step,
                "changed": sorted(n for n, p in model.named_parameters() if not torch.equal(p.detach(), initial[n])),
                "zero_batches": zero_batches,
                "fsdp": fsdp,
            },
            f,
        )


def _fsdp_model(scale_factor_mode: str = "sum2"):
    """A tiny partitioned PAD model without dropout (the same on every rank)."""
    torch.manual_seed(0)
    base = BertConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        vocab_size=50,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = pmt.PADMoEForSequenceClassification(
        pmt.PADMoEConfig(base_config=base, num_experts=4, scale_factor_mode=scale_factor_mode)
    )
    partition_model(model, _batches(n=2), method="random", dynamic_ratio=0.5, progress=False)
    return model


def _scale_parameters(model) -> dict:
    """The scale-factor parameters of the first PAD linear (`(1,)` each; none with scale_factor_mode="none")."""
    linear = linears_by_name(model)["layer.0.fc_in"]
    return {name: getattr(linear, name) for name in SCALE_FACTOR_NAMES if hasattr(linear, name)}


def fsdp_checks(out_dir: str, rank: int) -> dict:
    try:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    except ImportError as error:
        return {"unavailable": str(error)}
    result = {}
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    batches = _batches(n=2)

    def fsdp1_wrap(model):
        return FullyShardedDataParallel(
            model, auto_wrap_policy=ModuleWrapPolicy({BertLayer}), device_id=torch.device("cpu")
        )

    def fsdp1_scales(wrapped) -> dict:  # gathered on every rank (a collective)
        with FullyShardedDataParallel.summon_full_params(wrapped):
            return {n: p.detach().tolist() for n, p in _scale_parameters(wrapped.module).items()}

    # 1. Every scale_factor_mode: FSDP2 (one unit per BertLayer, then the root) and FSDP1 accept the (1,) scale
    #    factors (both refuse 0-d parameters); the scale factors receive gradients and FSDP1 training moves them.
    modes = {}
    for mode in SCALE_FACTOR_MODES:
        info = {}
        model = _fsdp_model(mode)
        for layer in model.model.bert.encoder.layer:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        model(**batches[0]).loss.backward()
        scales = _scale_parameters(model)
        info["fsdp2_local_numel"] = {n: p.to_local().numel() for n, p in scales.items()}  # 1 on rank 0, 0 on rank 1
        info["fsdp2_grad"] = {n: float(p.grad.full_tensor().abs().sum()) for n, p in scales.items()}
        wrapped = fsdp1_wrap(_fsdp_model(mode))
        before = fsdp1_scales(wrapped)
        optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.5)
        for step in range(2):
            wrapped(**batches[step]).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        after = fsdp1_scales(wrapped)
        info["fsdp1_scales"] = {n: [before[n], after[n]] for n in before}
        modes[mode] = info
    result["modes"] = modes

    # 2. The default model (scale_factor_mode="sum2") under FSDP2: sharding, training, eval with and without
    # autograd, partition.
    model = _fsdp_model()
    reference = {n: lin.mask.clone() for n, lin in linears_by_name(model).items()}
    initial_scale = _scale_parameters(model)["scale_logit"].detach().clone()
    for layer in model.model.bert.encoder.layer:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    linear = linears_by_name(model)["layer.0.fc_in"]
    result["storage"] = linear.storage  # a partition leaves compact storage: FSDP shards the compact values
    result["dynamic_local_shape"] = list(linear.dynamic_parameter.to_local().shape)
    result["scale_logit_shape"] = list(linear.scale_logit.shape)
    result["mask_shape"] = list(linear.mask.shape)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model.eval()
    with torch.no_grad():
        before = model(**batches[0]).logits
    scale_grads = []
    for step in range(3):
        model.train()
        loss = model(**batches[step % 2]).loss
        loss.backward()
        scale_grads.append(float(linear.scale_logit.grad.full_tensor().abs().sum()))
        optimizer.step()
        optimizer.zero_grad()
    result["scale_logit_grads"] = scale_grads
    model.eval()
    with torch.no_grad():  # eval without autograd
        cached = model(**batches[0]).logits
    with torch.enable_grad():  # eval with autograd: the same eq. 4 on the weights FSDP gathers
        uncached = model(**batches[0]).logits.detach()
    result["eval_moved"] = not torch.allclose(before, cached)
    result["cached_minus_uncached"] = float((cached - uncached).abs().max())
    result["masks_unchanged"] = all(torch.equal(reference[n], lin.mask) for n, lin in linears_by_name(model).items())
    try:
        partition_model(model, batches, progress=False, overwrite=True)
        result["partition_sharded"] = "no error"
    except ValueError as error:
        result["partition_sharded"] = str(error)
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:  # with cpu_offload=True only rank 0 receives the full state dict
        scale = state["model.bert.encoder.layer.0.intermediate.dense.fc_in.scale_logit"]
        result["scale_logit_moved"] = [initial_scale.item(), scale.item()]
        model.save_pretrained(os.path.join(out_dir, "fsdp2"), state_dict=state)
        np.savez(os.path.join(out_dir, "fsdp2_state.npz"), **{k: v.numpy() for k, v in state.items()})

    # 3. FSDP1 inserts `_fsdp_wrapped_module` into module names; saving with a full state dict still works.
    twin, wrapped = _fsdp_model(), fsdp1_wrap(_fsdp_model())
    result["fsdp1_module_names"] = next(n for n, m in wrapped.named_modules() if isinstance(m, pmt.PADExpertLinear))
    if rank == 0:
        try:
            wrapped.module.save_pretrained(os.path.join(out_dir, "fsdp1"), state_dict=twin.state_dict())
            result["fsdp1_save"] = "saved"
        except ValueError as error:
            result["fsdp1_save"] = str(error)
        np.savez(os.path.join(out_dir, "fsdp1_state.npz"), **{k: v.numpy() for k, v in twin.state_dict().items()})
    dist.barrier()
    return result


if __name__ == "__main__":
    main(sys.argv[1])
