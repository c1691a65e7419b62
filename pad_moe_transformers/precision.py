"""Whether bf16 runs natively here: the one check the examples and benchmarks use to pick bf16 autocast."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

_NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def native_bf16_cpu() -> bool:
    """True when this CPU computes bf16 in hardware (AVX512-BF16 or AMX-BF16). Without them bf16 autocast is
    emulated and slower than fp32; with them a MiniLM training step runs about 2x faster than in fp32."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:  # not Linux: ask torch which kernels it dispatches to
        return torch.backends.cpu.get_cpu_capability() in ("AVX512_BF16", "AMX")
    return any(flag in flags for flag in _NATIVE_BF16_CPU_FLAGS)


def native_bf16_available(device: str | torch.device = "cpu") -> bool:
    """bf16 in hardware on `device`: a CUDA GPU that supports it, or a CPU with native bf16 instructions."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return native_bf16_cpu()
