"""`IMPTrainerCallback`: partition at train begin, nothing left behind, skips partitioned models."""

from __future__ import annotations

import itertools
import json
import logging

import numpy as np
import pytest
import torch
from test_partition import _tiny_model, pad_linears
from torch.utils.data import DataLoader, Dataset
from transformers import Trainer, TrainerControl, TrainerState, TrainingArguments, default_data_collator

import pad_moe_transformers as pmt
from pad_moe_transformers.callbacks import take_batches
from pad_moe_transformers.partition import apply_partition, partition_model


class _PairDataset(Dataset):
    def __init__(self, n: int = 24, seq: int = 10, seed: int = 5) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(1, 50, (n, seq), generator=generator)
        self.labels = torch.randint(0, 2, (n,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.input_ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": self.labels[i]}


class _ExplodingLoader:
    def __iter__(self):
        raise AssertionError("the callback must not read batches here")


def _args(tmp_path, **kwargs) -> TrainingArguments:
    defaults = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=1,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    defaults.update(kwargs)
    return TrainingArguments(**defaults)


def _train_one_step(tmp_path, model, callbacks=()):
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=_PairDataset(), callbacks=list(callbacks))
    trainer.train()
    return trainer


def test_first_step_is_the_same_as_without_the_callback_apart_from_the_mask(tmp_path):
    """Dropout is on and the sampler is random: this only holds if the callback restores every RNG."""
    callback = pmt.IMPTrainerCallback(dynamic_ratio=0.5, num_batches=2, rounds=2)
    with_cb = _tiny_model(seed=0)
    _train_one_step(tmp_path / "a", with_cb, [callback])
    assert callback.result is not None and with_cb.config.is_partitioned
    assert callback.result.metadata["num_batches"] == 2

    without_cb = _tiny_model(seed=0)
    apply_partition(without_cb, callback.result.masks, callback.result.metadata)
    _train_one_step(tmp_path / "b", without_cb)
    for (name, a), b in zip(with_cb.named_parameters(), without_cb.parameters()):
        assert torch.equal(a, b), name
    assert any(not torch.equal(a, b) for a, b in zip(with_cb.parameters(), _tiny_model(seed=0).parameters()))


def test_leaves_no_gradients_or_optimizer_state(tmp_path, caplog):
    model = _tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = DataLoader(_PairDataset(), batch_size=4, shuffle=True, collate_fn=default_data_collator)
    callback = pmt.IMPTrainerCallback(dynamic_ratio=0.3, num_batches=3, rounds=2)
    with caplog.at_level(logging.INFO, logger="pad_moe_transformers"):
        callback.on_train_begin(_args(tmp_path), TrainerState(), TrainerControl(), model=model,
                                train_dataloader=loader, optimizer=optimizer)
    assert all(p.grad is None for p in model.parameters())
    assert len(optimizer.state) == 0
    assert model.config.partition["achieved_dynamic_ratio"] == callback.result.dynamic_ratios
    for name, linear in pad_linears(model).items():
        assert abs(linear.num_dynamic() - 0.3 * linear.mask.numel()) <= 1
        assert f"{name}={linear.dynamic_ratio():.4f}" in caplog.text  # per-layer ratios are logged
    assert callback.result.num_passes == 3 + 2 * 3  # warm-up steps + one pass per batch and round, logged
    assert f"on 3 batches, 9 forward-backward passes in {callback.result.seconds:.1f} s" in caplog.text


def test_does_nothing_when_already_partitioned(tmp_path):
    args, control = _args(tmp_path), TrainerControl()
    partitioned = _tiny_model()
    first = next(iter(DataLoader(_PairDataset(), batch_size=4)))
    partition_model(partitioned, [first], method="random", progress=False)
    masks = {n: lin.mask.clone() for n, lin in pad_linears(partitioned).items()}
    callback = pmt.IMPTrainerCallback()
    callback.on_train_begin(args, TrainerState(), control, model=partitioned, train_dataloader=_ExplodingLoader())
    assert callback.result is None
    assert all(torch.equal(masks[n], lin.mask) for n, lin in pad_linears(partitioned).items())

    # A resumed run: the checkpoint's masks were loaded into a model whose config has no metadata.
    resumed = _tiny_model()
    apply_partition(resumed, masks)
    resumed.config.partition = None
    callback.on_train_begin(args, TrainerState(), control, model=resumed, train_dataloader=_ExplodingLoader())
    fresh = _tiny_model()
    resumed_state = TrainerState(global_step=10)
    callback.on_train_begin(args, resumed_state, control, model=fresh, train_dataloader=_ExplodingLoader())
    assert callback.result is None and not fresh.config.is_partitioned


def test_take_batches_reads_only_what_it_takes():
    loader = DataLoader(_PairDataset(n=8), batch_size=4)
    assert len(take_batches(loader, 10)) == 2 and len(take_batches(loader, 1)) == 1
    endless = itertools.count()
    assert take_batches(endless, 3) == [0, 1, 2] and next(endless) == 3
    with pytest.raises(TypeError, match="PAD-MoE model"):
        pmt.IMPTrainerCallback().on_train_begin(None, TrainerState(), TrainerControl(), model=torch.nn.Linear(2, 2))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dynamic_ratio": 0.0}, r"dynamic_ratio must be in \(0, 1\], got 0\.0"),
        ({"dynamic_ratio": 1.5}, r"dynamic_ratio must be in \(0, 1\], got 1\.5"),
        ({"dynamic_ratio": "0.5"}, r"dynamic_ratio must be a finite real number, got '0\.5'"),
        ({"dynamic_ratio": float("nan")}, r"dynamic_ratio must be a finite real number, got nan"),
        ({"dynamic_ratio": None}, r"dynamic_ratio must be a real number in \(0, 1\], got None"),
        ({"num_batches": 0}, r"num_batches must be >= 1 \(the paper uses 10\), got 0"),
        ({"num_batches": 2.0}, r"num_batches must be an integer >= 1 .*got 2\.0"),
        ({"num_batches": True}, r"num_batches must be an integer >= 1 .*got True"),
        ({"rounds": 0}, r"rounds must be >= 1, got 0"),
        ({"method": "lth"}, r"method must be one of \['imp', 'mp', 'random', 'moe_p'\], got 'lth'"),
        ({"scope": "layer"}, r"scope must be one of \['linear', 'global'\], got 'layer'"),
        ({"score": "snip"}, r"score must be one of \['warmup_grad', 'grad', 'connection'\], got 'snip'"),
        ({"seed": 1.5}, r"seed must be an integer, got 1\.5"),
        ({"warmup_steps": -1}, r"warmup_steps must be >= 0 \(None: one step per batch\), got -1"),
        ({"warmup_lr": 0.0}, r"warmup_lr must be > 0 for score='warmup_grad', got 0\.0"),
        ({"progress": "yes"}, r"progress must be True or False, got 'yes'"),
    ],
)
def test_arguments_are_validated_and_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        pmt.IMPTrainerCallback(**kwargs)


def test_numpy_arguments_give_json_safe_metadata(tmp_path):
    callback = pmt.IMPTrainerCallback(dynamic_ratio=np.float64(0.5), num_batches=np.int64(2), rounds=np.int64(2),
                                      seed=np.int64(4), warmup_steps=np.int32(1), warmup_lr=np.float32(1e-3),
                                      progress=np.bool_(False))
    state = callback.state()["args"]
    assert {k: type(v) for k, v in state.items()} == {
        "dynamic_ratio": float, "num_batches": int, "rounds": int, "method": str, "scope": str, "score": str,
        "seed": int, "warmup_steps": int, "warmup_lr": float, "progress": bool,
    }
    model = _tiny_model()
    loader = DataLoader(_PairDataset(), batch_size=4, collate_fn=default_data_collator)
    callback.on_train_begin(_args(tmp_path), TrainerState(), TrainerControl(), model=model, train_dataloader=loader)
    meta = json.loads(json.dumps(model.config.to_dict()))["partition"]
    assert (meta["target_dynamic_ratio"], meta["num_batches"], meta["rounds"], meta["seed"]) == (0.5, 2, 2, 4)
    assert json.dumps(callback.state())
