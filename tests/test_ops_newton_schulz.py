"""newton_schulz on every backend: the kernels against the torch backend, the torch backend against
float64 math.

fp32 compute is compared by the largest entry (TOLERANCE[float32].matrix); 16-bit compute follows
flash-attention's rule (the kernel's error against float64 within ERROR_RATIO x plain PyTorch's in the
same dtype). Without a GPU the Triton kernels run in the interpreter, in fp32 only, except the
accuracy rule on small shapes: there the 16-bit tiles are upcast to an fp32 tl.dot (the interpreter's
bf16 dot is wrong), which is what that test checks. Every output and workspace is NaN before the
kernels run (`poisoned_allocations`). Tests of one backend's internals are marked and named for it.
"""

from __future__ import annotations

import contextlib
import inspect

import pytest
import torch
from ops_testing import (
    BLOCKS,
    EMPTY,
    LARGE,
    MATRICES,
    STACKS,
    assert_close,
    assert_error_within_ratio,
    assert_matrix_close,
    backend_params,
    device_for,
    large_params,
    poisoned_allocations,
    shape_params,
)

import fastoptim
from fastoptim import backends, reference
from fastoptim.coefficients import resolve

try:
    import triton
    import triton.language as tl
except ImportError:  # the triton-marked tests below need it
    triton = None

SCHEDULES = ["jordan", "you", "polar_express"]
USER_SCHEDULE = [(3.0, -3.2, 1.2), (2.0, -1.5, 0.5)]
KERNELS = backend_params("triton", "cuda")


def run(backend: str, G: torch.Tensor, **kwargs) -> torch.Tensor:
    """newton_schulz (fp32 compute by default) on a backend, with NaN-filled outputs and workspaces."""
    kwargs.setdefault("compute_dtype", torch.float32)
    with poisoned_allocations():
        out = fastoptim.newton_schulz(G, backend=backend, **kwargs)
    assert out.shape == G.shape and out.dtype == kwargs["compute_dtype"]
    assert out.is_contiguous() and out.device == G.device
    return out


def check(backend: str, G: torch.Tensor, float64: bool = True, **kwargs) -> torch.Tensor:
    """The backend's result, checked: a kernel against the torch backend on the same input; the torch
    backend (float64=True) against the same iteration in float64."""
    out = run(backend, G, **kwargs)
    if backend != "torch":
        assert_matrix_close(out, fastoptim.newton_schulz(G, backend="torch", **{"compute_dtype": torch.float32,
                                                                                 **kwargs}))
    elif float64:
        exact = fastoptim.newton_schulz(G.double(), backend="torch", **{**kwargs, "compute_dtype": torch.float64})
        assert_matrix_close(out, exact)
    return out


# On the CPU the block-crossing shape runs two steps: five in the interpreter take seconds.
NS_SHAPES = [*MATRICES, *STACKS, (130, 257)]
SCHEDULE_CASES = [
    pytest.param(schedule, param.values[0], id=f"{schedule}-{param.id}",
                 marks=[*param.marks, *(() if schedule == "jordan" else (pytest.mark.not_interpreted,))])
    for schedule in SCHEDULES
    for param in shape_params(*NS_SHAPES, *LARGE)
]


@pytest.mark.parametrize("schedule, shape", SCHEDULE_CASES)
def test_matches_torch(backend, schedule, shape):
    device = device_for(backend)
    steps = 2 if shape in BLOCKS and device.type == "cpu" else None
    check(backend, torch.randn(shape, device=device), coefficients=schedule, steps=steps)


# Jordan's schedule runs on every shape in test_matches_torch.
@pytest.mark.parametrize("coefficients", ["you", "polar_express", USER_SCHEDULE], ids=["you", "polar_express", "user"])
@pytest.mark.parametrize("shape", shape_params((20, 36), (36, 20)))
def test_every_schedule(backend, coefficients, shape):
    check(backend, torch.randn(shape, device=device_for(backend)), coefficients=coefficients)


