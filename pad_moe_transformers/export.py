"""Serving a PAD model: its eq. 4 weights frozen into traced graphs, and ONNX export checked with ONNX Runtime.

At inference a PAD layer's eq. 4 weights are constants. Eager PyTorch keeps them in a merged model (eval mode,
`core.inference`), checked before each use; a traced graph cannot run that check, and should hold them as constants:

    with torch.no_grad(), frozen_pad_weights(model):
        program = torch.export.export(model, (), batch)       # eq. 4 is not in the graph, its result is

`export_onnx(model, "out/model.onnx")` does that for a BERT-family text model (PAD-MoE or dense), with dynamic
batch size and sequence length, and checks the file with ONNX Runtime against PyTorch (`verify_onnx`). The
`pad-moe export` command runs it on a checkpoint. docs/deploy.md describes the whole path (merged inference,
pipeline, torch.compile, torch.export, ONNX) with measured latencies.

`onnx`, `onnxscript` and `onnxruntime` are needed only here: ``pip install 'pad_moe_transformers[onnx]'``.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._compat import get_experts_implementation
from .core.inference import FROZEN_KEYS, freeze, thaw
from .core.pad_weight import PADWeight
from .moe import PADMoEFeedForward

__all__ = ["ONNXExport", "export_onnx", "frozen_pad_weights", "onnx_inputs", "verify_onnx"]

ONNX_EXTRA_HINT = "pip install 'pad_moe_transformers[onnx]' (onnx, onnxscript, onnxruntime)"


# ------------------------------------------------------------------------------------------ frozen weights
@contextlib.contextmanager
def frozen_pad_weights(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every PAD layer of `model` takes its eq. 4 weights from buffers formed once on entry.

    A merged model (`merge_pad_weights`, eval mode) checks before each forward that its stored weights are fresh, which
    a tracer cannot follow (torch.compile, torch.export and the ONNX exporter form eq. 4 in the graph instead). Here
    the weights become non-persistent buffers of the layers (`core.inference.freeze`), served without a check, so a
    graph traced inside the block (under `torch.no_grad()`) holds them as constants: an element-wise PAD layer is then
    exactly a plain MoE layer, a neuron-structured one a dense FFN on its static neurons plus a smaller MoE on its
    dynamic ones (the slices' sizes fixed at entry), a PAD convolution a DY-Conv. Where autograd records (grad
    enabled) the layers form eq. 4 as usual, so no gradient is ever taken through the frozen values. On exit the
    buffers are removed.

    Do not edit the weights inside the block (the frozen values would not follow); a nested block on the same
    model reuses the outer block's values. Raises `ValueError` while
    IMP scores a partition (a relaxed mask is not an inference state) or for a neuron-granularity layer whose
    mask is not neuron-structured.
    """
    if any(getattr(m, FROZEN_KEYS, None) is not None for m in model.modules()):
        yield model  # nested in another block on the same model: its frozen values serve
        return
    frozen: list[nn.Module] = []
    try:
        with torch.no_grad():
            neuron_linears: set[int] = set()
            for module in model.modules():
                if isinstance(module, PADMoEFeedForward) and module.partition_granularity == "neuron":
                    value = module._neuron_weights()
                    frozen.append(module)
                    freeze(module, value)
                    neuron_linears.update((id(module.fc_in), id(module.fc_out)))  # read through the slices only
            for module in model.modules():
                if not isinstance(module, PADWeight) or id(module) in neuron_linears:
                    continue
                if module.soft_mask is not None:
                    raise ValueError(
                        "frozen_pad_weights: a PAD layer holds a relaxed IMP mask (soft_mask); freeze the model after "
                        "the partition has finished."
                    )
                value = module._merge_experts()
                frozen.append(module)
                freeze(module, value)
        yield model
    finally:
        for module in reversed(frozen):
            thaw(module)


# ------------------------------------------------------------------------------------------ ONNX
@dataclass
class ONNXExport:
    """What `export_onnx` wrote."""

    path: Path
    """The `.onnx` file (weights inside it below 2 GB, else next to it in `<name>.data`)."""
    input_names: list[str]
    """The graph's inputs, int64 `(batch, sequence)`, in order: what the model's tokenizer returns."""
    output_names: list[str]
    """The model output's tensor fields, in order (a classifier: ``["logits"]``)."""
    max_abs_diff: float | None
    """Largest |ONNX Runtime - PyTorch| over the outputs on the verification batch; None when not verified."""


