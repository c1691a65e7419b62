"""The one timing rule of the benchmarks: the median wall time of `fn` over `repeats` calls after `warmup` calls."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Seconds per call of `fn`: the median over `repeats` timed calls, after `warmup` untimed ones (kernels,
    caches, merged weights). `fn` synchronises the device itself where that matters."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def probe_workloads() -> dict[str, float]:
    """The host probe's two workloads, timed here (`host_probe` runs this in a fresh process)."""
    import torch

    torch.manual_seed(0)
    x = torch.randn(4096, 384, dtype=torch.bfloat16)  # 32 sequences x 128 tokens of a MiniLM FFN
    w_in, w_out = torch.randn(384, 1536, dtype=torch.bfloat16), torch.randn(1536, 384, dtype=torch.bfloat16)
    big = torch.randn(8, 1536, 384 * 12)  # 216 MiB of fp32: past every cache, as the eq. 4 weights of a layer
    return {
        "matmul_ms": round(1000 * median_time(lambda: (x @ w_in).relu() @ w_out, repeats=21), 2),
        "memory_ms": round(1000 * median_time(lambda: big.mul(1.0001), repeats=11), 2),
    }


def host_probe(threads: int) -> dict[str, float]:
    """Milliseconds of two fixed workloads in a fresh process with `threads` threads: a bf16 FFN on 32 x 128 tokens
    (compute) and one pass over 216 MiB (memory bandwidth). Whole runs on a shared VM take up to +-30% more or less
    time from one session to the next with the same code; these figures, taken next to a timed run, tell a slower
    host from slower code. A few seconds, torch's import included."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    code = "import json, _timing; print(json.dumps(_timing.probe_workloads()))"
    here = os.path.dirname(os.path.abspath(__file__))  # benchmarks/, where `_timing` imports from
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=here, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])