@pytest.mark.parametrize("steps", [0, 1, 7])
@pytest.mark.parametrize("shape", shape_params((2, 9, 40), (40, 9)))
def test_step_counts(backend, steps, shape):
    check(backend, torch.randn(shape, device=device_for(backend)), steps=steps, coefficients="polar_express")


@pytest.mark.parametrize("layout", ["transposed", "float64", "bfloat16"])
def test_input_layouts_and_dtypes(backend, layout):
    """G is read through its strides (no copy) and normalized in fp32 (fp64 for an fp64 G)."""
    device = device_for(backend)
    if layout == "transposed":
        G = torch.randn(2, 30, 12, device=device).mT
    else:
        G = torch.randn(12, 30, device=device).to(getattr(torch, layout))
    if backend == "cuda" and layout == "float64":  # its prologue reads 32- and 16-bit input only
        with pytest.raises(fastoptim.BackendUnavailableError, match="float64"):
            fastoptim.newton_schulz(G, steps=2, compute_dtype=torch.float32, backend="cuda")
        return
    out = check(backend, G, steps=2)
    if layout == "transposed":
        assert_matrix_close(out, run(backend, G.contiguous(), steps=2))


def test_zero_matrix(backend):
    out = check(backend, torch.zeros(2, 7, 12, device=device_for(backend)))
    assert (out == 0).all()


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_extreme_scales(backend, scale):
    """1e-30: the fp32 sum of squares underflows to 0 and X = G / eps; 1e30: it overflows, X = 0.
    Either way the output is finite, and the kernels' equal the torch backend's (float64 math, where
    neither happens, is another function here)."""
    out = check(backend, torch.randn(9, 14, device=device_for(backend)) * scale, float64=False)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", shape_params(*EMPTY))
def test_empty(backend, compute_dtype, shape):
    run(backend, torch.randn(shape, device=device_for(backend)), compute_dtype=compute_dtype)


@pytest.mark.parametrize("shape", shape_params((33, 70), (70, 33), (3, 20, 17)))
def test_normalized_input_matches_torch(backend, shape):
    G = torch.randn(shape, device=device_for(backend))
    X0 = G / (torch.linalg.matrix_norm(G, keepdim=True) + 1e-7)
    assert_matrix_close(check(backend, X0, normalized=True), run("torch", G))


@pytest.mark.parametrize("steps", [0, 1, 2, 5])
@pytest.mark.parametrize(
    "compute_dtype",
    [pytest.param(torch.float32, id="fp32"),
     pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.not_interpreted)],
)
def test_normalized_input_is_read_not_written(backend, steps, compute_dtype):
    G = torch.randn(2, 24, 40, device=device_for(backend))
    X0 = (G / (torch.linalg.matrix_norm(G, keepdim=True) + 1e-7)).to(compute_dtype)
    before = X0.clone()
    kwargs = dict(steps=steps, compute_dtype=compute_dtype, normalized=True)
    out = run(backend, X0, **kwargs)
    assert torch.equal(X0, before) and out.data_ptr() != X0.data_ptr()
    expected = fastoptim.newton_schulz(before, backend="torch", **kwargs)
    if compute_dtype == torch.float32:
        assert_matrix_close(out, expected)
    else:
        assert_close(out, expected)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    "shape", shape_params((24, 40), (40, 24)) + large_params((512, 1024), (1024, 512), (48, 768, 768), (4096, 4096))
)
def test_16bit_error_within_twice_torch(backend, compute_dtype, shape):
    """Flash-attention's rule against a float64 run of the same iteration (matrix by matrix)."""
    G = torch.randn(shape, device=device_for(backend))
    exact = reference.newton_schulz(G.double(), None, "jordan", 1e-7, torch.float64)
    out = run(backend, G, compute_dtype=compute_dtype)
    plain = reference.newton_schulz(G, None, "jordan", 1e-7, compute_dtype)
    assert_error_within_ratio(out, plain, exact)


