"""One GLUE run of `examples/run_glue.py` with paired initialisation, and a record that proves the pairing.

    python benchmarks/glue/glue_paired.py --init_seed 42 --record out/paired_run.json -- <run_glue.py arguments>

`benchmarks/glue/glue_quality.py` runs every (task, mode, seed) through this script. Runs of different modes with
the same seed must differ only by the mode. `run_glue.py` draws the classification head and the routers from
the global torch RNG, so whether they match across modes depends on how much randomness the model build
consumed before them (today the upcycled models load the dense model first and their heads happen to match
the static one's). The pairing does not rely on that: right after `run_glue.build_model`

- the classification head is re-drawn from a generator seeded by `(init_seed, "head")` alone
  (normal(0, initializer_range) weights, zero biases: what the family's `_init_weights` draws);
- every router is re-drawn from a generator seeded by `(init_seed, "router")` (same distribution as the
  library's init), in layer order: MoE, PAD and MoE-P with the same seed start from the same routers.

The data order needs no patch: the Trainer's seedable sampler draws it from `--data_seed` (glue_quality.py
passes the seed), whatever the model consumed. The record (JSON) holds sha256 checksums of the head and
routers at init and at the first training step, and of every training batch (`data_order`), so a report
can check that runs of one seed were really paired.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import sys
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _paths
from _paths import ROOT  # noqa: E402

EXAMPLE = ROOT / "examples" / "run_glue.py"
HEAD_NAMES = ("classifier", "score")
"""Attribute names of sequence-classification heads in Transformers' encoder families."""


def load_run_glue():
    """`examples/run_glue.py` as a module (its `glue_arguments.py` sits beside it)."""
    if str(EXAMPLE.parent) not in sys.path:
        sys.path.insert(0, str(EXAMPLE.parent))
    if "run_glue_example" in sys.modules:
        return sys.modules["run_glue_example"]
    spec = importlib.util.spec_from_file_location("run_glue_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def derived_seed(seed: int, purpose: str) -> int:
    """A 63-bit seed for `purpose` that depends on `seed` and `purpose` only (not on any RNG state)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{purpose}".encode()).digest()[:8], "big") >> 1


def checksum(tensors: Iterable[torch.Tensor]) -> str:
    """sha256 (16 hex digits) of the tensors' fp32 values in order; equal values give equal checksums
    whatever the parameter names."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def classification_head(model: nn.Module) -> nn.Module:
    """The sequence-classification head (`classifier` of BERT-like models, also inside a PAD-MoE wrapper)."""
    heads = [(name, module) for name, module in model.named_modules() if name.rsplit(".", 1)[-1] in HEAD_NAMES]
    if not heads:
        raise ValueError(f"No classification head ({' / '.join(HEAD_NAMES)}) in {type(model).__name__}.")
    return min(heads, key=lambda item: item[0].count("."))[1]


def routers(model: nn.Module) -> list[nn.Module]:
    """The PAD-MoE routers in layer order (none for a dense model)."""
    from pad_moe_transformers.router import TopKRouter

    return [module for module in model.modules() if isinstance(module, TopKRouter)]


def initializer_range(model: nn.Module) -> float:
    config = getattr(model.config, "base_config", None) or model.config  # a PAD-MoE config wraps the family's
    return float(getattr(config, "initializer_range", 0.02))


def init_checksums(model: nn.Module) -> dict[str, str | None]:
    router_list = routers(model)
    return {
        "head": checksum(classification_head(model).parameters()),
        "router": checksum(r.weight for r in router_list) if router_list else None,
    }


@torch.no_grad()
def pair_initialisation(model: nn.Module, init_seed: int) -> dict[str, str | None]:
    """Re-draw the head and the routers of `model` from generators of `init_seed` alone; returns their
    checksums (`router` is None for a dense model)."""
    std = initializer_range(model)
    head_generator = torch.Generator().manual_seed(derived_seed(init_seed, "head"))
    for module in classification_head(model).modules():
        if isinstance(module, nn.Linear):
            weight = torch.empty(module.weight.shape).normal_(0.0, std, generator=head_generator)
            module.weight.copy_(weight)
            if module.bias is not None:
                module.bias.zero_()
    router_generator = torch.Generator().manual_seed(derived_seed(init_seed, "router"))
    for router in routers(model):
        router.weight.copy_(torch.empty(router.weight.shape).normal_(0.0, std, generator=router_generator))
    return init_checksums(model)


def batch_digest(inputs: dict) -> str:
    """sha256 (12 hex digits) of a training batch's token ids and labels."""
    digest = hashlib.sha256()
    for key in ("input_ids", "labels"):
        if key in inputs:
            digest.update(inputs[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


def recording_trainer(trainer_cls: type, record: dict) -> type:
    """A subclass of `trainer_cls` that appends each training batch's digest to `record["batches"]` and
    stores the head / router checksums before the first step in `record["step0"]`."""

    class RecordingTrainer(trainer_cls):
        def training_step(self, model, inputs, *args, **kwargs):
            if "step0" not in record:
                record["step0"] = init_checksums(self.model)
            record["batches"].append(batch_digest(inputs))
            return super().training_step(model, inputs, *args, **kwargs)

    RecordingTrainer.__name__ = trainer_cls.__name__
    return RecordingTrainer


def run(argv: list[str], init_seed: int, record_path: str | Path | None = None) -> dict:
    """Run `run_glue.main(argv)` with paired initialisation; returns (and writes to `record_path`) the record:
    `init_seed`, `init` / `step0` checksums, `batches` (digests), `data_order` (their checksum), `metrics`."""
    run_glue = load_run_glue()
    record: dict = {"init_seed": init_seed, "batches": []}
    build_model, trainer_cls = run_glue.build_model, run_glue.Trainer

    def paired_build_model(*args, **kwargs):
        model = build_model(*args, **kwargs)
        record["init"] = pair_initialisation(model, init_seed)
        return model

    run_glue.build_model, run_glue.Trainer = paired_build_model, recording_trainer(trainer_cls, record)
    try:
        record["metrics"] = run_glue.main(argv)
    finally:
        run_glue.build_model, run_glue.Trainer = build_model, trainer_cls
    record["steps"] = len(record["batches"])
    record["data_order"] = hashlib.sha256(" ".join(record["batches"]).encode()).hexdigest()[:16]
    if record_path is not None:
        Path(record_path).write_text(json.dumps(record, indent=2))
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init_seed", type=int, required=True, help="Seed of the head and router initialisation.")
    parser.add_argument("--record", required=True, help="Where to write the pairing record (JSON).")
    args, rest = parser.parse_known_args()
    run(rest[1:] if rest[:1] == ["--"] else rest, args.init_seed, args.record)


if __name__ == "__main__":
    main()
