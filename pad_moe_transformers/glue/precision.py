"""bf16 on CPU for the examples and benchmarks: what a run uses, and whether the CPU's bf16 is native.

    native_bf16_cpu()                  # `pad_moe_transformers.precision`: AVX512-BF16 / AMX-BF16, Arm BF16
    resolve_bf16("auto")               # (bf16, use_cpu) for TrainingArguments: bf16 where it is native
    describe_precision(bf16, use_cpu)  # "bf16 autocast on the CPU (native: avx512_bf16)", said in the output

On a CPU, `Trainer` runs bf16 as autocast and needs both ``bf16=True`` and ``use_cpu=True`` (``--bf16
--use_cpu``); without them it refuses bf16 on a machine with no bf16 GPU. Autocast runs on any CPU, but
without native bf16 instructions it emulates them and is slower than fp32, so "auto" takes bf16 only
where it is native.
"""

from __future__ import annotations

from .. import precision as _native
from ..precision import cpu_bf16_flags, native_bf16_cpu

__all__ = ["cpu_bf16_flags", "describe_precision", "native_bf16_cpu", "resolve_bf16"]


def _accelerator_available() -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    if accelerator is not None:
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


def resolve_bf16(choice: str | bool) -> tuple[bool, bool]:
    """`(bf16, use_cpu)` for `TrainingArguments` from ``"auto"``, ``"true"`` or ``"false"`` (or a bool).

    ``"auto"``: on a machine with an accelerator, bf16 where it supports bf16 (transformers'
    `is_torch_bf16_gpu_available`), on the accelerator; without one, bf16 on the CPU where the CPU has
    native bf16, else fp32. ``"true"`` without an accelerator runs bf16 on the CPU, so it sets `use_cpu`
    (Trainer's requirement for bf16 on a CPU). `use_cpu` is never set where an accelerator is present.
    """
    if isinstance(choice, str):
        value = choice.strip().lower()
        if value not in ("auto", "true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"bf16 must be 'auto', 'true' or 'false', got {choice!r}.")
        choice = value if value == "auto" else value in ("true", "1", "yes")
    accelerator = _accelerator_available()
    if choice == "auto":
        if accelerator:
            from transformers.utils import is_torch_bf16_gpu_available

            return is_torch_bf16_gpu_available(), False
        native = _native.native_bf16_cpu()
        return native, native
    return bool(choice), bool(choice) and not accelerator


def describe_precision(bf16: bool, use_cpu: bool) -> str:
    """One line for a run's output: the precision and, on a CPU, whether its bf16 is native."""
    import torch

    on_cpu = use_cpu or not _accelerator_available()
    if not on_cpu:
        name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "the accelerator"
        return f"bf16 autocast on {name}" if bf16 else f"fp32 on {name}"
    flags = _native.cpu_bf16_flags()
    if bf16 and flags:
        return f"bf16 autocast on the CPU (native: {', '.join(flags)})"
    if bf16:
        return "bf16 autocast on the CPU (emulated: no AVX512-BF16/AMX-BF16 or Arm BF16; slower than fp32)"
    if flags:
        return f"fp32 on the CPU (it has native bf16, {', '.join(flags)}: --bf16 auto would use it)"
    return "fp32 on the CPU (no native bf16)"
