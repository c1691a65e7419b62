"""Whether bf16 runs natively here: the one check the examples and benchmarks use to pick bf16 autocast.

    native_bf16_cpu()           # True with AVX512-BF16 / AMX-BF16 (x86) or BF16 / SVE-BF16 (Arm)
    native_bf16_available("cuda")

Without native bf16 instructions a CPU emulates bf16 autocast, slower than fp32; with them a MiniLM
training step runs about 2x faster than in fp32. `pad_moe_transformers.glue.precision` turns this into
`TrainingArguments` values (`--bf16 auto`) and the line the examples print.
"""

from __future__ import annotations

from pathlib import Path

import torch

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")
"""CPU capability names (as `torch.cpu.get_capabilities` and Linux's /proc/cpuinfo spell them) that mean
native bf16: x86 AVX512-BF16 and AMX-BF16, Arm BF16 and SVE-BF16."""

CPUINFO = Path("/proc/cpuinfo")
"""Read for the flags when torch has no `torch.cpu.get_capabilities` (Linux only)."""


def cpu_bf16_flags() -> list[str]:
    """The native-bf16 capabilities of this CPU (a subset of `NATIVE_BF16_FLAGS`), empty if it has none."""
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)  # torch >= 2.9
    if get_capabilities is not None:
        try:
            capabilities = dict(get_capabilities())
        except RuntimeError:  # cpuinfo could not initialise: fall back to the kernel's view
            capabilities = None
        if capabilities is not None:
            return [flag for flag in NATIVE_BF16_FLAGS if capabilities.get(flag)]
    try:
        flags = set(CPUINFO.read_text().split())
    except OSError:  # neither source: say emulated rather than guess
        return []
    return [flag for flag in NATIVE_BF16_FLAGS if flag in flags]


def native_bf16_cpu() -> bool:
    """True when this CPU computes bf16 in hardware (else bf16 autocast emulates it, slower than fp32)."""
    return bool(cpu_bf16_flags())


def native_bf16_available(device: str | torch.device = "cpu") -> bool:
    """bf16 in hardware on `device`: a CUDA GPU that supports it, or a CPU with native bf16 instructions."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return native_bf16_cpu()
