"""The Triton normuon_step_ kernels against the torch backend.

Runs in the interpreter on CPU tensors (TRITON_INTERPRET=1, set by conftest.py) and on the GPU
when there is one. The interpreter rounds fp32 -> bf16 toward zero where the GPU and torch round
to nearest, so bf16 storage is compared within a bf16 ulp or two of the parameters.
"""

from __future__ import annotations

import pytest
import torch

import fastoptim
from fastoptim import ops

pytestmark = pytest.mark.triton

SHAPES = [(1, 1), (3, 5), (33, 70), (70, 33), (130, 257), (3, 48, 80), (2, 3, 5, 7), (1, 2100)]
TOLERANCES = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
    torch.bfloat16: {"rtol": 2**-6, "atol": 2e-2},
}


def check_step(
    shape,
    param_dtype,
    update_dtype,
    device,
    *,
    weight_decay=0.1,
    moment_dtype=torch.float32,
    scale=1.0,
    lr=0.05,
    cautious=False,
):
    param = torch.randn(shape, device=device).to(param_dtype)
    update = (torch.randn(shape, device=device) * scale).to(update_dtype)
    second_moment = (torch.rand(shape[:-1], device=device) * scale**2).to(moment_dtype)
    param_ref, moment_ref = param.clone(), second_moment.clone()
    args = dict(lr=lr, weight_decay=weight_decay, beta2=0.9, eps=1e-10, scale=3.0, cautious=cautious)
    ops.normuon_step_(param, update, second_moment, **args, backend="triton")
    ops.normuon_step_(param_ref, update, moment_ref, **args, backend="torch")
    torch.testing.assert_close(second_moment.float(), moment_ref.float(), **TOLERANCES[moment_dtype])
    # A bf16 second moment changes the row scales by up to a bf16 ulp, hence the parameters.
    param_tolerance = TOLERANCES[torch.bfloat16 if moment_dtype == torch.bfloat16 else param_dtype]
    torch.testing.assert_close(param.float(), param_ref.float(), **param_tolerance)
    assert torch.isfinite(param).all() and torch.isfinite(second_moment).all()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_step_matches_torch_fp32(shape, weight_decay, triton_device):
    check_step(shape, torch.float32, torch.float32, triton_device, weight_decay=weight_decay)


@pytest.mark.parametrize("shape", [(3, 5), (33, 70), (3, 48, 80)])
def test_cautious_weight_decay_matches_torch(shape, triton_device):
    # A large decay makes a wrongly decayed coordinate stand out.
    check_step(shape, torch.float32, torch.float32, triton_device, weight_decay=5.0, lr=0.1, cautious=True)


@pytest.mark.parametrize("shape", [(3, 5), (33, 70), (70, 33), (3, 48, 80)])
@pytest.mark.parametrize(
    "param_dtype, update_dtype",
    [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)],
)
def test_step_matches_torch_bf16(shape, param_dtype, update_dtype, triton_device):
    check_step(shape, param_dtype, update_dtype, triton_device)


def test_step_bf16_second_moment(triton_device):
    check_step((33, 70), torch.float32, torch.float32, triton_device, moment_dtype=torch.bfloat16)


@pytest.mark.parametrize("scale", [0.0, 1e-30])
def test_zeros_and_tiny_updates_give_finite_results(scale, triton_device):
    check_step((33, 70), torch.float32, torch.float32, triton_device, scale=scale)


def test_row_scale_is_applied_per_row(triton_device):
    # Rows of very different size: after the step every row of lr·scale·Ô has about the same RMS.
    update = (
        torch.randn(6, 40, device=triton_device) * torch.logspace(-3, 3, 6, device=triton_device)[:, None]
    )
    param = torch.zeros(6, 40, device=triton_device)
    second_moment = torch.zeros(6, device=triton_device)
    ops.normuon_step_(param, update, second_moment, lr=1.0, beta2=0.0, scale=1.0, backend="triton")
    row_rms = param.pow(2).mean(dim=1).sqrt()
    torch.testing.assert_close(row_rms, row_rms.mean().expand(6), rtol=1e-4, atol=0)
    torch.testing.assert_close(
        torch.linalg.matrix_norm(param), torch.linalg.matrix_norm(update), rtol=1e-4, atol=0
    )


@pytest.mark.parametrize("shape", [(4, 0), (2, 3, 0)])
def test_no_columns_moves_second_moment_toward_zero(shape, triton_device):
    param = torch.empty(shape, device=triton_device)
    second_moment = torch.rand(shape[:-1], device=triton_device) + 0.5
    moment_ref = second_moment.clone()
    ops.normuon_step_(param, param.clone(), second_moment, lr=0.1, beta2=0.9, backend="triton")
    ops.normuon_step_(param.clone(), param.clone(), moment_ref, lr=0.1, beta2=0.9, backend="torch")
    torch.testing.assert_close(second_moment, moment_ref)
    assert (second_moment < 0.9 * 1.5 + 1e-6).all()


@pytest.mark.parametrize("shape", [(0, 5), (0, 4, 5), (3, 0, 5)])
def test_empty_stacks(shape, triton_device):
    param = torch.empty(shape, device=triton_device)
    second_moment = torch.empty(shape[:-1], device=triton_device)
    ops.normuon_step_(param, param.clone(), second_moment, lr=0.1, backend="triton")


def test_deterministic(triton_device):
    update = torch.randn(3, 130, 257, device=triton_device)
    results = []
    for _ in range(2):
        param = torch.ones(3, 130, 257, device=triton_device)
        second_moment = torch.ones(3, 130, device=triton_device)
        ops.normuon_step_(param, update, second_moment, lr=0.1, backend="triton")
        results.append((param, second_moment))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_float64_is_refused_and_left_unchanged(triton_device):
    param = torch.randn(3, 5, dtype=torch.float64, device=triton_device)
    second_moment = torch.rand(3, dtype=torch.float64, device=triton_device)
    before = (param.clone(), second_moment.clone())
    with pytest.raises(fastoptim.BackendUnavailableError, match="float64"):
        ops.normuon_step_(param, param.clone(), second_moment, lr=0.1, backend="triton")
    assert torch.equal(param, before[0]) and torch.equal(second_moment, before[1])


def test_non_contiguous_is_refused(triton_device):
    update = torch.randn(5, 3, device=triton_device).mT
    with pytest.raises(fastoptim.BackendUnavailableError, match="contiguous"):
        ops.normuon_step_(
            torch.randn(3, 5, device=triton_device),
            update,
            torch.rand(3, device=triton_device),
            lr=0.1,
            backend="triton",
        )


@pytest.mark.cuda
@pytest.mark.parametrize(
    "shape", [(1, 1), (33, 70), (70, 33), (3, 48, 80), (1024, 4096), (4096, 1024), (8, 512, 1536)]
)
@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float32])
def test_step_bf16_on_gpu(shape, param_dtype):
    check_step(shape, param_dtype, torch.bfloat16, torch.device("cuda"))


def test_opcheck(triton_device):
    param, update = torch.randn(2, 3, 5, device=triton_device), torch.randn(2, 3, 5, device=triton_device)
    second_moment = torch.rand(2, 3, device=triton_device)
    args = (param, update, second_moment, 0.1, 0.1, 0.9, 1e-8, 1.0, True, "triton")
    torch.library.opcheck(ops._normuon_step_op, args)