@pytest.mark.not_interpreted  # the interpreter runs programs one after another: nothing to race
@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("shape", shape_params((2, 24, 40)) + large_params((4, 2048, 3072)))
def test_deterministic(backend, shape):
    """No float atomics: partial sums are reduced in a fixed order, so repeated runs agree bit for bit."""
    G = torch.randn(shape, device=device_for(backend))
    first = run(backend, G, compute_dtype=torch.bfloat16)
    for _ in range(4):
        assert torch.equal(run(backend, G, compute_dtype=torch.bfloat16), first)


@pytest.mark.parametrize("backend", KERNELS)
def test_float64_compute_and_integer_input_are_refused_with_the_reason(backend):
    device = device_for(backend)
    G = torch.randn(4, 6, device=device)
    compute_reason, input_reason = {"triton": ("float64 is not supported by tl.dot", "floating-point"),
                                    "cuda": ("float64", "int32")}[backend]
    with pytest.raises(fastoptim.BackendUnavailableError, match=compute_reason):
        fastoptim.newton_schulz(G, backend=backend, compute_dtype=torch.float64)
    schedule = resolve("jordan", None)
    assert backends.select("newton_schulz", backend, device, (G, schedule, 1e-7, torch.float32, False)) == backend
    with pytest.raises(fastoptim.BackendUnavailableError, match=input_reason):
        backends.select("newton_schulz", backend, device, (G.to(torch.int32), schedule, 1e-7, torch.float32, False))


# --------------------------------------------------------------------------------------------------
# Triton internals


def _ns_modules():
    pytest.importorskip("triton")
    from fastoptim.triton_kernels import _ns_kernels
    from fastoptim.triton_kernels import newton_schulz as ns

    return ns, _ns_kernels


@pytest.mark.triton
@pytest.mark.parametrize("shape", shape_params((50, 37), (37, 50), (2, 40, 40)))
def test_triton_many_tiles_small_blocks(shape):
    """Blocks of 16 put several tiles on each side of the Gram matrix: the upper-triangle enumeration,
    the mirrored stores and the edge masks of partial tiles are all exercised."""
    ns, _ = _ns_modules()
    G = torch.randn(shape, device=device_for("triton"))
    schedule = resolve("you", 3)
    config = ns._Config(block=16, block_k=16, num_warps=4, num_stages=2)
    out = ns._newton_schulz(G, schedule, 1e-7, torch.float32, config=config, poison=True)
    assert_matrix_close(out, reference.newton_schulz(G, None, schedule, 1e-7, torch.float32))


@pytest.mark.triton
@pytest.mark.parametrize("has_addend", [False, True], ids=["XXt", "cAA+bA"])
@pytest.mark.parametrize("size", [40, 48])  # three 16-tiles, the last one partial; or all whole
def test_triton_symmetric_product_is_exactly_symmetric(has_addend, size):
    """The epilogue: off-diagonal tiles store themselves and their mirror whole, a diagonal tile its
    upper half and the transpose of it; every element is written (NaN-poisoned output), the result is
    symmetric bit for bit and equals the float64 product."""
    _, kernels = _ns_modules()
    device = device_for("triton")
    X = torch.randn(2, size, 70, device=device)
    A = X @ X.mT
    A = (A + A.mT) / 2  # a symmetric addend / operand, as the iteration's A
    out = torch.full((2, size, size), float("nan"), device=device)
    if has_addend:  # OUT = 0.7·A·A - 1.3·A, Q read row-major as A itself
        p, k, strides, alpha, beta = A, size, (size, 1, size, 1), 0.7, -1.3
        expected = alpha * (A.double() @ A.double()) + beta * A.double()
    else:  # OUT = X Xᵀ: Q = Xᵀ through strides
        p, k, strides, alpha, beta = X, 70, (70, 1, 1, 70), 1.0, 0.0
        expected = X.double() @ X.double().mT
    triangle = 3 * 4 // 2
    kernels._symmetric_product_kernel[(triangle, 2)](
        p, p, A, out, size, k, p.stride(0), *strides[:2], p.stride(0), *strides[2:], out.stride(0), alpha, beta,
        HAS_ADDEND=has_addend, UPCAST=False, BLOCK=16, BLOCK_K=16,
    )
    assert torch.equal(out, out.mT)
    assert_matrix_close(out, expected.float())


