"""One rank of `tests/test_distributed_trainer.py`, launched by torchrun (CPU, gloo):

    python -m torch.distributed.run --nproc_per_node 2 --master_port PORT tests/distributed_worker.py OUT_DIR

HF Trainer with `IMPTrainerCallback` on a tiny PAD model. Each rank writes `OUT_DIR/rank{r}.npz` (its
masks, bit for bit, and its final parameters) and `OUT_DIR/rank{r}.json` (losses, partition metadata,
what the zero-batch check raised); the Trainer saves the final model to `OUT_DIR/final` (rank 0 writes).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
from transformers import Trainer, TrainingArguments

import pad_moe_transformers as pmt
from pad_moe_transformers.partition import pad_linears, partition_model
from test_callback import _PairDataset
from test_partition import _batches, _tiny_model


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
        ddp_find_unused_parameters=True,  # experts that get no token in a step have no gradient
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

    masks = {f"mask/{n}": lin.mask.numpy() for n, lin in pad_linears(model).items()}
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
            },
            f,
        )


if __name__ == "__main__":
    main(sys.argv[1])
