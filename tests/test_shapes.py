"""Every op on empty, 1xN, Nx1, odd and batched shapes, and in every storage dtype.

The float32/bf16 results must match the same op run on float64 copies within the storage dtype's
tolerance: the ops compute in fp32 whatever they store, so only the rounding of the stored values differs.
"""

from __future__ import annotations

import pytest
import torch

import fastoptim

SHAPES = [(0, 5), (5, 0), (1, 1), (1, 9), (9, 1), (3, 5), (33, 70), (70, 33), (3, 48, 80), (0, 4, 6), (2, 3, 7, 5)]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float64: 1e-12}


def close(got, want, dtype):
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("schedule", ["jordan", "you", "polar_express"])
def test_newton_schulz_shapes(shape, schedule):
    G = torch.randn(shape)
    X = fastoptim.newton_schulz(G, coefficients=schedule, compute_dtype=torch.float32)
    assert X.shape == G.shape and X.dtype == torch.float32 and X.is_contiguous()
    assert torch.isfinite(X).all()
    X64 = fastoptim.newton_schulz(G.double(), coefficients=schedule, compute_dtype=torch.float64)
    torch.testing.assert_close(X.double(), X64, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_update_ops_shapes_and_dtypes(shape, dtype):
    param = torch.randn(shape, dtype=dtype)
    update = torch.randn(shape, dtype=dtype)
    buf = torch.randn(shape, dtype=dtype)
    grad = torch.randn(shape, dtype=dtype)
    v = torch.rand(shape[:-1])
    p64, u64, buf64, g64, v64 = (t.double() for t in (param, update, buf, grad, v))

    out = fastoptim.muon_momentum_(buf, grad, 0.9, True)
    out64 = fastoptim.muon_momentum_(buf64, g64, 0.9, True)
    close(buf, buf64, dtype)
    close(out, out64, dtype)

    fastoptim.muon_apply_(param, update, 0.1, 0.1, 1.5, cautious=True)
    fastoptim.muon_apply_(p64, u64, 0.1, 0.1, 1.5, cautious=True)
    close(param, p64, dtype)

    fastoptim.normuon_step_(param, update, v, 0.1, 0.1, 0.9, 1e-8, 2.0)
    fastoptim.normuon_step_(p64, u64, v64, 0.1, 0.1, 0.9, 1e-8, 2.0)
    close(v, v64, torch.float32)
    close(param, p64, dtype)
    assert torch.isfinite(param).all()


def test_sophia_and_hessian_ema_on_mixed_lists():
    shapes = [(0,), (1,), (4, 5), (3, 48, 80), (2, 0, 3)]
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.bfloat16]
    params = [torch.randn(s, dtype=d) for s, d in zip(shapes, dtypes)]
    grads = [torch.randn(s, dtype=d) for s, d in zip(shapes, dtypes)]
    exp_avgs = [torch.randn(s) for s in shapes]
    hessians = [torch.rand(s) for s in shapes]
    copies = [[t.double() for t in group] for group in (params, grads, exp_avgs, hessians)]
    fraction = fastoptim.sophia_step_(params, grads, exp_avgs, hessians, 0.1, 0.9, 0.5, 0.1, 1e-12, True)
    fraction64 = fastoptim.sophia_step_(*copies, 0.1, 0.9, 0.5, 0.1, 1e-12, True)
    for got, want, dtype in zip(params, copies[0], dtypes):
        close(got, want, dtype)
    assert fraction.item() == pytest.approx(fraction64.item(), abs=1e-3)
    fastoptim.hessian_ema_(hessians, [g.float() ** 2 for g in grads], 0.99)
    fastoptim.hessian_ema_(copies[3], [g.double() ** 2 for g in grads], 0.99)
    for got, want in zip(hessians, copies[3]):
        close(got, want, torch.float32)


def test_empty_lists_are_a_no_op():
    assert fastoptim.sophia_step_([], [], [], [], 0.1) is None
    fraction = fastoptim.sophia_step_([], [], [], [], 0.1, return_unclipped=True)
    assert fraction.item() == 0.0
    fastoptim.hessian_ema_([], [], 0.9)


def test_zero_and_tiny_updates_give_finite_results():
    for scale in (0.0, 1e-30):
        param = torch.randn(6, 10)
        update = torch.randn(6, 10) * scale
        v = torch.zeros(6)
        fastoptim.normuon_step_(param, update, v, 0.1, 0.0, 0.95, 1e-10, 1.0)
        assert torch.isfinite(param).all() and torch.isfinite(v).all()
        X = fastoptim.newton_schulz(update, compute_dtype=torch.float32)
        assert torch.isfinite(X).all()


def test_non_contiguous_inputs():
    G = torch.randn(40, 24).mT  # (24, 40), transposed strides
    X = fastoptim.newton_schulz(G, compute_dtype=torch.float32)
    torch.testing.assert_close(X, fastoptim.newton_schulz(G.contiguous(), compute_dtype=torch.float32))
    param = torch.randn(10, 8)[:, ::2]
    update = torch.randn(10, 4)
    expected = param.clone()
    fastoptim.muon_apply_(expected, update, 0.1, 0.1)
    fastoptim.muon_apply_(param, update, 0.1, 0.1)
    torch.testing.assert_close(param, expected)
