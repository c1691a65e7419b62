"""`IMPTrainerCallback`: mode partition at the start of `Trainer.train()`, with no fork of the Trainer.

    trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[IMPTrainerCallback(dynamic_ratio=0.5)])
    trainer.train()   # partitions on the first 10 training batches, then trains the PAD-Net

On `on_train_begin` (the optimizer and the prepared train dataloader exist, no step has run) the
callback takes the first `num_batches` batches of the Trainer's train dataloader and runs
`partition_model`. Everything it touches is put back, so the first optimizer step is the one the
Trainer would take on the partitioned model without the callback:

- no parameter `.grad` is written (`torch.autograd.grad`), the optimizer and its state are untouched;
- the torch (CPU and CUDA), Python and NumPy RNG states and the dataloader's sampler generator are
  restored, so the Trainer's first epoch sees the same batches and dropout masks;
- the model's values change only by the post-processing zeros of the mask; the partitioned layers take compact
  storage (only what eq. 4 reads is a parameter) and the Trainer's optimizer, built before this event, is re-bound
  to the new parameters in the same groups (`optimizer.rebind_optimizer`; it has no state yet). Under DDP the
  layers keep dense storage (the reducer holds the parameters it was built with).

It does nothing when the model is already partitioned (`config.partition` set, masks already
partial, or a resumed run with `state.global_step > 0`). Under DDP every rank scores its own shard;
the warm-up gradients and the scores are all-reduced and the final masks broadcast from rank 0, so
every rank ends with the same mask.

The callback is an `ExportableState`: the partition metadata goes into every checkpoint's
`trainer_state.json`. A run resumed with `resume_from_checkpoint` loads the masks with the weights,
but its freshly built config has no `config.partition`; the callback puts it back from there (when
it matches the loaded masks), so the final save is complete.
"""

from __future__ import annotations

import contextlib
import itertools
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.utils import logging

from ._compat import ExportableState
from .optimizer import check_optimizer_bound, dense_parameters, rebind_optimizer, storage_replacements
from .partition import (
    DEFAULT_NUM_BATCHES,
    DEFAULT_ROUNDS,
    DEFAULT_SCORE,
    DEFAULT_WARMUP_LR,
    PartitionResult,
    partition_model,
    verify_partition_metadata,
)
from .partition._common import check_model, check_not_sharded, world_size
from .partition.options import check_options
from .partition.units import current_masks

logger = logging.get_logger(__name__)


