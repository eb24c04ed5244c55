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

from benchutil import DEVICE, HAS_CUDA, backends_to_compare, ns_flops, record, rotating, timed, torch_optim_muon_ns

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


def ids(shape):
    return "x".join(map(str, shape))


IMPLEMENTATIONS = [f"fastoptim-{name}" for name in backends_to_compare("newton_schulz")] + ["torch-loop"]
if "fastoptim-cuda" in IMPLEMENTATIONS:
    IMPLEMENTATIONS.append("fastoptim-cuda-symmetric")  # the upper-triangle tensor-core kernel, forced
    IMPLEMENTATIONS.append("fastoptim-cuda-aten")  # the driver on ATen's bmm/baddbmm (FASTOPTIM_NS_CUBLASLT=0)
# Gram Newton–Schulz (method="gram") beside the standard method, on the rectangular shapes only (a square
# matrix gains nothing: "auto" keeps it standard).
GRAM_IMPLEMENTATIONS = [f"fastoptim-{name}-gram" for name in backends_to_compare("gram_newton_schulz")]
TORCH_MUON_NS = torch_optim_muon_ns()
if hasattr(torch.optim, "Muon"):
    IMPLEMENTATIONS.append("torch.optim.Muon")


def torch_optim_muon_steps(G: torch.Tensor):
    """The fallback where torch.optim.Muon's private helper is unusable: one whole torch.optim.Muon step per
    matrix (its momentum and update included, a little more than its Newton–Schulz), built here, untimed."""
    params = [torch.nn.Parameter(g.clone()) for g in G]
    for p, g in zip(params, G):
        p.grad = g
    optimizers = [torch.optim.Muon([p], ns_steps=STEPS) for p in params]
    return lambda: [optimizer.step() for optimizer in optimizers]


def make_call(impl: str, G: torch.Tensor):
    """The call to time on G, prepared here (outside the timed region)."""
    if impl in ("fastoptim-cuda-symmetric", "fastoptim-cuda-aten"):  # the switches: _driver_switches
        return lambda: fastoptim.newton_schulz(G, STEPS, compute_dtype=DTYPE, backend="cuda")
    if impl.endswith("-gram"):
        backend = impl.split("-")[1]
        return lambda: fastoptim.newton_schulz(G, STEPS, compute_dtype=DTYPE, backend=backend, method="gram")
    if impl.startswith("fastoptim-"):
        backend = impl.split("-", 1)[1]
        return lambda: fastoptim.newton_schulz(G, STEPS, compute_dtype=DTYPE, backend=backend)
    if impl == "torch-loop":  # the plain-PyTorch iteration, one matrix at a time
        return lambda: [reference.newton_schulz(g, STEPS, compute_dtype=DTYPE) for g in G]
    if TORCH_MUON_NS is not None:  # torch.optim.Muon: its own per-matrix iteration
        return lambda: [TORCH_MUON_NS(g, STEPS) for g in G]
    return torch_optim_muon_steps(G)


@pytest.fixture(autouse=True)
def _driver_switches(request, monkeypatch):
    impl = request.node.callspec.params.get("impl", "") if hasattr(request.node, "callspec") else ""
    if impl.startswith("fastoptim-cuda"):
        monkeypatch.setenv("FASTOPTIM_NS_SYMMETRIC", "1" if impl == "fastoptim-cuda-symmetric" else "0")
        monkeypatch.setenv("FASTOPTIM_NS_CUBLASLT", "0" if impl == "fastoptim-cuda-aten" else "1")


CASES = [(shape, impl) for shape in SHAPES for impl in IMPLEMENTATIONS] + [
    (shape, impl) for shape in SHAPES if shape[1] != shape[2] for impl in GRAM_IMPLEMENTATIONS
]


@pytest.mark.parametrize("shape,impl", CASES, ids=[f"{ids(shape)}-{impl}" for shape, impl in CASES])
def test_newton_schulz(benchmark, ceilings, impl, shape):
    batch, m, n = shape
    calls = rotating(lambda: make_call(impl, torch.randn(batch, m, n, device=DEVICE, dtype=DTYPE)), batch * m * n * 2)
    benchmark.group = f"newton_schulz {ids(shape)} {STEPS} steps"
    benchmark(timed(lambda: next(calls)()))
    # FLOPs: the standard method's dense count for every row (gram included), so TFLOP/s compare like time.
    record(benchmark, ceilings, flops=ns_flops(batch, m, n, STEPS), impl=impl, shape=ids(shape),
           **torch_muon_path(impl))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_newton_schulz_gpt2_small_stack(benchmark, ceilings, impl):
    """The 48 hidden matrices of GPT-2 small: one batched call per shape vs one call per matrix."""
    stacks = rotating(
        lambda: [make_call(impl, torch.randn(s, device=DEVICE, dtype=DTYPE)) for s in GPT2_STACK],
        sum(b * m * n * 2 for b, m, n in GPT2_STACK),
    )

    def run():
        for call in next(stacks):
            call()

    benchmark.group = "newton_schulz gpt2-small stack"
    benchmark(timed(run))
    record(benchmark, ceilings, flops=sum(ns_flops(*s, STEPS) for s in GPT2_STACK), impl=impl, shape="gpt2-small-48",
           **torch_muon_path(impl))


def torch_muon_path(impl: str) -> dict:
    """Which torch.optim.Muon code a row timed: its Newton–Schulz helper, or whole steps (the fallback)."""
    if impl != "torch.optim.Muon":
        return {}
    return {"torch_muon": "_zeropower_via_newtonschulz" if TORCH_MUON_NS is not None else "optimizer steps"}