@pytest.mark.triton
def test_triton_small_grid_rule():
    """Launches whose 128-row grid has fewer programs than the GPU's SMs take 64-row tiles; the register
    cap that lets two CTAs share an SM is for aligned 16-bit 128-row tiles on sm_90 only."""
    ns, _ = _ns_modules()
    bf16 = torch.bfloat16
    # One 768 x 3072 matrix on 132 SMs: 21 Gram tiles of 128 -> 64-row tiles; its update has 6 x 24 = 144.
    gram, update = ns._configs(1, 768, 3072, bf16, 132, 90)
    assert (gram.block, update.block) == (64, 128)
    assert gram.max_registers is None and update.max_registers == 128
    tall_gram, tall_update = ns._configs(1, 3072, 768, bf16, 132, 90)
    assert (tall_gram, tall_update) == (gram, update)
    # GPT-2 small's 12 such matrices: 252 Gram tiles fill 132 SMs.
    assert [c.block for c in ns._configs(12, 768, 3072, bf16, 132, 90)] == [128, 128]
    assert [c.block for c in ns._configs(7, 768, 3072, bf16, 132, 90)] == [128, 128]  # 147 tiles
    assert [c.block for c in ns._configs(6, 768, 3072, bf16, 132, 90)] == [64, 128]  # 126 tiles
    # Off a GPU (no SM count) the table decides; fp32, Ampere and unaligned sizes are not capped.
    assert [c.block for c in ns._configs(1, 768, 3072, bf16, None, None)] == [128, 128]
    assert all(c.max_registers is None for c in ns._configs(12, 768, 3072, bf16, 132, 80))
    assert all(c.max_registers is None for c in ns._configs(12, 768, 3072, torch.float32, 132, 90))
    assert all(c.max_registers is None for c in ns._configs(12, 701, 2000, bf16, 132, 90))
    # Gram sizes up to 512 already use 64-row (or 32-row) tiles.
    assert ns._configs(1, 256, 768, bf16, 132, 90) == (ns._config(256, bf16),) * 2


@pytest.mark.triton
def test_triton_launcher_uses_the_small_grid_rule(monkeypatch):
    """The launcher passes its device's SM count and architecture to the rule and launches with what it
    returns (the Gram products and the update with their own tiles)."""
    ns, kernels = _ns_modules()
    seen = []
    monkeypatch.setattr(ns, "_multiprocessor_count", lambda device: 1000)
    monkeypatch.setattr(ns, "_arch", lambda device: 90)

    def configs(batch, m, n, compute_dtype, multiprocessors, arch):
        seen.append((batch, m, n, multiprocessors, arch))
        return ns._Config(16, 16, 4, 2), ns._Config(32, 16, 4, 2)

    monkeypatch.setattr(ns, "_configs", configs)
    blocks = {}
    for name in ("_symmetric_product_kernel", "_product_axpy_kernel"):
        kernel = getattr(kernels, name)

        class Recording:
            def __init__(self, kernel, name):
                self.kernel, self.name = kernel, name

            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    blocks.setdefault(self.name, set()).add(kwargs.get("BLOCK", kwargs.get("BLOCK_M")))
                    return self.kernel[grid](*args, **kwargs)
                return launch

        monkeypatch.setattr(kernels, name, Recording(kernel, name))
    G = torch.randn(3, 40, 50, device=device_for("triton"))
    out = ns._newton_schulz(G, resolve("jordan", 2), 1e-7, torch.float32, poison=True)
    assert seen == [(3, 40, 50, 1000, 90)]
    assert blocks == {"_symmetric_product_kernel": {16}, "_product_axpy_kernel": {32}}
    assert_matrix_close(out, reference.newton_schulz(G, 2, "jordan", 1e-7, torch.float32))


