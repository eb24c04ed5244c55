"""Every backend drives the optimizers along the same trajectory as the torch backend.

On CPU the Triton backend runs in the interpreter (fp32); on a GPU the cuda and triton backends run
for real, in fp32 and with the default bf16 Newton–Schulz (looser tolerance)."""

from __future__ import annotations

import pytest
import torch

import fastoptim

SHAPES = [(6, 10), (10, 6), (6, 10), (4, 2, 3), (5,)]


def trajectory(cls, backend, device, ns_dtype, steps=4, **kwargs):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in SHAPES]
    grads = [[torch.randn(s, device=device) for s in SHAPES] for _ in range(steps)]
    matrix_kwargs = {} if cls in (fastoptim.SophiaG, fastoptim.SophiaH) else {"ns_dtype": ns_dtype}
    optimizer = cls(params, backend=backend, **matrix_kwargs, **kwargs)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g
        optimizer.step()
    return [p.detach().float().cpu() for p in params]


OPTIMIZERS = [
    (fastoptim.Muon, dict(lr=0.05, weight_decay=0.1, cautious_weight_decay=True)),
    (fastoptim.NorMuon, dict(lr=0.05, weight_decay=0.1)),
    (fastoptim.NorMuon, dict(lr=0.05, nesterov=False, coefficients="polar_express", scale_mode="match_rms_adamw")),
    (fastoptim.SophiaG, dict(lr=0.01)),
]


@pytest.mark.triton
@pytest.mark.parametrize("cls, kwargs", OPTIMIZERS, ids=lambda x: getattr(x, "__name__", ""))
def test_triton_backend_follows_the_torch_trajectory(cls, kwargs, triton_device):
    expected = trajectory(cls, "torch", triton_device, torch.float32, **kwargs)
    got = trajectory(cls, "triton", triton_device, torch.float32, **kwargs)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("ns_dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("cls, kwargs", OPTIMIZERS, ids=lambda x: getattr(x, "__name__", ""))
def test_gpu_backends_follow_the_torch_trajectory(cls, kwargs, backend, ns_dtype, tolerance):
    expected = trajectory(cls, "torch", "cuda", ns_dtype, **kwargs)
    got = trajectory(cls, backend, "cuda", ns_dtype, **kwargs)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance)