class _TensorsInTensorsOut(nn.Module):
    """The family model with positional tensor inputs and a tuple of its output tensors (the ONNX signature)."""

    def __init__(self, model: nn.Module, output_names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.output_names = list(output_names)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None
    ) -> tuple[Tensor, ...]:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        outputs = self.model(**{k: v for k, v in inputs.items() if v is not None}, return_dict=True)
        return tuple(outputs[name] for name in self.output_names)


def _family_model(model: nn.Module) -> nn.Module:
    """What the graph runs: for a PAD-MoE model the wrapped family model (its PAD FFNs included), leaving out the
    wrapper's router losses and expert-usage counts, which inference does not use; a dense model as it is."""
    from .modeling_pad_moe import PADMoEPreTrainedModel

    if isinstance(model, PADMoEPreTrainedModel):
        return model.model
    if getattr(model, "main_input_name", "input_ids") != "input_ids":
        raise TypeError(
            f"export_onnx exports BERT-family text models (PAD-MoE or dense), not {type(model).__name__} (input "
            f"{model.main_input_name!r}); export a PAD dynamic-convolution model with torch.export inside "
            "`frozen_pad_weights(model)` (docs/deploy.md)."
        )
    return model


def onnx_inputs(model: nn.Module, batch_size: int = 2, seq_len: int = 16, seed: int = 0) -> dict[str, Tensor]:
    """A random batch for the inputs the exported graph takes: ``input_ids``, ``attention_mask`` (the last quarter
    of the first row padded) and, where the family has token types, ``token_type_ids`` (int64, ``(batch, seq)``)."""
    family = _family_model(model)
    config = family.config
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=generator)
    attention_mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    attention_mask[0, seq_len - seq_len // 4 :] = 0
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if "token_type_ids" in inspect.signature(family.forward).parameters and getattr(config, "type_vocab_size", 0) > 1:
        token_type_ids = torch.zeros_like(input_ids)
        token_type_ids[:, seq_len // 2 :] = 1  # a sentence pair
        inputs["token_type_ids"] = token_type_ids
    return {name: tensor.to(_device(model)) for name, tensor in inputs.items()}


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _max_positions(config: Any) -> int | None:
    """The longest sequence the family's position embeddings take (RoBERTa-like families reserve the first
    ``pad_token_id + 1`` positions)."""
    positions = getattr(config, "max_position_embeddings", None)
    if positions is None:
        return None
    if config.model_type in ("roberta", "xlm-roberta", "camembert"):
        positions -= (getattr(config, "pad_token_id", None) or 0) + 1
    return positions


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    example_inputs: Mapping[str, Tensor] | None = None,
    verify_inputs: Mapping[str, Tensor] | None = None,
    opset_version: int | None = None,
    atol: float | None = 1e-4,
) -> ONNXExport:
    """Export a BERT-family text model (a PAD-MoE model of any head, or a dense one) to ONNX and check it.

    The graph is the cheapest correct inference graph: traced inside `frozen_pad_weights` (eq. 4's result held as
    constants; only the selected experts' matmuls run, the tokens of each found by `NonZero`), without the PAD
    wrapper's router losses and usage counts, in eval mode, fp32 as the model is. Inputs: int64 ``input_ids``,
    ``attention_mask`` and, for families with token types (BERT, ALBERT, ELECTRA), ``token_type_ids``, each
    ``(batch, sequence)`` with both dimensions dynamic (sequence up to the position embeddings); outputs: the
    model output's tensor fields (``logits`` for a classifier).

    Args:
        model: the model to export (left in eval mode).
        path: the `.onnx` file to write (its folder is created).
        example_inputs: the batch traced (default `onnx_inputs(model)`, 2 x 16); no dimension may be 0 or 1
            (the exporter would specialise it).
        verify_inputs: the batch `verify_onnx` runs (default `onnx_inputs(model, 3, 11)`: other sizes than the
            traced ones, so the dynamic dimensions are exercised).
        opset_version: the ONNX opset (default: the exporter's).
        atol: `verify_onnx` raises `RuntimeError` when ONNX Runtime and PyTorch differ by more; None skips the
            check (no onnxruntime needed then).

    Returns: an `ONNXExport` (path, input and output names, the verified difference).
    """
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter's dependency; fail with the install hint)
    except ImportError as error:
        raise ImportError(f"export_onnx needs onnx and onnxscript: {ONNX_EXTRA_HINT}.") from error
    model.eval()
    family = _family_model(model)
    inputs = dict(example_inputs) if example_inputs is not None else onnx_inputs(model)
    input_names = list(inputs)
    unknown = set(input_names) - {"input_ids", "attention_mask", "token_type_ids"}
    if "input_ids" not in inputs or unknown:
        raise ValueError(
            f"example_inputs takes input_ids and optionally attention_mask and token_type_ids, got {input_names}."
        )
    shapes = {tuple(inputs[name].shape) for name in input_names}
    if len(shapes) != 1 or min(next(iter(shapes))) < 2:
        raise ValueError(
            f"example_inputs must all be (batch, sequence) with batch and sequence >= 2 (the exporter specialises a "
            f"dimension of size 0 or 1 to that size), got {sorted(shapes)}."
        )
    batch = torch.export.Dim("batch")
    sequence = torch.export.Dim("sequence", max=_max_positions(family.config) or int(2**31 - 1))
    dynamic_shapes = {name: {0: batch, 1: sequence} for name in input_names}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), frozen_pad_weights(model), _eager_experts(model), _quiet_exporter():
        outputs = family(**inputs, return_dict=True)
        output_names = [name for name, value in outputs.items() if isinstance(value, Tensor)]
        program = torch.onnx.export(
            _TensorsInTensorsOut(family, output_names).eval(),
            (),
            kwargs=inputs,
            dynamo=True,
            input_names=input_names,
            output_names=output_names,
            opset_version=opset_version,
            dynamic_shapes=dynamic_shapes,
            optimize=True,
            verbose=False,
        )
    program.save(str(path))  # weights inside the file below 2 GB, else next to it
    result = ONNXExport(path, input_names, output_names, None)
    if atol is not None:
        check = dict(verify_inputs) if verify_inputs is not None else onnx_inputs(model, 3, 11, seed=1)
        result.max_abs_diff = verify_onnx(path, model, check)
        if not result.max_abs_diff <= atol:
            raise RuntimeError(
                f"{path}: ONNX Runtime and PyTorch differ by {result.max_abs_diff:.3g} > atol {atol:g} on a batch of "
                f"shape {tuple(next(iter(check.values())).shape)}; report this with the model's config."
            )
    return result


