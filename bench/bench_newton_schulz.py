"""Newton–Schulz throughput: every fastoptim backend beside the plain-PyTorch iteration.

FLOPs counted per iteration for a matrix with Gram side s = min(m, n) and long side l = max(m, n):
X Xᵀ 2s²l, A·A 2s³, B·X 2s²l — the dense count, the same for every implementation (a symmetric
kernel that skips half the tiles shows up as a higher TFLOP/s, not as fewer FLOPs).
"""

from __future__ import annotations

import pytest
import torch

import fastoptim
from fastoptim import reference

from benchutil import DEVICE, HAS_CUDA, backends_to_compare, record, rotating, timed

STEPS = 5
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32

if HAS_CUDA:
    SHAPES = [(1, 1024, 1024), (1, 2048, 2048), (1, 4096, 4096), (1, 8192, 8192),
              (1, 768, 768), (1, 768, 2304), (1, 768, 3072), (1, 3072, 768),
              (12, 768, 768), (12, 768, 2304), (12, 768, 3072), (12, 3072, 768)]
    GPT2_STACK = [(12, 768, 768), (12, 768, 2304), (12, 768, 3072), (12, 3072, 768)]
else:  # CPU: small shapes only, so the file runs in CI
    SHAPES = [(1, 64, 64), (1, 48, 96), (4, 32, 48)]
    GPT2_STACK = [(2, 16, 16), (2, 16, 48), (2, 16, 64), (2, 64, 16)]


def ns_flops(batch: int, m: int, n: int, steps: int = STEPS) -> float:
    s, l = min(m, n), max(m, n)
    return batch * steps * (4 * s * s * l + 2 * s**3)


def ids(shape):
    return "x".join(map(str, shape))


def torch_optim_muon_ns():
    """torch.optim.Muon's private 2-D iteration, where the installed torch has it."""
    try:
        from torch.optim._muon import _zeropower_via_newtonschulz
    except ImportError:
        return None
    return _zeropower_via_newtonschulz


IMPLEMENTATIONS = [f"fastoptim-{name}" for name in backends_to_compare("newton_schulz")] + ["torch-loop"]
if "fastoptim-cuda" in IMPLEMENTATIONS:
    IMPLEMENTATIONS.append("fastoptim-cuda-symmetric")  # the upper-triangle tensor-core kernel, forced
if torch_optim_muon_ns() is not None:
    IMPLEMENTATIONS.append("torch.optim.Muon")


def make_call(impl: str, G: torch.Tensor):
    if impl == "fastoptim-cuda-symmetric":
        return lambda: fastoptim.newton_schulz(G, STEPS, compute_dtype=DTYPE, backend="cuda")
    if impl.startswith("fastoptim-"):
        backend = impl.split("-", 1)[1]
        return lambda: fastoptim.newton_schulz(G, STEPS, compute_dtype=DTYPE, backend=backend)
    if impl == "torch-loop":  # the plain-PyTorch iteration, one matrix at a time
        return lambda: [reference.newton_schulz(g, STEPS, compute_dtype=DTYPE) for g in G]
    zeropower = torch_optim_muon_ns()
    return lambda: [zeropower(g, (3.4445, -4.775, 2.0315), STEPS, 1e-7) for g in G]


@pytest.fixture(autouse=True)
def _symmetric_switch(request, monkeypatch):
    impl = request.node.callspec.params.get("impl", "") if hasattr(request.node, "callspec") else ""
    if impl.startswith("fastoptim-cuda"):
        monkeypatch.setenv("FASTOPTIM_NS_SYMMETRIC", "1" if impl == "fastoptim-cuda-symmetric" else "0")


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=ids)
def test_newton_schulz(benchmark, ceilings, impl, shape):
    batch, m, n = shape
    inputs = rotating(lambda: torch.randn(batch, m, n, device=DEVICE, dtype=DTYPE), batch * m * n * 2)
    benchmark.group = f"newton_schulz {ids(shape)} {STEPS} steps"
    benchmark(timed(lambda: make_call(impl, next(inputs))()))
    record(benchmark, ceilings, flops=ns_flops(batch, m, n), impl=impl, shape=ids(shape))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_newton_schulz_gpt2_small_stack(benchmark, ceilings, impl):
    """The 48 hidden matrices of GPT-2 small: one batched call per shape vs one call per matrix."""
    stacks = rotating(
        lambda: [torch.randn(s, device=DEVICE, dtype=DTYPE) for s in GPT2_STACK],
        sum(b * m * n * 2 for b, m, n in GPT2_STACK),
    )

    def run():
        for G in next(stacks):
            make_call(impl, G)()

    benchmark.group = "newton_schulz gpt2-small stack"
    benchmark(timed(run))
    record(benchmark, ceilings, flops=sum(ns_flops(*s) for s in GPT2_STACK), impl=impl, shape="gpt2-small-48")
