"""The Triton muon_momentum_stack_ against the torch backend (interpreter on CPU, fp32 and 16-bit storage)."""

from __future__ import annotations

import pytest
import torch

import fastoptim
from fastoptim import ops

pytestmark = pytest.mark.triton

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOLERANCE = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
             torch.float16: dict(rtol=2e-3, atol=2e-3)}


def run_both(shapes, m, n, buf_dtypes, grad_dtypes, out_dtype, nesterov, device, **options):
    bufs = [torch.randn(s, device=device).to(d) for s, d in zip(shapes, buf_dtypes)]
    grads = [torch.randn(s, device=device).to(d) for s, d in zip(shapes, grad_dtypes)]
    ref_bufs = [b.clone() for b in bufs]
    out = torch.full((len(shapes), m, n), float("nan"), device=device, dtype=out_dtype)  # unwritten -> NaN
    ref_out = torch.empty_like(out)
    ops.muon_momentum_stack_(bufs, grads, out, 0.9, nesterov, backend="triton", **options)
    ops.muon_momentum_stack_(ref_bufs, grads, ref_out, 0.9, nesterov, backend="torch", **options)
    for got, want in zip(bufs, ref_bufs):
        torch.testing.assert_close(got.float(), want.float(), **TOLERANCE[got.dtype])
    for i, buf_dtype in enumerate(buf_dtypes):
        # The stack holds values rounded to buf's dtype first (the interpreter truncates to bf16 where a
        # GPU rounds), so the looser of the two tolerances applies.
        loosest = max((buf_dtype, out_dtype), key=lambda d: TOLERANCE[d]["atol"])
        torch.testing.assert_close(out[i].float(), ref_out[i].float(), **TOLERANCE[loosest])


@pytest.mark.parametrize("m, n", [(1, 1), (3, 5), (33, 70), (130, 257)])
@pytest.mark.parametrize("nesterov", [True, False])
def test_fp32_matches_torch(m, n, nesterov, triton_device):
    shapes = [(m, n)] * 3
    run_both(shapes, m, n, [torch.float32] * 3, [torch.float32] * 3, torch.float32, nesterov, triton_device)


@pytest.mark.parametrize("out_dtype", DTYPES)
def test_stack_in_another_dtype(out_dtype, triton_device):
    shapes = [(33, 70)] * 2
    run_both(shapes, 33, 70, [torch.float32] * 2, [torch.float32] * 2, out_dtype, True, triton_device)


def test_mixed_dtypes_and_conv_shapes(triton_device):
    # bufs of different dtypes go in different launches; a conv kernel is read as its (out, -1) matrix.
    shapes = [(8, 3, 2, 2), (8, 12), (8, 12)]
    run_both(shapes, 8, 12, [torch.float32, torch.bfloat16, torch.float32],
             [torch.float32, torch.bfloat16, torch.float16], torch.float32, True, triton_device)


def test_chunk_boundary(triton_device):
    # 200 x 200 = 40000 elements: more than two chunks of the chunk table.
    run_both([(200, 200)] * 2, 200, 200, [torch.float32] * 2, [torch.float32] * 2, torch.float32, True,
             triton_device)


def test_float64_is_refused_and_left_unchanged(triton_device):
    bufs = [torch.randn(4, 6, dtype=torch.float64, device=triton_device)]
    before = bufs[0].clone()
    with pytest.raises(fastoptim.BackendUnavailableError, match="float64|dtype"):
        ops.muon_momentum_stack_(bufs, [torch.randn_like(bufs[0])], torch.empty(1, 4, 6, device=triton_device),
                                 0.9, True, backend="triton")
    assert torch.equal(bufs[0], before)


def test_opcheck(triton_device):
    bufs = [torch.randn(4, 6, device=triton_device) for _ in range(2)]
    grads = [torch.randn(4, 6, device=triton_device) for _ in range(2)]
    out = torch.empty(2, 4, 6, device=triton_device)
    torch.library.opcheck(ops._muon_momentum_stack_op, (bufs, grads, out, 0.9, True, False, 1.0, 1e-7, "triton"))
    torch.library.opcheck(ops._muon_momentum_stack_op, (bufs, grads, out, 0.9, True, True, 1.01, 1e-7, "triton"))


@pytest.mark.parametrize("m, n", [(1, 1), (33, 70), (200, 200)])
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_normalize_matches_torch(m, n, out_dtype, triton_device):
    # 200 x 200 = 40000 elements: three chunks, so a matrix's norm is summed from several partials.
    shapes = [(m, n)] * 3
    run_both(shapes, m, n, [torch.float32] * 3, [torch.float32] * 3, out_dtype, True, triton_device,
             normalize=True, safety=1.01, eps=1e-7)


def test_normalize_in_slices_beyond_the_grid_y_limit(triton_device, monkeypatch):
    # A grid's second axis holds 65535 matrices; with the limit lowered to 2, five matrices take three
    # launches (2 + 2 + 1), each on its slice of the stack and of the partials.
    from fastoptim.triton_kernels import muon_stack

    monkeypatch.setattr(muon_stack, "_MAX_GRID_Y", 2)
    shapes = [(200, 200)] * 5  # three chunks per matrix
    run_both(shapes, 200, 200, [torch.float32] * 5, [torch.float32] * 5, torch.float32, True, triton_device,
             normalize=True, safety=1.01, eps=1e-7)


def test_normalize_then_newton_schulz_equals_plain_newton_schulz(triton_device):
    bufs = [torch.randn(20, 30, device=triton_device) for _ in range(2)]
    grads = [torch.randn(20, 30, device=triton_device) for _ in range(2)]
    plain_bufs = [b.clone() for b in bufs]
    stack = torch.empty(2, 20, 30, device=triton_device)
    ops.muon_momentum_stack_(bufs, grads, stack, 0.9, True, backend="triton", normalize=True, safety=1.01)
    fused = ops.newton_schulz(stack, coefficients="polar_express", compute_dtype=torch.float32, normalized=True,
                              backend="triton")
    plain_stack = torch.empty_like(stack)
    ops.muon_momentum_stack_(plain_bufs, grads, plain_stack, 0.9, True, backend="torch")
    plain = ops.newton_schulz(plain_stack, coefficients="polar_express", compute_dtype=torch.float32,
                              backend="torch")
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