@contextlib.contextmanager
def _eager_experts(model: nn.Module) -> Iterator[None]:
    """The eager experts backend for the trace (restored after): traced, it is `indexed_experts_forward`, which ONNX
    expresses with standard operators; grouped_mm (the default with CUDA) has no ONNX operator."""
    from .modeling_pad_moe import PADMoEPreTrainedModel

    backend = get_experts_implementation(model.config) if isinstance(model, PADMoEPreTrainedModel) else None
    if backend in (None, "eager"):
        yield
        return
    model.set_experts_implementation("eager")
    try:
        yield
    finally:
        model.set_experts_implementation(backend)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's notes that say nothing about this export: torchvision's ops are not registered
    (not used here), and the inputs' shared "batch" / "sequence" dimensions are named once."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"# The axis name: \w+ will not be used", category=UserWarning)
            yield
    finally:
        registration.setLevel(level)


def verify_onnx(
    path: str | Path,
    model: nn.Module,
    inputs: Mapping[str, Tensor],
    session_options: Callable[[Any], None] | None = None,
) -> float:
    """Run the ONNX file in ONNX Runtime (CPU) and `model` in PyTorch (eager, no grad) on `inputs`; return the
    largest absolute difference over the outputs the file names (e.g. ``logits``). `session_options` may adjust
    the `onnxruntime.SessionOptions` (threads) before the session is made."""
    try:
        import onnxruntime
    except ImportError as error:
        raise ImportError(f"verify_onnx needs onnxruntime: {ONNX_EXTRA_HINT}.") from error
    options = onnxruntime.SessionOptions()
    if session_options is not None:
        session_options(options)
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {i.name: inputs[i.name].detach().cpu().numpy() for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]
    got = session.run(names, feed)
    model.eval()
    with torch.no_grad():
        expected = _family_model(model)(**{k: v for k, v in inputs.items() if k in feed}, return_dict=True)
    return max(
        float((torch.from_numpy(value) - expected[name].detach().cpu().float()).abs().max())
        for name, value in zip(names, got)
    )
