"""The cuda backend (fastoptim._C) against the torch backend, on a GPU. Skipped without one."""

from __future__ import annotations

import pytest
import torch

import fastoptim

pytestmark = pytest.mark.cuda

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}
SHAPES = [(1, 1), (3, 5), (33, 70), (70, 33), (130, 257), (3, 48, 80), (0, 7), (4097, 1025)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("param_dtype", DTYPES)
@pytest.mark.parametrize("update_dtype", DTYPES)
@pytest.mark.parametrize("cautious", [False, True])
def test_muon_apply_cuda_matches_torch(shape, param_dtype, update_dtype, cautious):
    param = torch.randn(shape, device="cuda", dtype=param_dtype)
    update = torch.randn(shape, device="cuda", dtype=update_dtype)
    expected = param.clone()
    fastoptim.muon_apply_(expected, update, 0.02, 0.1, 1.7, cautious, backend="torch")
    fastoptim.muon_apply_(param, update, 0.02, 0.1, 1.7, cautious, backend="cuda")
    tol = TOLERANCE[param_dtype]
    torch.testing.assert_close(param, expected, rtol=tol, atol=tol)


def test_auto_picks_cuda_for_contiguous_and_falls_back_otherwise():
    from fastoptim import backends

    p = torch.randn(8, 8, device="cuda")
    assert backends.select("muon_apply_", "auto", p.device, (p, p, 0.1, 0.0, 1.0, False)) == "cuda"
    strided = torch.randn(8, 16, device="cuda")[:, ::2]
    assert backends.select("muon_apply_", "auto", p.device, (strided, p, 0.1, 0.0, 1.0, False)) != "cuda"
    with pytest.raises(fastoptim.BackendUnavailableError, match="contiguous"):
        fastoptim.muon_apply_(strided, p, 0.1, backend="cuda")


def test_cuda_kernel_writes_every_element_of_a_large_stack():
    # Crosses the grid-stride limit (65535 blocks x 256 threads < 2^24 elements per pass).
    param = torch.zeros(3, 4096, 2048, device="cuda")
    update = torch.ones_like(param)
    fastoptim.muon_apply_(param, update, 1.0, 0.0, 1.0, backend="cuda")
    assert torch.all(param == -1.0)
