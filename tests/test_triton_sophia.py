"""The Triton multi-tensor sophia_step_ / hessian_ema_ kernels against the torch backend.

Runs in the interpreter on CPU tensors (TRITON_INTERPRET=1, set by conftest.py) and on the GPU
when there is one. The interpreter rounds fp32 -> bf16 toward zero where the GPU and torch round
to nearest, so bf16 storage is compared within a bf16 ulp or two, and the unclipped fraction with
bf16 states within a few coordinates' worth.
"""

from __future__ import annotations

import pytest
import torch

import fastoptim
from fastoptim import ops, triton_kernels
from fastoptim.triton_kernels import _common as triton_common

pytestmark = pytest.mark.triton

# Mixed sizes: empty, one element, odd, one crossing a chunk boundary (CHUNK = 16384), stacks.
SHAPES = [(33, 70), (0,), (1,), (3, 5), (40000,), (3, 48, 80), (0, 7), (130, 257)]
TOLERANCES = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
    torch.bfloat16: {"rtol": 2**-6, "atol": 2e-2},
}
DTYPE_CASES = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.float32),  # bf16 params and grads, fp32 states
    (torch.bfloat16, torch.bfloat16),
]


def make_lists(shapes, param_dtype, state_dtype, device, hessian="random", scale=1.0):
    params = [torch.randn(s, device=device).to(param_dtype) for s in shapes]
    grads = [(torch.randn(s, device=device) * scale).to(param_dtype) for s in shapes]
    exp_avgs = [(torch.randn(s, device=device) * 0.01 * scale).to(state_dtype) for s in shapes]
    if hessian == "random":  # negative entries included: they are clamped to eps
        hessians = [(torch.randn(s, device=device) * scale).to(state_dtype) for s in shapes]
    elif hessian == "zero":
        hessians = [torch.zeros(s, device=device, dtype=state_dtype) for s in shapes]
    else:
        hessians = [(-torch.rand(s, device=device)).to(state_dtype) for s in shapes]
    return params, grads, exp_avgs, hessians


def clone(tensors):
    return [t.clone() for t in tensors]


def assert_lists_close(actual, expected, dtype):
    for a, e in zip(actual, expected):
        assert a.dtype == e.dtype and a.shape == e.shape
        torch.testing.assert_close(a.float(), e.float(), **TOLERANCES[dtype])


def check_step(
    shapes,
    param_dtype,
    state_dtype,
    device,
    *,
    return_unclipped=True,
    weight_decay=0.1,
    hessian="random",
    scale=1.0,
):
    params, grads, exp_avgs, hessians = make_lists(shapes, param_dtype, state_dtype, device, hessian, scale)
    params_ref, exp_avgs_ref, grads_before = clone(params), clone(exp_avgs), clone(grads)
    args = dict(
        lr=0.05, beta1=0.9, rho=0.04, weight_decay=weight_decay, eps=1e-15, return_unclipped=return_unclipped
    )
    fraction = ops.sophia_step_(params, grads, exp_avgs, hessians, **args, backend="triton")
    expected = ops.sophia_step_(params_ref, grads, exp_avgs_ref, hessians, **args, backend="torch")
    assert_lists_close(exp_avgs, exp_avgs_ref, state_dtype)
    tolerance = torch.bfloat16 if torch.bfloat16 in (param_dtype, state_dtype) else torch.float32
    assert_lists_close(params, params_ref, tolerance)
    assert all(torch.equal(g, b) for g, b in zip(grads, grads_before))
    assert all(torch.isfinite(p).all() for p in params)
    if not return_unclipped:
        assert fraction is None and expected is None
        return
    assert fraction.dtype == torch.float32 and fraction.shape == () and fraction.device == params[0].device
    # bf16 states: the interpreter's rounding can move a few ratios across |ratio| = 1.
    atol = 1e-6 if state_dtype == torch.float32 else 2e-3
    torch.testing.assert_close(fraction, expected, rtol=1e-6, atol=atol)


@pytest.mark.parametrize("param_dtype, state_dtype", DTYPE_CASES)
@pytest.mark.parametrize("return_unclipped", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_step_matches_torch(param_dtype, state_dtype, return_unclipped, weight_decay, triton_device):
    check_step(
        SHAPES,
        param_dtype,
        state_dtype,
        triton_device,
        return_unclipped=return_unclipped,
        weight_decay=weight_decay,
    )


@pytest.mark.parametrize("hessian", ["zero", "negative"])
def test_zero_and_negative_hessians(hessian, triton_device):
    check_step(SHAPES[:4], torch.float32, torch.float32, triton_device, hessian=hessian)


@pytest.mark.parametrize("scale", [0.0, 1e-30])
def test_zeros_and_tiny_values_give_finite_results(scale, triton_device):
    check_step(SHAPES[:4], torch.float32, torch.float32, triton_device, scale=scale)


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (33, 70), (70, 33), (130, 257), (3, 48, 80), (2, 3, 5, 7)])
def test_single_tensor_shapes(shape, triton_device):
    check_step([shape], torch.float32, torch.float32, triton_device)