class IMPTrainerCallback(TrainerCallback, ExportableState):
    """Partition a PAD-MoE model (IMP by default) on the first training batches when training begins.

    Args:
        dynamic_ratio: target fraction ``kappa`` of each FFN weight that stays dynamic (of each MoE layer's
            intermediate neurons for a model with ``partition_granularity="neuron"``).
        num_batches: training batches used for scoring (the paper uses 10). Fewer are used if the
            dataloader is shorter; under DDP each rank uses its own first batches.
        rounds: IMP rounds (exponential schedule ``kappa ** (t / rounds)``).
        method: ``"imp"``, ``"mp"``, ``"random"`` or ``"moe_p"`` (see `partition_model`).
        scope: ``"linear"`` (exact ratio per linear) or ``"global"``.
        score: ``"warmup_grad"`` (default), ``"grad"`` or ``"connection"`` (see docs/partition.md).
        seed: seed of the random method; defaults to `TrainingArguments.seed`.
        warmup_steps, warmup_lr: the expert warm-up of ``"warmup_grad"`` (default one step per batch).
        progress: show a tqdm bar (also off when `TrainingArguments.disable_tqdm`).

    The arguments are validated as `partition_model` validates them (a `ValueError` names the argument);
    NumPy scalars are accepted and stored as plain Python numbers, so the metadata stays JSON-safe.
    After training begins, `self.result` holds the `PartitionResult` (None if it did nothing).
    """

    def __init__(
        self,
        dynamic_ratio: float = 0.5,
        num_batches: int = DEFAULT_NUM_BATCHES,
        rounds: int = DEFAULT_ROUNDS,
        method: str = "imp",
        *,
        scope: str = "linear",
        score: str = DEFAULT_SCORE,
        seed: int | None = None,
        warmup_steps: int | None = None,
        warmup_lr: float = DEFAULT_WARMUP_LR,
        progress: bool = True,
    ) -> None:
        if dynamic_ratio is None:
            raise ValueError("dynamic_ratio must be a real number in (0, 1], got None.")
        options = check_options(
            method=method, dynamic_ratio=dynamic_ratio, num_batches=num_batches, rounds=rounds, scope=scope,
            score=score, seed=seed, warmup_steps=warmup_steps, warmup_lr=warmup_lr, progress=progress,
        )
        self.dynamic_ratio: float = options["dynamic_ratio"]
        self.num_batches: int = options["num_batches"]
        self.rounds: int = options["rounds"]
        self.method: str = options["method"]
        self.scope: str = options["scope"]
        self.score: str = options["score"]
        self.seed: int | None = options["seed"]
        self.warmup_steps: int | None = options["warmup_steps"]
        self.warmup_lr: float = options["warmup_lr"]
        self.progress: bool = options["progress"]
        self.result: PartitionResult | None = None
        # `config.partition` of the model being trained; saved in checkpoints (see `state`).
        self.partition_metadata: dict | None = None

    def state(self) -> dict:
        """What `Trainer` saves in `trainer_state.json` (`ExportableState`): the constructor arguments and
        the partition metadata, which a resumed run restores into `model.config.partition`."""
        return {
            "args": {
                "dynamic_ratio": self.dynamic_ratio,
                "num_batches": self.num_batches,
                "rounds": self.rounds,
                "method": self.method,
                "scope": self.scope,
                "score": self.score,
                "seed": self.seed,
                "warmup_steps": self.warmup_steps,
                "warmup_lr": self.warmup_lr,
                "progress": self.progress,
            },
            "attributes": {"partition_metadata": self.partition_metadata},
        }

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        train_dataloader: Any = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        pad_model = check_model(model)
        reason = _skip_reason(pad_model, state)
        if reason is not None:
            logger.info(f"IMPTrainerCallback: not partitioning, {reason}.")
            if optimizer is not None:
                check_optimizer_bound(pad_model, optimizer)
            if pad_model.config.partition is None:
                self._restore_metadata(pad_model, state)
            self.partition_metadata = pad_model.config.partition
            return
        check_not_sharded(model)
        if train_dataloader is None:
            raise ValueError(
                "IMPTrainerCallback needs the Trainer's train dataloader (Trainer passes it to on_train_begin); "
                "call partition_model(model, batches) yourself when training without a Trainer."
            )
        with preserved_rng_state(train_dataloader):
            empty = (
                "IMPTrainerCallback: the Trainer's train dataloader yielded no batches (empty train dataset, or "
                "fewer examples than one batch with dataloader_drop_last=True); the partition needs at least one "
                "labelled batch."
            )
            try:
                batches = take_batches(train_dataloader, self.num_batches)
            except ValueError as error:
                # Accelerate's dispatching loader (iterable datasets) reports an empty stream this way.
                if "does not contain any data" in str(error):
                    raise ValueError(empty) from error
                raise
            if not batches:
                raise ValueError(empty)
            if len(batches) < self.num_batches:
                logger.warning(
                    f"IMPTrainerCallback: the train dataloader has only {len(batches)} batches; "
                    f"partitioning on those instead of num_batches={self.num_batches}."
                )
            # The partition gives the partitioned layers compact storage (new parameters): the Trainer's optimizer,
            # built before this event, is re-bound to them below. Under DDP the reducer holds the parameters it was
            # built with and cannot be re-bound: the layers keep dense storage there.
            compact = world_size() == 1
            if not compact:
                logger.warning(
                    "IMPTrainerCallback: under distributed training the partitioned layers keep dense storage (the "
                    "DDP reducer holds the parameters it was built with). For compact storage, partition before "
                    "building the Trainer: `partition_model(model, batches)`, then `Trainer(model=model, ...)`."
                )
            before = dense_parameters(pad_model)
            self.result = partition_model(
                pad_model,
                batches,
                num_batches=len(batches),
                method=self.method,
                dynamic_ratio=self.dynamic_ratio,
                rounds=self.rounds,
                scope=self.scope,
                score=self.score,
                seed=args.seed if self.seed is None else self.seed,
                warmup_steps=self.warmup_steps,
                warmup_lr=self.warmup_lr,
                progress=self.progress and not args.disable_tqdm,
                compact_storage=compact,
            )
        if optimizer is not None:
            rebind_optimizer(optimizer, storage_replacements(before))
            check_optimizer_bound(pad_model, optimizer)
        pad_model.zero_grad(set_to_none=True)
        self.partition_metadata = pad_model.config.partition
        neuron = self.result.neuron_dynamic_ratios is not None
        ratios = self.result.neuron_dynamic_ratios if neuron else self.result.dynamic_ratios
        total = self.result.metadata["neuron_dynamic_ratio_total" if neuron else "achieved_dynamic_ratio_total"]
        logger.info(
            f"IMPTrainerCallback: {self.method} partition on {len(batches)} batches, {self.result.num_passes} "
            f"forward-backward passes in {self.result.seconds:.1f} s, "
            f"dynamic {'neuron ratio per layer' if neuron else 'ratio per linear'}: "
            + ", ".join(f"{name}={ratio:.4f}" for name, ratio in ratios.items())
            + f" (total {total:.4f})"
        )

    def _restore_metadata(self, model: Any, state: TrainerState) -> None:
        """Resumed run: put the partition metadata saved in the checkpoint's trainer state back into
        `model.config.partition`, if it describes the masks the model holds (`verify_partition_metadata`)."""
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(saved, list):  # several callbacks of this class: the last saved state
            saved = saved[-1] if saved else None
        metadata = ((saved or {}).get("attributes") or {}).get("partition_metadata")
        if not metadata:
            return
        dynamic_ratio = model.config.dynamic_ratio
        model.config.partition = dict(metadata)
        if metadata.get("target_dynamic_ratio") is not None:
            model.config.dynamic_ratio = float(metadata["target_dynamic_ratio"])
        try:
            verify_partition_metadata(model)
        except ValueError as error:
            model.config.partition, model.config.dynamic_ratio = None, dynamic_ratio
            logger.warning(
                "IMPTrainerCallback: the partition metadata in the checkpoint's trainer state does not match the "
                f"model's masks; config.partition is left unset. ({error})"
            )
            return
        logger.info("IMPTrainerCallback: restored config.partition from the checkpoint's trainer state.")


