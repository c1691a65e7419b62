"""Mixed precision (issue #7): autocast training on CPU keeps the router in fp32 and the loss finite; IMP
scoring under autocast gives nearly the fp32 mask (measured agreement in docs/reliability.md)."""

from __future__ import annotations

import pytest
import torch
from test_callback import _args, _PairDataset
from test_partition import _batches, _tiny_model
from transformers import Trainer

import pad_moe_transformers as pmt
from pad_moe_transformers.partition import partition_model
from pad_moe_transformers.partition.units import linears_by_name


def _cpu_autocast_supported(dtype: torch.dtype) -> bool:
    try:
        with torch.autocast("cpu", dtype=dtype):
            return torch.nn.functional.linear(torch.ones(2, 2), torch.ones(2, 2)).dtype == dtype
    except (RuntimeError, AssertionError):
        return False


DTYPES = [
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(
        torch.float16,
        id="fp16",
        marks=pytest.mark.skipif(
            not _cpu_autocast_supported(torch.float16), reason="this torch build has no fp16 autocast on CPU"
        ),
    ),
]


def mask_agreement(a: dict, b: dict) -> float:
    """Fraction of mask entries (over all linears) on which two partitions agree."""
    return sum(int((a[n] == b[n]).sum()) for n in a) / sum(m.numel() for m in a.values())


@pytest.mark.parametrize("dtype", DTYPES)
def test_autocast_training_keeps_router_fp32_and_loss_finite(dtype):
    model = _tiny_model(seed=0)
    batches = _batches(n=5)
    partition_model(model, batches, method="random", dynamic_ratio=0.5, progress=False)  # eq. 4 mixes both parts
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(50):
        with torch.autocast("cpu", dtype=dtype):
            out = model(**batches[step % len(batches)], output_router_logits=True)
        assert out.logits.dtype == dtype  # autocast is really on ...
        assert all(logits.dtype == torch.float32 for logits in out.router_logits)  # ... but not in the router
        assert torch.isfinite(out.loss), f"step {step}: loss {out.loss.item()}"
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    for moe in model.moe_layers:
        assert moe.router.weight.dtype == torch.float32
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert sum(losses[-10:]) < sum(losses[:10])  # it trains


def test_trainer_bf16_with_the_callback(tmp_path):
    """`bf16=True` on CPU: accelerate runs the forward under autocast, the callback's IMP scoring included."""
    fp32_callback = pmt.IMPTrainerCallback(dynamic_ratio=0.5, num_batches=3, rounds=2)
    fp32 = Trainer(
        model=_tiny_model(),
        args=_args(tmp_path / "fp32", max_steps=1),
        train_dataset=_PairDataset(),
        callbacks=[fp32_callback],
    )
    fp32.train()
    callback = pmt.IMPTrainerCallback(dynamic_ratio=0.5, num_batches=3, rounds=2)
    args = _args(
        tmp_path / "bf16", max_steps=50, bf16=True, logging_strategy="steps", logging_steps=10, learning_rate=1e-3
    )
    trainer = Trainer(model=_tiny_model(), args=args, train_dataset=_PairDataset(), callbacks=[callback])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 5 and all(loss == loss and abs(loss) < 1e3 for loss in losses)
    assert all(moe.router.weight.dtype == torch.float32 for moe in trainer.model.moe_layers)
    agreement = mask_agreement(fp32_callback.result.masks, callback.result.masks)
    assert agreement >= 0.99, agreement  # measured 0.9951 (torch 2.13, CPU)
    for name, linear in linears_by_name(trainer.model).items():  # the same exact ratio either way
        assert linear.num_dynamic() == int(fp32_callback.result.masks[name].sum())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("score", ["warmup_grad", "connection"])
def test_imp_under_autocast_is_close_to_fp32(dtype, score):
    batches = _batches(n=4)
    reference = partition_model(_tiny_model(), batches, dynamic_ratio=0.5, score=score, progress=False).masks
    with torch.autocast("cpu", dtype=dtype):
        mixed = partition_model(_tiny_model(), batches, dynamic_ratio=0.5, score=score, progress=False).masks
    assert {n: int(m.sum()) for n, m in mixed.items()} == {n: int(m.sum()) for n, m in reference.items()}
    # Measured (torch 2.13, CPU): bf16 0.9990 / 0.9961, fp16 0.9961 / 0.9961 (warmup_grad / connection).
    # Near-ties in the scores swap under reduced precision, so the masks are close but not identical.
    assert mask_agreement(reference, mixed) >= 0.99
