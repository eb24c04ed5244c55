"""sophia_step_ and hessian_ema_ (multi-tensor, over lists) on every backend.

Each kernel is compared with the torch backend on the same lists, the torch backend with float64 math
(TOLERANCE of the storage dtype); the unclipped fraction within a few coordinates' worth where the
rounding of 16-bit states (or of fp32 against float64) can move a ratio across |ratio| = 1. The lists
mix sizes: empty, one element, odd, one crossing the Triton chunk (16384 elements), stacks; on a GPU
also more tensors than one cuda table holds (24) and tensors larger than a table's blocks. Tests of one
backend's internals are marked and named for it.
"""

from __future__ import annotations

import pytest
import torch
from ops_testing import (
    BLOCKS,
    LARGE,
    MATRICES,
    STACKS,
    TOLERANCE,
    assert_close,
    assert_equal,
    backend_params,
    device_for,
    dtype_pairs,
    shape_params,
)

import fastoptim

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
KERNELS = backend_params("triton", "cuda")

LISTS = {
    "mixed": [(33, 70), (0,), (1,), (3, 5), (40000,), (3, 48, 80), (0, 7)],
    # GPU sizes: more tensors than a cuda table holds (96), tensors larger than its blocks (2048 x 65536), a
    # GPT-2 embedding.
    "many": [(1024, 4096), (0,), (1,), (7,), (4097,), (65536,), (65537,), (300_000,), (3, 48, 80), (50257, 768),
             (768,), *[(1000 + i,) for i in range(100)], (2048 * 65536 + 5,)],
}
LIST_PARAMS = [pytest.param("mixed", id="mixed"), pytest.param("many", id="many", marks=pytest.mark.large)]
CHUNK_CROSSING = (40000,)  # three 16384-element chunks of the Triton tables: a size for the kernels


def list_shapes(kind: str, backend: str) -> list[tuple[int, ...]]:
    return [s for s in LISTS[kind] if backend != "torch" or s != CHUNK_CROSSING]


# (param and grad dtype, exp_avg and hessian dtype): the cuda kernel takes grads of the params' dtype
# and hessians of the exp_avgs'. 16-bit states with wider grads are for the kernels only: the torch
# backend rounds the grad to the state's dtype before the EMA, float64 math does not, and where the
# momentum cancels to near zero its sign, hence a clipped step (by 2·lr), differs.
STEP_DTYPES = (
    dtype_pairs((F32, F32), (BF16, F32), (BF16, BF16), (F16, F32),
                interpreted=((F32, F32), (BF16, F32), (BF16, BF16)), kernels_only=False)
    + dtype_pairs((F32, BF16), (F16, BF16), interpreted=(), kernels_only=True)
)


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


def assert_lists_close(got, want, dtype=None):
    for a, b in zip(got, want, strict=True):
        assert_close(a, b, dtype)


def step(backend, lists, return_unclipped=True, **kwargs):
    args = dict(lr=0.05, beta1=0.9, rho=0.04, weight_decay=0.1, eps=1e-15, return_unclipped=return_unclipped)
    return fastoptim.sophia_step_(*lists, **{**args, **kwargs}, backend=backend)


def check_step(backend, lists, *, return_unclipped=True, **kwargs):
    """sophia_step_ on `backend` against the torch backend (float64 math for the torch backend);
    returns the fraction."""
    params, grads, exp_avgs, hessians = lists
    spec, grads_before = [clone(t) for t in lists], clone(grads)
    fraction = step(backend, lists, return_unclipped, **kwargs)
    float64 = backend == "torch"
    if float64:
        spec = [[t.double() for t in ts] for ts in spec]
    expected = step("torch", spec, return_unclipped, **kwargs)
    assert_lists_close(exp_avgs, spec[2])
    for param, exp_avg, want in zip(params, exp_avgs, spec[0]):
        # A 16-bit state moves the ratio, hence the parameter, by its rounding: the looser tolerance applies.
        assert_close(param, want, max((param.dtype, exp_avg.dtype), key=lambda d: TOLERANCE[d].atol))
    assert_equal(grads, grads_before)
    assert all(torch.isfinite(p).all() for p in params)
    if not return_unclipped:
        assert fraction is None and expected is None
        return None
    assert fraction.dtype == F32 and fraction.shape == () and fraction.device == params[0].device
    # 16-bit states, or fp32 against float64: rounding can move a few ratios across |ratio| = 1.
    rounding_moves_ratios = float64 or any(t.dtype != F32 for t in exp_avgs + hessians)
    torch.testing.assert_close(fraction.double(), expected.double(), rtol=1e-6,
                               atol=2e-3 if rounding_moves_ratios else 1e-6)
    return fraction


