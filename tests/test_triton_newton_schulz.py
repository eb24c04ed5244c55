"""The Triton newton_schulz against the torch backend and the reference.

Without a GPU the kernels run in the interpreter (TRITON_INTERPRET=1, set by conftest) on CPU
tensors, in fp32 (16-bit compute is upcast to an fp32 tl.dot there). Every workspace and the output
are filled with NaN before the kernels run (`poisoned`), so an element no kernel writes fails.
"""

from __future__ import annotations

import functools
import inspect

import pytest
import torch
import triton
import triton.language as tl

import fastoptim
from fastoptim import reference
from fastoptim.coefficients import resolve

triton_kernels = pytest.importorskip("fastoptim.triton_kernels")
ns_kernels = pytest.importorskip("fastoptim.triton_kernels._ns_kernels")
ns = triton_kernels.newton_schulz

pytestmark = pytest.mark.triton

# Tolerance on max |triton - torch|, relative to the output's max |value| (fp32 on both sides).
RTOL_FP32 = 1e-4
USER_SCHEDULE = [(3.0, -3.2, 1.2), (2.0, -1.5, 0.5)]


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    """Route the public op through the launcher with NaN-filled workspaces and output."""
    launcher = functools.partial(ns._newton_schulz, poison=True)
    monkeypatch.setitem(triton_kernels.OPS, "newton_schulz", launcher)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL_FP32) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert torch.isfinite(actual).all()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, atol=rtol * max(scale, 1e-30), rtol=0.0)


def _both_backends(G, device, **kwargs):
    kwargs.setdefault("compute_dtype", torch.float32)
    out = fastoptim.newton_schulz(G.to(device), backend="triton", **kwargs)
    expected = fastoptim.newton_schulz(G, backend="torch", **kwargs)
    assert out.is_contiguous() and out.device.type == device.type
    return out.cpu(), expected


@pytest.mark.parametrize(
    ("shape", "steps"),
    [
        ((1, 1), None),
        ((3, 5), None),
        ((5, 3), None),
        ((33, 70), None),
        ((70, 33), None),
        ((130, 257), 2),
        ((3, 48, 80), None),
        ((2, 3, 20, 17), None),
    ],
)
def test_matches_torch_and_reference(shape, steps, triton_device):
    G = torch.randn(shape)
    out, expected = _both_backends(G, triton_device, steps=steps)
    _assert_close(out, expected)
    _assert_close(out, reference.newton_schulz(G, steps, "jordan", 1e-7, torch.float32))


@pytest.mark.parametrize("coefficients", ["jordan", "you", "polar_express", USER_SCHEDULE])
@pytest.mark.parametrize("shape", [(20, 36), (36, 20)])
def test_every_schedule(coefficients, shape, triton_device):
    out, expected = _both_backends(torch.randn(shape), triton_device, coefficients=coefficients)
    _assert_close(out, expected)


@pytest.mark.parametrize("steps", [0, 1, 7])
@pytest.mark.parametrize("shape", [(2, 9, 40), (40, 9)])
def test_step_counts(steps, shape, triton_device):
    G = torch.randn(shape)
    out, expected = _both_backends(G, triton_device, steps=steps, coefficients="polar_express")
    _assert_close(out, expected)


@pytest.mark.parametrize("shape", [(50, 37), (37, 50), (2, 40, 40)])
def test_many_tiles_small_blocks(shape, triton_device):
    """Blocks of 16 put several tiles on each side of the Gram matrix: the upper-triangle enumeration,
    the mirrored stores and the edge masks of partial tiles are all exercised."""
    G = torch.randn(shape)
    schedule = resolve("you", 3)
    config = ns._Config(block=16, block_k=16, num_warps=4, num_stages=2)
    out = ns._newton_schulz(G.to(triton_device), schedule, 1e-7, torch.float32, config=config, poison=True)
    _assert_close(out.cpu(), reference.newton_schulz(G, None, schedule, 1e-7, torch.float32))


def test_long_stack_is_launched_in_chunks(monkeypatch, triton_device):
    monkeypatch.setattr(ns, "_MAX_BATCH_PER_LAUNCH", 2)
    out, expected = _both_backends(torch.randn(5, 6, 10), triton_device, steps=2)
    _assert_close(out, expected)


@pytest.mark.parametrize("layout", ["transposed", "float64", "bfloat16"])
def test_input_layouts_and_dtypes(layout, triton_device):
    """G is read through its strides (no copy) and normalized in fp32 (fp64 for an fp64 G)."""
    if layout == "transposed":
        G = torch.randn(2, 30, 12).mT
    else:
        G = torch.randn(12, 30).to(getattr(torch, layout))
    out, expected = _both_backends(G, triton_device, steps=2)
    _assert_close(out, expected)


def test_zero_matrix(triton_device):
    out, expected = _both_backends(torch.zeros(2, 7, 12), triton_device)
    assert torch.isfinite(out).all() and (out == 0).all()
    _assert_close(out, expected)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_extreme_scales(scale, triton_device):
    """1e-30: the fp32 sum of squares underflows to 0 and X = G / eps; 1e30: it overflows, X = 0.
    Either way the output is finite and equal to the reference's."""
    out, expected = _both_backends(torch.randn(9, 14) * scale, triton_device)
    assert torch.isfinite(out).all()
    _assert_close(out, expected)


@pytest.mark.parametrize("shape", [(0, 4, 6), (0, 5), (5, 0), (3, 0, 4)])
def test_empty(shape, triton_device):
    out, expected = _both_backends(torch.randn(shape), triton_device)
    assert out.shape == expected.shape == shape and out.dtype == torch.float32


