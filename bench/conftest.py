"""The session fixture of the benchmarks: the ceilings of this device, measured once."""

from __future__ import annotations

import pytest
import torch

from benchutil import DEVICE, HAS_CUDA, measure_seconds


@pytest.fixture(scope="session")
def ceilings(request) -> dict:
    """Measured on this device now: bf16 matmul TFLOP/s and device copy GB/s."""
    if request.config.getoption("benchmark_disable", False):
        return {"matmul_tflops": float("nan"), "copy_gbs": float("nan"), "device": str(DEVICE)}
    n = 8192 if HAS_CUDA else 512
    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    a = torch.randn(n, n, device=DEVICE, dtype=dtype)
    b = torch.randn(n, n, device=DEVICE, dtype=dtype)
    # ~0.15 s of matmuls first on a GPU, so the clocks have ramped up before the ceiling is timed.
    seconds = measure_seconds(lambda: a @ b, 20 if HAS_CUDA else 3, warmup=100 if HAS_CUDA else 1)
    tflops = 2 * n**3 / seconds / 1e12
    numel = (1 << 28) if HAS_CUDA else (1 << 22)  # 1 GiB of fp32 on a GPU
    src = torch.empty(numel, device=DEVICE)
    dst = torch.empty_like(src)
    seconds = measure_seconds(lambda: dst.copy_(src), 20 if HAS_CUDA else 3, warmup=100 if HAS_CUDA else 1)
    copy_gbs = 2 * numel * 4 / seconds / 1e9  # read + write
    name = torch.cuda.get_device_name() if HAS_CUDA else "cpu"
    capability = "sm_{}{}".format(*torch.cuda.get_device_capability()) if HAS_CUDA else None
    return {"matmul_tflops": tflops, "copy_gbs": copy_gbs, "device": name, "capability": capability}
