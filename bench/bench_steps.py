"""Memory-bound steps (NorMuon, Sophia, Muon apply) in GB/s against the device-copy ceiling, each
fastoptim backend beside the plain-PyTorch reference, and torch's fused AdamW over the same tensors.

Bytes counted are the minimum any implementation must move (each input read once, each output
written once), so the fraction of the copy bandwidth is an honest efficiency.
"""

from __future__ import annotations

import pytest
import torch

import fastoptim

from benchutil import DEVICE, HAS_CUDA, backends_to_compare, record, rotating, timed

if HAS_CUDA:
    MATRIX_STACKS = [(12, 768, 3072), (12, 3072, 768), (1, 8192, 8192)]
    GPT2_SMALL_ELEMENTS = [50257 * 768, 1024 * 768] + [768 * 2304, 768 * 768, 768 * 3072, 3072 * 768] * 12
else:
    MATRIX_STACKS = [(2, 32, 96)]
    GPT2_SMALL_ELEMENTS = [4000, 500] + [64 * 192, 64 * 64] * 2
UPDATE_DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32


def ids(shape):
    return "x".join(map(str, shape))


def adamw_step_fn(params):
    fused = HAS_CUDA
    optimizer = torch.optim.AdamW(params, lr=1e-3, fused=fused, foreach=not fused)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()  # create the state outside the timed region
    return optimizer.step


@pytest.mark.parametrize("backend", backends_to_compare("normuon_step_"))
@pytest.mark.parametrize("shape", MATRIX_STACKS, ids=ids)
def test_normuon_step(benchmark, ceilings, backend, shape):
    numel = shape[0] * shape[1] * shape[2]
    bytes_moved = numel * (UPDATE_DTYPE.itemsize + 4 + 4) + 2 * shape[0] * shape[1] * 4
    sets = rotating(
        lambda: (torch.randn(shape, device=DEVICE), torch.randn(shape, device=DEVICE, dtype=UPDATE_DTYPE),
                 torch.zeros(shape[:-1], device=DEVICE)),
        bytes_moved,
    )

    def run():
        param, update, v = next(sets)
        fastoptim.normuon_step_(param, update, v, 1e-3, 0.01, 0.95, 1e-10, 1.0, backend=backend)

    benchmark.group = f"normuon_step {ids(shape)}"
    benchmark(timed(run))
    record(benchmark, ceilings, bytes_moved=bytes_moved, impl=f"fastoptim-{backend}", shape=ids(shape))


@pytest.mark.parametrize("backend", backends_to_compare("muon_apply_"))
@pytest.mark.parametrize("shape", MATRIX_STACKS, ids=ids)
def test_muon_apply(benchmark, ceilings, backend, shape):
    numel = shape[0] * shape[1] * shape[2]
    bytes_moved = numel * (UPDATE_DTYPE.itemsize + 4 + 4)
    sets = rotating(
        lambda: (torch.randn(shape, device=DEVICE), torch.randn(shape, device=DEVICE, dtype=UPDATE_DTYPE)),
        bytes_moved,
    )

    def run():
        param, update = next(sets)
        fastoptim.muon_apply_(param, update, 1e-3, 0.01, 1.0, cautious=True, backend=backend)

    benchmark.group = f"muon_apply {ids(shape)}"
    benchmark(timed(run))
    record(benchmark, ceilings, bytes_moved=bytes_moved, impl=f"fastoptim-{backend}", shape=ids(shape))


def sophia_tensors():
    params = [torch.randn(n, device=DEVICE) for n in GPT2_SMALL_ELEMENTS]
    return params, [torch.randn_like(p) for p in params], [torch.zeros_like(p) for p in params], [
        torch.rand_like(p) for p in params
    ]


SOPHIA_BYTES = sum(GPT2_SMALL_ELEMENTS) * 4 * 6  # read p, g, m, h; write p, m


@pytest.mark.parametrize("impl", [f"fastoptim-{b}" for b in backends_to_compare("sophia_step_")] + ["adamw"])
def test_sophia_step_gpt2_small(benchmark, ceilings, impl):
    """One Sophia step over a GPT-2-small-sized list of fp32 tensors; AdamW (fused on GPU) for scale."""
    params, grads, exp_avgs, hessians = sophia_tensors()
    if impl == "adamw":
        step = adamw_step_fn(params)
    else:
        backend = impl.split("-", 1)[1]

        def step():
            fastoptim.sophia_step_(params, grads, exp_avgs, hessians, 1e-4, 0.965, 0.04, 0.1, 1e-15,
                                   backend=backend)

    benchmark.group = "sophia_step gpt2-small"
    benchmark(timed(step))
    adamw_bytes = sum(GPT2_SMALL_ELEMENTS) * 4 * 7  # read p, g, m, v; write p, m, v
    record(benchmark, ceilings, bytes_moved=adamw_bytes if impl == "adamw" else SOPHIA_BYTES, impl=impl,
           shape="gpt2-small")