def test_float64_compute_is_refused_with_the_reason(triton_device):
    G = torch.randn(4, 6, device=triton_device)
    with pytest.raises(fastoptim.BackendUnavailableError, match="float64 is not supported by tl.dot"):
        fastoptim.newton_schulz(G, backend="triton", compute_dtype=torch.float64)
    schedule = resolve("jordan", None)
    assert ns.SUPPORTS["newton_schulz"](G, schedule, 1e-7, torch.float32) is None
    reason = ns.SUPPORTS["newton_schulz"](G.to(torch.int32), schedule, 1e-7, torch.float32)
    assert reason is not None and "floating-point" in reason


@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_16bit_error_within_twice_torch(compute_dtype, shape, triton_device):
    """Accuracy rule: against a float64 run, the kernel's error is at most 2x plain PyTorch's in the
    same dtype (in the interpreter the 16-bit tiles go through an fp32 dot, as on the GPU)."""
    G = torch.randn(shape, dtype=torch.float64)
    exact = reference.newton_schulz(G, None, "jordan", 1e-7, torch.float64)
    out = fastoptim.newton_schulz(G.float().to(triton_device), backend="triton", compute_dtype=compute_dtype)
    plain = reference.newton_schulz(G.float(), None, "jordan", 1e-7, compute_dtype)
    assert out.dtype == compute_dtype and torch.isfinite(out).all()
    error = (out.cpu().double() - exact).norm() / exact.norm()
    plain_error = (plain.double() - exact).norm() / exact.norm()
    assert error <= 2 * plain_error, (error.item(), plain_error.item())


_batch_offset = ns_kernels._batch_offset
_row_offset = ns_kernels._row_offset


@triton.jit
def _offsets_kernel(out_ptr, index, stride):
    tl.store(out_ptr, _batch_offset(index, stride))
    rows = index + tl.arange(0, 2)
    tl.store(out_ptr + 1 + tl.arange(0, 2), _row_offset(rows, stride))


def test_offsets_are_int64(triton_device):
    """Matrix 319 of a 320 x 2560 x 3072 stack starts past 2^31 elements: the offset helpers that every
    kernel uses must not wrap (an int32 product gives a negative offset here)."""
    stride = 2560 * 3072
    out = torch.zeros(3, dtype=torch.int64, device=triton_device)
    _offsets_kernel[(1,)](out, 319, stride)
    assert out.tolist() == [319 * stride, 319 * stride, 320 * stride]
    assert 319 * stride > 2**31


def test_kernels_form_batch_offsets_with_the_int64_helper():
    kernels = [ns_kernels._sum_squares_kernel, ns_kernels._scale_cast_kernel,
               ns_kernels._symmetric_product_kernel, ns_kernels._product_axpy_kernel]
    for kernel in kernels:
        source = inspect.getsource(kernel.fn)
        assert "batch = tl.program_id(1)" in source and "_batch_offset(batch" in source
        assert "batch *" not in source and "* batch" not in source


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(512, 1024), (4096, 4096), (48, 768, 768)])
def test_bf16_error_within_twice_torch_on_gpu(shape):
    G = torch.randn(shape, device="cuda")
    exact = reference.newton_schulz(G.double(), None, "jordan", 1e-7, torch.float64)
    out = fastoptim.newton_schulz(G, backend="triton", compute_dtype=torch.bfloat16)
    plain = reference.newton_schulz(G, None, "jordan", 1e-7, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    dims = (-2, -1)
    error = ((out.double() - exact).norm(dim=dims) / exact.norm(dim=dims)).max()
    plain_error = ((plain.double() - exact).norm(dim=dims) / exact.norm(dim=dims)).max()
    assert error <= 2 * plain_error, (error.item(), plain_error.item())


@pytest.mark.parametrize("shape", [(33, 70), (70, 33), (3, 20, 17)])
def test_normalized_input_matches_torch(shape, triton_device):
    G = torch.randn(shape)
    X0 = G / (torch.linalg.matrix_norm(G, keepdim=True) + 1e-7)
    kwargs = dict(compute_dtype=torch.float32, normalized=True)
    out = fastoptim.newton_schulz(X0.to(triton_device), backend="triton", **kwargs)
    expected = fastoptim.newton_schulz(X0, backend="torch", **kwargs)
    _assert_close(out.cpu(), expected)
    _assert_close(out.cpu(), fastoptim.newton_schulz(G, backend="torch", compute_dtype=torch.float32))


@pytest.mark.parametrize("steps", [0, 1, 2, 5])
def test_normalized_input_is_read_not_written(steps, triton_device):
    G = torch.randn(2, 24, 40)
    X0 = (G / (torch.linalg.matrix_norm(G, keepdim=True) + 1e-7)).to(triton_device)
    before = X0.clone()
    kwargs = dict(steps=steps, compute_dtype=torch.float32, normalized=True)
    out = fastoptim.newton_schulz(X0, backend="triton", **kwargs)
    assert torch.equal(X0, before) and out.data_ptr() != X0.data_ptr()
    _assert_close(out.cpu(), fastoptim.newton_schulz(before.cpu(), backend="torch", **kwargs))


def test_launches_run_under_the_tensors_device_guard(triton_device, monkeypatch):
    # Triton launches on the current device: a stack on another GPU than the current one must be
    # orthogonalized under a guard for its own device (as the other Triton launchers do).
    import contextlib

    from fastoptim.triton_kernels import newton_schulz as module

    guarded = []

    def recording_guard(tensor):
        guarded.append(tensor.device)
        return contextlib.nullcontext()

    monkeypatch.setattr(module, "device_guard", recording_guard)
    G = torch.randn(2, 8, 12, device=triton_device)
    module.newton_schulz(G, fastoptim.coefficients.resolve("jordan"), 1e-7, torch.float32)
    assert guarded == [G.device]