@pytest.mark.parametrize("list_kind", LIST_PARAMS)
@pytest.mark.parametrize("dtypes", STEP_DTYPES)
@pytest.mark.parametrize("return_unclipped", [True, False], ids=["fraction", "no-fraction"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_step_matches_torch(backend, list_kind, dtypes, return_unclipped, weight_decay):
    lists = make_lists(list_shapes(list_kind, backend), *dtypes, device_for(backend))
    check_step(backend, lists, return_unclipped=return_unclipped, weight_decay=weight_decay)


@pytest.mark.parametrize("hessian", ["zero", "negative"])
def test_zero_and_negative_hessians(backend, hessian):
    check_step(backend, make_lists(LISTS["mixed"][:4], F32, F32, device_for(backend), hessian=hessian))


@pytest.mark.parametrize("scale", [0.0, 1e-30])
def test_zeros_and_tiny_values_give_finite_results(backend, scale):
    check_step(backend, make_lists(LISTS["mixed"][:4], F32, F32, device_for(backend), scale=scale))


@pytest.mark.parametrize("shape", shape_params(*MATRICES, *STACKS, *BLOCKS, *LARGE))
def test_single_tensor_shapes(backend, shape):
    check_step(backend, make_lists([shape], F32, F32, device_for(backend)))


def test_mixed_dtypes_within_a_list(backend):
    # Two dtype combinations (two launches), one fraction over all coordinates.
    params, grads, exp_avgs, hessians = make_lists(list_shapes("mixed", backend), F32, F32, device_for(backend))
    for i in (0, 3, 5):
        params[i], grads[i] = params[i].bfloat16(), grads[i].bfloat16()
    check_step(backend, (params, grads, exp_avgs, hessians))


def test_unclipped_out_is_written(backend):
    device = device_for(backend)
    params, grads, exp_avgs, hessians = make_lists(LISTS["mixed"][:4], F32, F32, device)
    expected_params, expected_exp_avgs = clone(params), clone(exp_avgs)
    out = torch.full((), float("nan"), device=device)  # poisoned: the op must write it
    torch.ops.fastoptim.sophia_step_(params, grads, exp_avgs, hessians, out, 0.05, 0.9, 0.04, 0.1, 1e-15, backend)
    expected = fastoptim.reference.sophia_step_(expected_params, grads, expected_exp_avgs, hessians, 0.05, 0.9, 0.04,
                                                0.1, 1e-15, True)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_empty_lists_and_empty_tensors(backend):
    device = device_for(backend)
    assert fastoptim.sophia_step_([], [], [], [], 0.1, backend=backend) is None
    assert fastoptim.sophia_step_([], [], [], [], 0.1, return_unclipped=True, backend=backend).item() == 0.0
    fastoptim.hessian_ema_([], [], 0.9, backend=backend)
    params = [torch.empty(0, device=device), torch.empty(3, 0, device=device)]
    fraction = fastoptim.sophia_step_(params, clone(params), clone(params), clone(params), lr=0.1,
                                      return_unclipped=True, backend=backend)
    assert fraction.item() == 0.0


def test_repeated_steps(backend):
    # The Triton chunk table is cached by addresses and sizes; later steps must see the updated values.
    device = device_for(backend)
    lists = make_lists(list_shapes("mixed", backend)[:5], F32, F32, device)
    expected = [clone(t) for t in lists]
    for _ in range(3):
        step(backend, lists)
        step("torch", expected)
    assert_lists_close(lists[0], expected[0])
    assert_lists_close(lists[2], expected[2])


def test_views_at_odd_offsets(backend):
    # Views one element into one buffer: the Triton tables then launch without alignment hints.
    device = device_for(backend)
    buffer = torch.randn(3 * 4097 + 1, device=device)
    params = [buffer[1 + i * 4097 : 1 + (i + 1) * 4097] for i in range(3)]
    _, grads, exp_avgs, hessians = make_lists([(4097,)] * 3, F32, F32, device)
    check_step(backend, (params, grads, exp_avgs, hessians))


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_nan_and_overflow_propagate_like_torch(backend):
    # NaN in the Hessian or the momentum: torch.clamp passes it on (fmaxf/fminf would drop it). An fp16
    # Hessian EMA of an estimate beyond fp16's range is inf, as the reference casts the estimate first.
    device = device_for(backend)
    params, grads, exp_avgs, hessians = make_lists([(64,)], F32, F32, device)
    hessians[0] = hessians[0].abs()
    hessians[0][3] = float("nan")
    exp_avgs[0][5] = float("nan")
    expected = [clone(t) for t in (params, grads, exp_avgs, hessians)]
    fraction = step(backend, (params, grads, exp_avgs, hessians), lr=0.1)
    expected_fraction = step("torch", expected, lr=0.1)
    assert params[0][3].isnan() and params[0][5].isnan()
    assert_close(params[0], expected[0][0], equal_nan=True)
    torch.testing.assert_close(fraction, expected_fraction)
    h = [torch.ones(4, device=device, dtype=F16)]
    h_expected = clone(h)
    estimates = [torch.full((4,), 1e6, device=device)]
    fastoptim.hessian_ema_(h_expected, estimates, 0.99, backend="torch")
    fastoptim.hessian_ema_(h, estimates, 0.99, backend=backend)
    assert h_expected[0].isinf().all() and torch.equal(h[0], h_expected[0])


@pytest.mark.parametrize("backend", KERNELS)
def test_float64_is_refused_and_left_unchanged(backend):
    device = device_for(backend)
    params, grads, exp_avgs, hessians = make_lists([(3, 5), (4,)], F32, F32, device)
    hessians[1] = hessians[1].double()
    before = clone(params) + clone(exp_avgs)
    reason = {"triton": r"hessians\[1\].*float64", "cuda": "float64"}[backend]
    with pytest.raises(fastoptim.BackendUnavailableError, match=reason):
        fastoptim.sophia_step_(params, grads, exp_avgs, hessians, lr=0.1, backend=backend)
    assert_equal(params + exp_avgs, before)
    with pytest.raises(fastoptim.BackendUnavailableError, match="float64"):
        fastoptim.hessian_ema_(hessians, clone(hessians), 0.9, backend=backend)


@pytest.mark.parametrize("backend", KERNELS)
def test_non_contiguous_is_refused(backend):
    device = device_for(backend)
    _, grads, exp_avgs, hessians = make_lists([(3, 5)], F32, F32, device)
    params = [torch.randn(5, 3, device=device).mT]
    with pytest.raises(fastoptim.BackendUnavailableError, match="contiguous"):
        fastoptim.sophia_step_(params, grads, exp_avgs, hessians, lr=0.1, backend=backend)


# --------------------------------------------------------------------------------------------------
# hessian_ema_


def check_hessian_ema(backend, shapes, hessian_dtype, estimate_dtype, beta2, scale=1.0):
    device = device_for(backend)
    hessians = [(torch.rand(s, device=device) * scale).to(hessian_dtype) for s in shapes]
    estimates = [(torch.randn(s, device=device).pow(2) * scale).to(estimate_dtype) for s in shapes]
    spec, spec_estimates, estimates_before = clone(hessians), estimates, clone(estimates)
    fastoptim.hessian_ema_(hessians, estimates, beta2, backend=backend)
    if backend == "torch":
        spec, spec_estimates = [h.double() for h in spec], [e.double() for e in estimates]
    fastoptim.hessian_ema_(spec, spec_estimates, beta2, backend="torch")
    assert_lists_close(hessians, spec, hessian_dtype)
    assert_equal(estimates, estimates_before)


HESSIAN_DTYPES = dtype_pairs(interpreted=((F32, F32), (BF16, BF16), (F32, BF16), (BF16, F32)))


@pytest.mark.parametrize("list_kind", LIST_PARAMS)
@pytest.mark.parametrize("dtypes", HESSIAN_DTYPES)
@pytest.mark.parametrize("beta2", [0.0, 0.5, 0.99])
def test_hessian_ema_matches_torch(backend, list_kind, dtypes, beta2):
    check_hessian_ema(backend, list_shapes(list_kind, backend), *dtypes, beta2)


@pytest.mark.parametrize("scale", [0.0, 1e-30])
def test_hessian_ema_zeros_and_tiny_values(backend, scale):
    check_hessian_ema(backend, list_shapes("mixed", backend), F32, F32, 0.99, scale=scale)


# --------------------------------------------------------------------------------------------------
# Triton internals: the chunk tables of the multi-tensor kernels


@pytest.mark.triton
def test_triton_mixed_dtypes_make_one_chunk_table_each():
    from fastoptim.triton_kernels import _common

    device = device_for("triton")
    params, grads, exp_avgs, hessians = make_lists(LISTS["mixed"], F32, F32, device)
    for i in (0, 3, 5):
        params[i], grads[i] = params[i].bfloat16(), grads[i].bfloat16()
    tables = _common.chunk_tables((params, grads, exp_avgs, hessians), device)
    assert len(tables) == 2
    expected_chunks = sum(-(-p.numel() // _common.CHUNK) for p in params)
    assert sum(table.shape[0] for _, _, table in tables) == expected_chunks


@pytest.mark.triton
def test_triton_chunk_table_rows_and_cache():
    # One row per CHUNK-element chunk of every non-empty tensor: (addresses..., numel, chunk index), in
    # list order within each dtype combination; a second call with the same tensors hits the cache.
    from fastoptim.triton_kernels import _common

    device, chunk = device_for("triton"), _common.CHUNK
    sizes = (chunk + 1, 0, 3, 2 * chunk)
    a = [torch.zeros(n, device=device) for n in sizes]
    b = [torch.zeros(n, device=device, dtype=BF16 if i == 2 else F32) for i, n in enumerate(sizes)]
    tables = _common.chunk_tables((a, b), device)
    expected = {}
    for x, y in zip(a, b):
        for c in range(-(-x.numel() // chunk)):
            expected.setdefault((x.dtype, y.dtype), []).append([x.data_ptr(), y.data_ptr(), x.numel(), c])
    assert {dtypes: table.cpu().tolist() for dtypes, _, table in tables} == expected
    assert all(aligned for _, aligned, _ in tables)
    again = _common.chunk_tables((a, b), device)
    assert all(t1 is t2 for (_, _, t1), (_, _, t2) in zip(tables, again))
    misaligned = [torch.zeros(9, device=device)[1:]]
    ((_, aligned, _),) = _common.chunk_tables((misaligned, misaligned), device)
    assert not aligned


# --------------------------------------------------------------------------------------------------
# torch.library


@pytest.mark.parametrize("backend", KERNELS)  # the torch backend's are among test_dispatch.py's opcheck cases
def test_opcheck(backend):
    device = device_for(backend)

    def lists():
        return [torch.randn(3, 5, device=device), torch.randn(7, device=device)]

    ops = torch.ops.fastoptim
    unclipped = torch.zeros((), device=device)
    torch.library.opcheck(ops.sophia_step_.default,
                          (lists(), lists(), lists(), lists(), unclipped, 0.1, 0.9, 0.04, 0.1, 1e-15, backend))
    torch.library.opcheck(ops.hessian_ema_.default, (lists(), lists(), 0.9, backend))
