"""The Triton muon_momentum_ / muon_apply_ kernels against the torch backend.

Runs in the interpreter on CPU tensors (TRITON_INTERPRET=1, set by conftest.py) and on the GPU
when there is one. The interpreter rounds fp32 -> bf16 toward zero where the GPU and torch round
to nearest, so bf16 storage is compared within one or two bf16 ulps of the inputs (inputs are N(0, 1), so
an absolute tolerance covers outputs that cancel to near zero).
"""

from __future__ import annotations

import pytest
import torch

import fastoptim
from fastoptim import ops, triton_kernels

pytestmark = pytest.mark.triton

SHAPES = [(1, 1), (3, 5), (33, 70), (70, 33), (130, 257), (3, 48, 80), (2, 3, 5, 7)]
TOLERANCES = {
    torch.float32: {"rtol": 1e-6, "atol": 1e-6},
    torch.float16: {"rtol": 2e-3, "atol": 4e-3},
    torch.bfloat16: {"rtol": 2**-6, "atol": 2e-2},
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == expected.dtype
    torch.testing.assert_close(actual.float(), expected.float(), **TOLERANCES[dtype])


def check_momentum(shape, buf_dtype, grad_dtype, nesterov, beta, device, scale=1.0):
    buf = (torch.randn(shape, device=device) * scale).to(buf_dtype)
    grad = (torch.randn(shape, device=device) * scale).to(grad_dtype)
    buf_ref, grad_before = buf.clone(), grad.clone()
    out = ops.muon_momentum_(buf, grad, beta, nesterov, backend="triton")
    expected = ops.muon_momentum_(buf_ref, grad, beta, nesterov, backend="torch")
    assert_close(buf, buf_ref, buf_dtype)
    assert_close(out, expected, buf_dtype)
    assert torch.equal(grad, grad_before)
    if not nesterov:
        assert out is buf


def check_apply(shape, param_dtype, update_dtype, weight_decay, cautious, device, scale=1.0):
    param = (torch.randn(shape, device=device) * scale).to(param_dtype)
    update = (torch.randn(shape, device=device) * scale).to(update_dtype)
    param_ref = param.clone()
    args = dict(lr=0.02, weight_decay=weight_decay, scale=1.7, cautious=cautious)
    ops.muon_apply_(param, update, **args, backend="triton")
    ops.muon_apply_(param_ref, update, **args, backend="torch")
    assert_close(param, param_ref, param_dtype)
    assert torch.isfinite(param).all()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_momentum_matches_torch(shape, nesterov, dtype, triton_device):
    check_momentum(shape, dtype, dtype, nesterov, 0.95, triton_device)


@pytest.mark.parametrize(
    "buf_dtype, grad_dtype",
    [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float16, torch.float16)],
)
@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 0.95])
def test_momentum_mixed_dtypes_and_betas(buf_dtype, grad_dtype, beta, triton_device):
    check_momentum((33, 70), buf_dtype, grad_dtype, True, beta, triton_device)


@pytest.mark.parametrize("scale", [0.0, 1e-30])
def test_momentum_zeros_and_tiny_values(scale, triton_device):
    check_momentum((33, 70), torch.float32, torch.float32, True, 0.95, triton_device, scale=scale)


def test_momentum_writes_every_output_element(triton_device):
    buf = torch.randn(70, 33, device=triton_device)
    grad = torch.randn(70, 33, device=triton_device)
    out = torch.full_like(buf, float("nan"))
    expected = fastoptim.reference.muon_momentum_(buf.clone(), grad, 0.9, True)
    triton_kernels.OPS["muon_momentum_"](buf, grad, out, 0.9)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("cautious", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_matches_torch(shape, weight_decay, cautious, dtype, triton_device):
    check_apply(shape, dtype, dtype, weight_decay, cautious, triton_device)


@pytest.mark.parametrize(
    "param_dtype, update_dtype",
    [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float16, torch.float32)],
)
def test_apply_mixed_dtypes(param_dtype, update_dtype, triton_device):
    check_apply((130, 257), param_dtype, update_dtype, 0.1, True, triton_device)


@pytest.mark.parametrize("scale", [0.0, 1e-30])
@pytest.mark.parametrize("cautious", [True, False])
def test_apply_zeros_and_tiny_values(scale, cautious, triton_device):
    check_apply((33, 70), torch.float32, torch.float32, 0.1, cautious, triton_device, scale=scale)


def test_apply_cautious_decays_only_where_signs_agree(triton_device):
    param = torch.tensor([[1.0, 1.0, -1.0, -1.0, 2.0]], device=triton_device)
    update = torch.tensor([[1.0, -1.0, -1.0, 1.0, 0.0]], device=triton_device)
    ops.muon_apply_(param, update, lr=0.5, weight_decay=0.2, scale=0.0, cautious=True, backend="triton")
    expected = torch.tensor([[0.9, 1.0, -0.9, -1.0, 1.8]], device=triton_device)
    torch.testing.assert_close(param, expected)


def test_empty_tensors(triton_device):
    buf = torch.empty(0, 5, device=triton_device)
    out = ops.muon_momentum_(buf, torch.empty(0, 5, device=triton_device), 0.9, True, backend="triton")
    assert out.shape == (0, 5)
    ops.muon_apply_(
        torch.empty(4, 0, device=triton_device),
        torch.empty(4, 0, device=triton_device),
        0.1,
        backend="triton",
    )


def test_float64_is_refused(triton_device):
    buf = torch.randn(3, 5, dtype=torch.float64, device=triton_device)
    with pytest.raises(fastoptim.BackendUnavailableError, match="float64"):
        ops.muon_momentum_(buf, buf.clone(), backend="triton")
    with pytest.raises(fastoptim.BackendUnavailableError, match="float64"):
        ops.muon_apply_(buf, buf.clone(), 0.1, backend="triton")


def test_non_contiguous_is_refused_and_left_unchanged(triton_device):
    param = torch.randn(8, 6, device=triton_device).mT
    before = param.clone()
    with pytest.raises(fastoptim.BackendUnavailableError, match="contiguous"):
        ops.muon_apply_(param, torch.randn(6, 8, device=triton_device), 0.1, backend="triton")
    assert torch.equal(param, before)


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(1, 1), (33, 70), (130, 257), (3, 48, 80), (1024, 4096)])
@pytest.mark.parametrize("nesterov", [True, False])
def test_momentum_bf16_on_gpu(shape, nesterov):
    check_momentum(shape, torch.bfloat16, torch.bfloat16, nesterov, 0.95, torch.device("cuda"))
    check_momentum(shape, torch.float32, torch.bfloat16, nesterov, 0.95, torch.device("cuda"))


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(1, 1), (33, 70), (130, 257), (3, 48, 80), (1024, 4096)])
@pytest.mark.parametrize("cautious", [True, False])
def test_apply_bf16_on_gpu(shape, cautious):
    check_apply(shape, torch.bfloat16, torch.bfloat16, 0.1, cautious, torch.device("cuda"))
    check_apply(shape, torch.float32, torch.bfloat16, 0.1, cautious, torch.device("cuda"))


def test_opcheck(triton_device):
    def r(*shape):
        return torch.randn(*shape, device=triton_device)

    torch.library.opcheck(ops._muon_momentum_op, (r(3, 5), r(3, 5), r(3, 5), 0.9, "triton"))
    torch.library.opcheck(ops._muon_momentum_op, (r(3, 5), r(3, 5), None, 0.9, "triton"))
    torch.library.opcheck(ops._muon_apply_op, (r(3, 5), r(3, 5), 0.1, 0.1, 1.5, True, "triton"))