def _skip_reason(model: Any, state: TrainerState) -> str | None:
    if model.config.is_partitioned:
        return f"the model is already partitioned (config.partition: method={model.config.partition.get('method')!r})"
    if any(not bool(mask.all()) for mask in current_masks(model).values()):
        return "its masks already have static entries (a partitioned checkpoint was loaded)"
    if state.global_step > 0:
        return f"the run resumes at step {state.global_step}"
    return None


def take_batches(dataloader: Any, num_batches: int) -> list[Any]:
    """The first `num_batches` batches of `dataloader` (fewer if it is shorter), read with `itertools.islice`.

    The iterator is closed early; an Accelerate dataloader is also unregistered from the gradient
    state (`end()`), as a complete pass would do.
    """
    iterator = iter(dataloader)
    exhausted = False
    try:
        batches = list(itertools.islice(iterator, num_batches))
        exhausted = len(batches) < num_batches
    finally:
        close = getattr(iterator, "close", None)
        if callable(close):
            close()
        if not exhausted and hasattr(dataloader, "gradient_state") and callable(getattr(dataloader, "end", None)):
            dataloader.end()
    return batches


def _sampler_generators(dataloader: Any) -> list[torch.Generator]:
    """Torch generators reachable from the dataloader's samplers (their state moves when iterated)."""
    found, seen = [], set()
    stack = [dataloader]
    while stack:
        obj = stack.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Generator):
            found.append(obj)
            continue
        for attr in ("generator", "sampler", "batch_sampler", "base_dataloader", "synchronized_generator"):
            child = getattr(obj, attr, None)
            if child is not None and not isinstance(child, (int, float, str)):
                stack.append(child)
    return found


@contextlib.contextmanager
def preserved_rng_state(dataloader: Any = None) -> Iterator[None]:
    """Restore the torch CPU/CUDA, Python and NumPy RNG states and the sampler generators on exit."""
    generators = _sampler_generators(dataloader) if dataloader is not None else []
    generator_states = [g.get_state() for g in generators]
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        for generator, saved in zip(generators, generator_states):
            generator.set_state(saved)