@pytest.mark.triton
def test_triton_long_stack_is_launched_in_chunks(monkeypatch):
    ns, _ = _ns_modules()
    monkeypatch.setattr(ns, "_MAX_BATCH_PER_LAUNCH", 2)
    check("triton", torch.randn(5, 6, 10, device=device_for("triton")), steps=2)


if triton is not None:
    from fastoptim.triton_kernels._ns_kernels import _batch_offset, _row_offset

    @triton.jit
    def _offsets_kernel(out_ptr, index, stride):
        tl.store(out_ptr, _batch_offset(index, stride))
        rows = index + tl.arange(0, 2)
        tl.store(out_ptr + 1 + tl.arange(0, 2), _row_offset(rows, stride))


@pytest.mark.triton
def test_triton_offsets_are_int64():
    """Matrix 319 of a 320 x 2560 x 3072 stack starts past 2^31 elements: the offset helpers that every
    kernel uses must not wrap (an int32 product gives a negative offset here)."""
    _ns_modules()
    stride = 2560 * 3072
    out = torch.zeros(3, dtype=torch.int64, device=device_for("triton"))
    _offsets_kernel[(1,)](out, 319, stride)
    assert out.tolist() == [319 * stride, 319 * stride, 320 * stride]
    assert 319 * stride > 2**31


@pytest.mark.triton
def test_triton_kernels_form_batch_offsets_with_the_int64_helper():
    _, kernels = _ns_modules()
    for kernel in (kernels._sum_squares_kernel, kernels._scale_cast_kernel, kernels._symmetric_product_kernel,
                   kernels._product_axpy_kernel):
        source = inspect.getsource(kernel.fn)
        assert "batch = tl.program_id(1)" in source and "_batch_offset(batch" in source
        assert "batch *" not in source and "* batch" not in source


@pytest.mark.triton
def test_triton_launches_run_under_the_tensors_device_guard(monkeypatch):
    # Triton launches on the current device: a stack on another GPU than the current one must be
    # orthogonalized under a guard for its own device (as the other Triton launchers do).
    ns, _ = _ns_modules()
    guarded = []

    def recording_guard(tensor):
        guarded.append(tensor.device)
        return contextlib.nullcontext()

    monkeypatch.setattr(ns, "device_guard", recording_guard)
    G = torch.randn(2, 8, 12, device=device_for("triton"))
    ns.newton_schulz(G, resolve("jordan"), 1e-7, torch.float32)
    assert guarded == [G.device]


# --------------------------------------------------------------------------------------------------
# cuda internals


@pytest.mark.cuda
def test_cuda_is_graph_capturable():
    G = torch.randn(4, 64, 96, device="cuda")
    expected = fastoptim.newton_schulz(G, backend="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fastoptim.newton_schulz(G, backend="cuda")  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = torch.ops.fastoptim.newton_schulz(G, resolve("jordan").flat(), 1.0, 1e-7, torch.bfloat16, False,
                                                     "cuda")
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, expected)


@pytest.mark.cuda
@pytest.mark.parametrize("shape", shape_params((33, 70), (70, 33), (3, 48, 80), (130, 257)))
def test_cuda_symmetric_path_matches_cublas_path(shape, monkeypatch):
    G = torch.randn(shape, device="cuda")
    monkeypatch.setenv("FASTOPTIM_NS_SYMMETRIC", "0")
    cublas = fastoptim.newton_schulz(G, backend="cuda")
    monkeypatch.setenv("FASTOPTIM_NS_SYMMETRIC", "1")
    symmetric = fastoptim.newton_schulz(G, backend="cuda")
    exact = fastoptim.newton_schulz(G.double(), compute_dtype=torch.float64, backend="torch")
    assert (symmetric.double() - exact).norm() <= 2 * (cublas.double() - exact).norm() + 1e-6
