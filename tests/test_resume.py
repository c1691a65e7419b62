"""Resume (issue #7): a Trainer run with `IMPTrainerCallback` that crashes after a checkpoint and is resumed
with `resume_from_checkpoint` does not partition again, keeps the masks and the partition metadata, and
ends with the same weights as the same run without the interruption."""

from __future__ import annotations

import os

import pytest
import torch
from test_callback import _args, _PairDataset
from test_partition import _tiny_model, pad_linears
from transformers import AutoModelForSequenceClassification, Trainer, TrainerCallback

import pad_moe_transformers as pmt
from pad_moe_transformers import callbacks as callbacks_module

MAX_STEPS, SAVE_STEPS, CRASH_AT = 8, 4, 6  # 6 batches per epoch: the resumed part crosses an epoch boundary


class SimulatedCrash(RuntimeError):
    pass


class _CrashAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise SimulatedCrash(f"killed at step {state.global_step}")


def _run(output_dir, *, resume=None, crash_at=None):
    """Same seed, data and config every time; dropout is on and the sampler shuffles."""
    model = _tiny_model(seed=0)
    callback = pmt.IMPTrainerCallback(dynamic_ratio=0.4, num_batches=2, rounds=2)
    extra = [_CrashAt(crash_at)] if crash_at else []
    args = _args(output_dir, max_steps=MAX_STEPS, save_strategy="steps", save_steps=SAVE_STEPS,
                 logging_strategy="steps", logging_steps=1, learning_rate=1e-3)
    trainer = Trainer(model=model, args=args, train_dataset=_PairDataset(), callbacks=[callback, *extra])
    trainer.train(resume_from_checkpoint=resume)
    return trainer, callback


def _masks(model):
    return {n: lin.mask.clone() for n, lin in pad_linears(model).items()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    trainer, callback = _run(tmp_path_factory.mktemp("full"))
    assert callback.result is not None
    return trainer


def test_resume_does_not_repartition_and_reaches_the_same_weights(uninterrupted, tmp_path, monkeypatch):
    with pytest.raises(SimulatedCrash):
        _run(tmp_path, crash_at=CRASH_AT)
    checkpoint = tmp_path / f"checkpoint-{SAVE_STEPS}"
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith("checkpoint-")) == [checkpoint.name]

    def no_partition(*args, **kwargs):
        raise AssertionError("the resumed run must not partition again")

    monkeypatch.setattr(callbacks_module, "partition_model", no_partition)
    resumed, callback = _run(tmp_path, resume=str(checkpoint))
    assert callback.result is None
    assert resumed.state.global_step == MAX_STEPS

    full_model, model = uninterrupted.model, resumed.model
    full_masks = _masks(full_model)
    assert all(torch.equal(full_masks[n], m) for n, m in _masks(model).items())
    assert not all(bool(m.all()) for m in full_masks.values())
    # The fresh model's config had no partition metadata; the callback restored it from the trainer state.
    assert model.config.partition == full_model.config.partition
    assert model.config.partition["method"] == "imp"
    for (name, a), b in zip(full_model.named_parameters(), model.parameters()):
        assert torch.equal(a, b), f"{name}: max |diff| {(a - b).abs().max().item():.3e}"
    # Same losses from the resume point on.
    full_losses = {h["step"]: h["loss"] for h in uninterrupted.state.log_history if "loss" in h}
    resumed_losses = {h["step"]: h["loss"] for h in resumed.state.log_history if "loss" in h}
    assert all(full_losses[s] == resumed_losses[s] for s in range(SAVE_STEPS + 1, MAX_STEPS + 1))

    # The final checkpoint of the resumed run is complete: metadata and masks load back.
    final = tmp_path / "final"
    model.save_pretrained(final)
    again = AutoModelForSequenceClassification.from_pretrained(final)
    assert again.config.partition == full_model.config.partition
    assert all(torch.equal(full_masks[n], m) for n, m in _masks(again).items())


def test_metadata_that_does_not_match_the_masks_is_not_restored(uninterrupted, tmp_path):
    """A trainer state from another run (other masks) must not label this model's masks."""
    from transformers import TrainerControl, TrainerState

    metadata = dict(uninterrupted.model.config.partition)
    metadata["achieved_dynamic_ratio"] = {n: 0.9 for n in metadata["achieved_dynamic_ratio"]}
    state = TrainerState(global_step=4, stateful_callbacks={
        "IMPTrainerCallback": {"args": {}, "attributes": {"partition_metadata": metadata}}})
    model = _tiny_model(seed=0)
    pmt.apply_partition(model, _masks(uninterrupted.model))
    model.config.partition = None
    callback = pmt.IMPTrainerCallback()
    callback.on_train_begin(_args(tmp_path), state, TrainerControl(), model=model)
    assert model.config.partition is None and callback.result is None
    metadata["achieved_dynamic_ratio"] = dict(uninterrupted.model.config.partition["achieved_dynamic_ratio"])
    callback.on_train_begin(_args(tmp_path), state, TrainerControl(), model=model)
    assert model.config.partition == metadata and callback.state()["attributes"]["partition_metadata"] == metadata