def test_mixed_dtypes_within_a_list(triton_device):
    # Two dtype combinations: two launches, one fraction over all coordinates.
    params, grads, exp_avgs, hessians = make_lists(SHAPES, torch.float32, torch.float32, triton_device)
    for i in (0, 3, 5):
        params[i], grads[i] = params[i].bfloat16(), grads[i].bfloat16()
    params_ref, exp_avgs_ref = clone(params), clone(exp_avgs)
    args = dict(lr=0.05, return_unclipped=True)
    fraction = ops.sophia_step_(params, grads, exp_avgs, hessians, **args, backend="triton")
    expected = ops.sophia_step_(params_ref, grads, exp_avgs_ref, hessians, **args, backend="torch")
    assert_lists_close(exp_avgs, exp_avgs_ref, torch.float32)
    assert_lists_close(params, params_ref, torch.bfloat16)
    torch.testing.assert_close(fraction, expected, rtol=1e-6, atol=1e-6)
    tables = triton_common.chunk_tables((params, grads, exp_avgs, hessians), params[0].device)
    assert len(tables) == 2
    expected_chunks = sum(-(-p.numel() // triton_common.CHUNK) for p in params)
    assert sum(table.shape[0] for _, _, table in tables) == expected_chunks


def test_chunk_table_rows_and_cache(triton_device):
    # One row per CHUNK-element chunk of every non-empty tensor: (addresses..., numel, chunk index), in
    # list order within each dtype combination; a second call with the same tensors hits the cache.
    chunk = triton_common.CHUNK
    a = [torch.zeros(n, device=triton_device) for n in (chunk + 1, 0, 3, 2 * chunk)]
    b = [torch.zeros(n, device=triton_device, dtype=torch.bfloat16 if i == 2 else torch.float32)
         for i, n in enumerate((chunk + 1, 0, 3, 2 * chunk))]
    tables = triton_common.chunk_tables((a, b), triton_device)
    expected = {}
    for x, y in zip(a, b):
        for c in range(-(-x.numel() // chunk)):
            expected.setdefault((x.dtype, y.dtype), []).append([x.data_ptr(), y.data_ptr(), x.numel(), c])
    assert {dtypes: table.cpu().tolist() for dtypes, _, table in tables} == expected
    assert all(aligned for _, aligned, _ in tables)
    again = triton_common.chunk_tables((a, b), triton_device)
    assert all(t1 is t2 for (_, _, t1), (_, _, t2) in zip(tables, again))
    misaligned = [torch.zeros(9, device=triton_device)[1:]]
    ((_, aligned, _),) = triton_common.chunk_tables((misaligned, misaligned), triton_device)
    assert not aligned


def test_unclipped_out_is_written(triton_device):
    params, grads, exp_avgs, hessians = make_lists(SHAPES[:4], torch.float32, torch.float32, triton_device)
    params_ref, exp_avgs_ref = clone(params), clone(exp_avgs)
    out = torch.full((), float("nan"), device=triton_device)
    triton_kernels.OPS["sophia_step_"](params, grads, exp_avgs, hessians, out, 0.05, 0.9, 0.04, 0.1, 1e-15)
    expected = fastoptim.reference.sophia_step_(
        params_ref, grads, exp_avgs_ref, hessians, 0.05, 0.9, 0.04, 0.1, 1e-15, True
    )
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_only_empty_tensors(triton_device):
    params = [torch.empty(0, device=triton_device), torch.empty(3, 0, device=triton_device)]
    fraction = ops.sophia_step_(
        params, clone(params), clone(params), clone(params), lr=0.1, return_unclipped=True, backend="triton"
    )
    assert fraction.item() == 0.0


def test_repeated_steps_reuse_tables(triton_device):
    # The chunk table is cached by addresses and sizes; later steps must see the updated values.
    params, grads, exp_avgs, hessians = make_lists(SHAPES[:5], torch.float32, torch.float32, triton_device)
    params_ref, exp_avgs_ref = clone(params), clone(exp_avgs)
    for _ in range(3):
        ops.sophia_step_(params, grads, exp_avgs, hessians, lr=0.05, backend="triton")
        ops.sophia_step_(params_ref, grads, exp_avgs_ref, hessians, lr=0.05, backend="torch")
    assert_lists_close(params, params_ref, torch.float32)
    assert_lists_close(exp_avgs, exp_avgs_ref, torch.float32)


@pytest.mark.parametrize(
    "hessian_dtype, estimate_dtype",
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float32, torch.bfloat16),
        (torch.bfloat16, torch.float32),
    ],
)
@pytest.mark.parametrize("beta2", [0.0, 0.5, 0.99])
def test_hessian_ema_matches_torch(hessian_dtype, estimate_dtype, beta2, triton_device):
    hessians = [torch.rand(s, device=triton_device).to(hessian_dtype) for s in SHAPES]
    estimates = [torch.randn(s, device=triton_device).pow(2).to(estimate_dtype) for s in SHAPES]
    hessians_ref, estimates_before = clone(hessians), clone(estimates)
    ops.hessian_ema_(hessians, estimates, beta2, backend="triton")
    ops.hessian_ema_(hessians_ref, estimates, beta2, backend="torch")
    assert_lists_close(hessians, hessians_ref, hessian_dtype)
    assert all(torch.equal(e, b) for e, b in zip(estimates, estimates_before))


@pytest.mark.parametrize("scale", [0.0, 1e-30])
def test_hessian_ema_zeros_and_tiny_values(scale, triton_device):
    hessians = [torch.rand(s, device=triton_device) * scale for s in SHAPES]
    estimates = [torch.rand(s, device=triton_device) * scale for s in SHAPES]
    hessians_ref = clone(hessians)
    ops.hessian_ema_(hessians, estimates, 0.99, backend="triton")
    ops.hessian_ema_(hessians_ref, estimates, 0.99, backend="torch")
    assert_lists_close(hessians, hessians_ref, torch.float32)


def test_float64_is_refused_and_left_unchanged(triton_device):
    params, grads, exp_avgs, hessians = make_lists(
        [(3, 5), (4,)], torch.float32, torch.float32, triton_device
    )
    hessians[1] = hessians[1].double()
    before = clone(params)
    with pytest.raises(fastoptim.BackendUnavailableError, match=r"hessians\[1\].*float64"):
        ops.sophia_step_(params, grads, exp_avgs, hessians, lr=0.1, backend="triton")
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    with pytest.raises(fastoptim.BackendUnavailableError, match="float64"):
        ops.hessian_ema_(hessians, clone(hessians), 0.9, backend="triton")


def test_non_contiguous_is_refused(triton_device):
    params, grads, exp_avgs, hessians = make_lists([(3, 5)], torch.float32, torch.float32, triton_device)
    params = [torch.randn(5, 3, device=triton_device).mT]
    with pytest.raises(fastoptim.BackendUnavailableError, match="contiguous"):
        ops.sophia_step_(params, grads, exp_avgs, hessians, lr=0.1, backend="triton")


GPU_SHAPES = [(1024, 4096), (0,), (1,), (4097,), (3, 48, 80), (50257, 768), (768,)]


@pytest.mark.cuda
@pytest.mark.parametrize("param_dtype, state_dtype", DTYPE_CASES)
@pytest.mark.parametrize("return_unclipped", [True, False])
def test_step_bf16_on_gpu(param_dtype, state_dtype, return_unclipped):
    check_step(GPU_SHAPES, param_dtype, state_dtype, torch.device("cuda"), return_unclipped=return_unclipped)


@pytest.mark.cuda
def test_step_unaligned_views_on_gpu():
    # Views at odd offsets into one buffer: the tables are then launched without alignment hints.
    buffer = torch.randn(3 * 4097 + 1, device="cuda")
    params = [buffer[1 + i * 4097 : 1 + (i + 1) * 4097] for i in range(3)]
    _, grads, exp_avgs, hessians = make_lists(
        [(4097,)] * 3, torch.float32, torch.float32, torch.device("cuda")
    )
    params_ref, exp_avgs_ref = clone(params), clone(exp_avgs)
    ops.sophia_step_(params, grads, exp_avgs, hessians, lr=0.05, backend="triton")
    ops.sophia_step_(params_ref, grads, exp_avgs_ref, hessians, lr=0.05, backend="torch")
    assert_lists_close(params, params_ref, torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("hessian_dtype", [torch.bfloat16, torch.float32])
def test_hessian_ema_bf16_on_gpu(hessian_dtype):
    hessians = [torch.rand(s, device="cuda").to(hessian_dtype) for s in GPU_SHAPES]
    estimates = [torch.rand(s, device="cuda").bfloat16() for s in GPU_SHAPES]
    hessians_ref = clone(hessians)
    ops.hessian_ema_(hessians, estimates, 0.99, backend="triton")
    ops.hessian_ema_(hessians_ref, estimates, 0.99, backend="torch")
    assert_lists_close(hessians, hessians_ref, hessian_dtype)


def test_opcheck(triton_device):
    def lists():
        return [torch.randn(3, 5, device=triton_device), torch.randn(7, device=triton_device)]

    unclipped = torch.zeros((), device=triton_device)
    args = (lists(), lists(), lists(), lists(), unclipped, 0.1, 0.9, 0.04, 0.1, 1e-15, "triton")
    torch.library.opcheck(ops._sophia_step_op, args)
    torch.library.opcheck(ops._hessian_ema_op, (lists(), lists(), 0.9, "triton"))
