"""muon_momentum_, muon_momentum_stack_, muon_apply_ and muon_apply_stack_ on every backend.

Each kernel is compared with the torch backend on the same inputs, the torch backend with float64
math (TOLERANCE of the storage dtype). Outputs the ops allocate, and the launchers' workspaces, are NaN
before a kernel runs (`poisoned_allocations`); stacks the test passes are NaN-filled by the test. The
stack ops equal a loop of the per-matrix op of the same backend bit for bit. Two different storage
dtypes are cases for the kernels (the torch backend casts first) and run in the Triton interpreter in
a few tests only; block-crossing sizes are for the kernels, GPU sizes only on a GPU (`large`). Tests of
one backend's internals are marked and named for it.
"""

from __future__ import annotations

import pytest
import torch
from ops_testing import (
    BLOCKS,
    BUCKET_BAD_INPUT,
    DTYPE_NAMES,
    EMPTY,
    KERNELS_ONLY,
    LARGE,
    MATRICES,
    STACKS,
    TOLERANCE,
    assert_bad_bucket_raises,
    assert_close,
    assert_equal,
    backend_params,
    bucket,
    device_for,
    dtype_pairs,
    large_params,
    poisoned_allocations,
    shape_params,
)

import fastoptim
from fastoptim import backends

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
KERNELS = backend_params("triton", "cuda")
SHAPES = shape_params(*MATRICES, *STACKS, *LARGE) + shape_params(*BLOCKS, marks=(KERNELS_ONLY,))
MIXED_PAIRS = [(F32, BF16), (BF16, F32), (F16, F16)]  # with four betas, in the interpreter too

# --------------------------------------------------------------------------------------------------
# muon_momentum_


def check_momentum(backend, shape, buf_dtype, grad_dtype, nesterov, beta=0.95, scale=1.0):
    device = device_for(backend)
    buf = (torch.randn(shape, device=device) * scale).to(buf_dtype)
    grad = (torch.randn(shape, device=device) * scale).to(grad_dtype)
    spec_buf, spec_grad, grad_before = buf.clone(), grad.clone(), grad.clone()
    with poisoned_allocations():
        out = fastoptim.muon_momentum_(buf, grad, beta, nesterov, backend=backend)
    assert torch.equal(grad, grad_before)
    assert (out is buf) == (not nesterov)  # without Nesterov the input of Newton–Schulz is buf itself
    if backend == "torch":
        spec_buf, spec_grad = spec_buf.double(), spec_grad.double()
    expected = fastoptim.muon_momentum_(spec_buf, spec_grad, beta, nesterov, backend="torch")
    assert_close(buf, spec_buf, buf_dtype)
    assert_close(out, expected, buf_dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtypes", dtype_pairs())
@pytest.mark.parametrize("nesterov", [True, False], ids=["nesterov", "plain"])
def test_momentum_matches_torch(backend, shape, dtypes, nesterov):
    check_momentum(backend, shape, *dtypes, nesterov)


@pytest.mark.parametrize("dtypes", dtype_pairs(*MIXED_PAIRS, interpreted=MIXED_PAIRS, kernels_only=False))
@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 0.95])
def test_momentum_betas(backend, dtypes, beta):
    check_momentum(backend, (33, 70), *dtypes, True, beta)


@pytest.mark.parametrize("scale", [0.0, 1e-30])
def test_momentum_zeros_and_tiny_values(backend, scale):
    check_momentum(backend, (33, 70), F32, F32, True, scale=scale)


@pytest.mark.parametrize("shape", shape_params(*EMPTY))
@pytest.mark.parametrize("nesterov", [True, False], ids=["nesterov", "plain"])
def test_momentum_and_apply_of_empty_tensors(backend, shape, nesterov):
    check_momentum(backend, shape, F32, F32, nesterov)
    check_apply(backend, shape, F32, F32, cautious=nesterov)


# --------------------------------------------------------------------------------------------------
# muon_apply_


def check_apply(backend, shape, param_dtype, update_dtype, weight_decay=0.1, cautious=True, scale=1.0):
    device = device_for(backend)
    param = (torch.randn(shape, device=device) * scale).to(param_dtype)
    update = (torch.randn(shape, device=device) * scale).to(update_dtype)
    spec_param, spec_update = param.clone(), update.clone()
    args = dict(lr=0.02, weight_decay=weight_decay, scale=1.7, cautious=cautious)
    fastoptim.muon_apply_(param, update, **args, backend=backend)
    if backend == "torch":
        spec_param, spec_update = spec_param.double(), spec_update.double()
    fastoptim.muon_apply_(spec_param, spec_update, **args, backend="torch")
    assert_close(param, spec_param, param_dtype)
    assert torch.isfinite(param).all()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtypes", dtype_pairs())
@pytest.mark.parametrize("cautious", [True, False], ids=["cautious", "plain"])
def test_apply_matches_torch(backend, shape, dtypes, cautious):
    check_apply(backend, shape, *dtypes, cautious=cautious)


@pytest.mark.parametrize("shape", shape_params((1, 1), (3, 5), (33, 70), (70, 33), (3, 48, 80), (2, 3, 5, 7))
                         + shape_params((130, 257), marks=(KERNELS_ONLY,)))
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("cautious", [True, False], ids=["cautious", "plain"])
def test_apply_without_weight_decay(backend, shape, dtype, cautious):
    check_apply(backend, shape, dtype, dtype, weight_decay=0.0, cautious=cautious)


APPLY_MIXED_PAIRS = [(F32, BF16), (BF16, F32), (F16, F32)]


@pytest.mark.parametrize("dtypes", dtype_pairs(*APPLY_MIXED_PAIRS, interpreted=APPLY_MIXED_PAIRS))
def test_apply_mixed_dtypes(backend, dtypes):
    check_apply(backend, (130, 257), *dtypes)


@pytest.mark.parametrize("scale", [0.0, 1e-30])
@pytest.mark.parametrize("cautious", [True, False], ids=["cautious", "plain"])
def test_apply_zeros_and_tiny_values(backend, scale, cautious):
    check_apply(backend, (33, 70), F32, F32, cautious=cautious, scale=scale)


def test_apply_cautious_decays_only_where_signs_agree(backend):
    device = device_for(backend)
    param = torch.tensor([[1.0, 1.0, -1.0, -1.0, 2.0]], device=device)
    update = torch.tensor([[1.0, -1.0, -1.0, 1.0, 0.0]], device=device)
    fastoptim.muon_apply_(param, update, lr=0.5, weight_decay=0.2, scale=0.0, cautious=True, backend=backend)
    torch.testing.assert_close(param, torch.tensor([[0.9, 1.0, -0.9, -1.0, 1.8]], device=device))


@pytest.mark.large
@pytest.mark.parametrize("backend", KERNELS)
def test_apply_writes_every_element_of_a_large_stack(backend):
    # Crosses the grid-stride limit (65535 blocks x 256 threads < 2^24 elements per pass).
    param = torch.zeros(3, 4096, 2048, device=device_for(backend))
    fastoptim.muon_apply_(param, torch.ones_like(param), 1.0, 0.0, 1.0, backend=backend)
    assert torch.all(param == -1.0)


def test_torch_reads_non_contiguous_inputs():
    param = torch.randn(10, 8)[:, ::2]
    update = torch.randn(10, 4)
    expected = param.contiguous()
    fastoptim.muon_apply_(expected, update, 0.1, 0.1, backend="torch")
    fastoptim.muon_apply_(param, update, 0.1, 0.1, backend="torch")
    assert_equal([param], [expected])
    buf, grad = torch.randn(6, 10).mT, torch.randn(10, 6)
    expected_buf = buf.contiguous()
    out = fastoptim.muon_momentum_(buf, grad, 0.9, True, backend="torch")
    assert_equal([out, buf], [fastoptim.muon_momentum_(expected_buf, grad, 0.9, True, backend="torch"), expected_buf])


@pytest.mark.parametrize("backend", KERNELS)
def test_float64_is_refused_and_left_unchanged(backend):
    buf = torch.randn(3, 5, dtype=torch.float64, device=device_for(backend))
    before = buf.clone()
    with pytest.raises(fastoptim.BackendUnavailableError, match="float64"):
        fastoptim.muon_momentum_(buf, buf.clone(), backend=backend)
    with pytest.raises(fastoptim.BackendUnavailableError, match="float64"):
        fastoptim.muon_apply_(buf, buf.clone(), 0.1, backend=backend)
    assert torch.equal(buf, before)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("layout", ["transposed", "strided"])
def test_non_contiguous_is_refused_and_left_unchanged(backend, layout):
    device = device_for(backend)
    param = torch.randn(8, 6, device=device).mT if layout == "transposed" else torch.randn(6, 16, device=device)[:, ::2]
    before = param.clone()
    with pytest.raises(fastoptim.BackendUnavailableError, match="contiguous"):
        fastoptim.muon_apply_(param, torch.randn(6, 8, device=device), 0.1, backend=backend)
    with pytest.raises(fastoptim.BackendUnavailableError, match="contiguous"):
        fastoptim.muon_momentum_(param, torch.randn(6, 8, device=device), 0.9, backend=backend)
    assert torch.equal(param, before)


@pytest.mark.cuda
def test_cuda_auto_picks_cuda_for_contiguous_and_falls_back_otherwise():
    p = torch.randn(8, 8, device="cuda")
    assert backends.select("muon_apply_", "auto", p.device, (p, p, 0.1, 0.0, 1.0, False)) == "cuda"
    strided = torch.randn(8, 16, device="cuda")[:, ::2]
    assert backends.select("muon_apply_", "auto", p.device, (strided, p, 0.1, 0.0, 1.0, False)) != "cuda"


# --------------------------------------------------------------------------------------------------
# muon_momentum_stack_


def check_momentum_stack(backend, shapes, m, n, buf_dtypes, grad_dtypes, out_dtype, nesterov, **options):
    device = device_for(backend)
    bufs = [torch.randn(s, device=device).to(d) for s, d in zip(shapes, buf_dtypes)]
    grads = [torch.randn(s, device=device).to(d) for s, d in zip(shapes, grad_dtypes)]
    spec_bufs, spec_grads, grads_before = [b.clone() for b in bufs], grads, [g.clone() for g in grads]
    out = torch.full((len(shapes), m, n), float("nan"), device=device, dtype=out_dtype)
    with poisoned_allocations():
        fastoptim.muon_momentum_stack_(bufs, grads, out, 0.9, nesterov, backend=backend, **options)
    assert_equal(grads, grads_before)
    if backend == "torch":
        spec_bufs, spec_grads = [b.double() for b in spec_bufs], [g.double() for g in grads]
    spec_out = torch.empty(out.shape, device=device, dtype=torch.float64 if backend == "torch" else out_dtype)
    fastoptim.muon_momentum_stack_(spec_bufs, spec_grads, spec_out, 0.9, nesterov, backend="torch", **options)
    for got, want in zip(bufs, spec_bufs):
        assert_close(got, want)
    for i, buf_dtype in enumerate(buf_dtypes):
        # The stack holds values rounded to buf's dtype first, then to out's: the looser tolerance applies.
        loosest = max((buf_dtype, out_dtype), key=lambda d: TOLERANCE[d].atol)
        assert_close(out[i], spec_out[i], loosest)
    return out


@pytest.mark.parametrize("shape", shape_params((1, 1), (3, 5), (33, 70))
                         + shape_params((130, 257), marks=(KERNELS_ONLY,)))
@pytest.mark.parametrize("nesterov", [True, False], ids=["nesterov", "plain"])
def test_momentum_stack_matches_torch(backend, shape, nesterov):
    # 130 x 257 = 33410 elements: three chunks of the Triton chunk table (16384 each).
    check_momentum_stack(backend, [shape] * 3, *shape, [F32] * 3, [F32] * 3, F32, nesterov)


# small: three matrices; wide (GPU): 100 matrices (more than one cuda table of 96 tensors) of 90000
# elements (two cuda chunks each), one of them a conv kernel. One grad is fp32: a second dtype group.
STACK_BUCKETS = [pytest.param(([(33, 70)] * 3, 33, 70, 1), id="small"),
                 pytest.param(([(300, 300)] * 99 + [(300, 3, 100)], 300, 300, 3), id="wide", marks=pytest.mark.large)]


@pytest.mark.parametrize("bucket_case", STACK_BUCKETS)
@pytest.mark.parametrize("buf_dtype", [F32, BF16, F16], ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("out_dtype", [F32, BF16, F16], ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("nesterov", [True, False], ids=["nesterov", "plain"])
def test_momentum_stack_dtypes(backend, bucket_case, buf_dtype, out_dtype, nesterov):
    shapes, m, n, fp32_grad = bucket_case
    grad_dtypes = [F32 if i == fp32_grad else buf_dtype for i in range(len(shapes))]
    check_momentum_stack(backend, shapes, m, n, [buf_dtype] * len(shapes), grad_dtypes, out_dtype, nesterov)


def test_momentum_stack_mixed_dtypes_and_conv_shapes(backend):
    # bufs of different dtypes go in different launches; a conv kernel is read as its (out, -1) matrix.
    check_momentum_stack(backend, [(8, 3, 2, 2), (8, 12), (8, 12)], 8, 12, [F32, BF16, F32], [F32, BF16, F16], F32,
                         True)


@pytest.mark.parametrize("shape", shape_params((1, 1), (33, 70)) + shape_params((200, 200), marks=(KERNELS_ONLY,))
                         + large_params((300, 300)))
@pytest.mark.parametrize("out_dtype", [F32, BF16, F16], ids=DTYPE_NAMES.get)
def test_momentum_stack_normalize(backend, shape, out_dtype):
    # 200 x 200: three Triton chunks, 300 x 300: two cuda chunks, so a matrix's norm is summed from
    # several partials. The second grad is bf16: a second dtype group.
    out = check_momentum_stack(backend, [shape] * 2, *shape, [F32] * 2, [F32, BF16], out_dtype, True,
                               normalize=True, safety=1.01, eps=1e-7)
    norms = torch.linalg.matrix_norm(out.float())
    torch.testing.assert_close(norms, torch.full_like(norms, 1 / 1.01), rtol=1e-2, atol=1e-2)


def test_momentum_stack_normalize_then_newton_schulz_equals_plain_newton_schulz(backend):
    device = device_for(backend)
    bufs = [torch.randn(20, 30, device=device) for _ in range(2)]
    grads = [torch.randn(20, 30, device=device) for _ in range(2)]
    plain_bufs = [b.clone() for b in bufs]
    stack = torch.empty(2, 20, 30, device=device)
    fastoptim.muon_momentum_stack_(bufs, grads, stack, 0.9, True, backend=backend, normalize=True, safety=1.01)
    fused = fastoptim.newton_schulz(stack, coefficients="polar_express", compute_dtype=F32, normalized=True,
                                    backend=backend)
    plain_stack = torch.empty_like(stack)
    fastoptim.muon_momentum_stack_(plain_bufs, grads, plain_stack, 0.9, True, backend="torch")
    plain = fastoptim.newton_schulz(plain_stack, coefficients="polar_express", compute_dtype=F32, backend="torch")
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", KERNELS)
def test_momentum_stack_float64_is_refused_and_left_unchanged(backend):
    device = device_for(backend)
    bufs = [torch.randn(4, 6, dtype=torch.float64, device=device)]
    before = bufs[0].clone()
    with pytest.raises(fastoptim.BackendUnavailableError, match="float64|dtype"):
        fastoptim.muon_momentum_stack_(bufs, [torch.randn_like(bufs[0])], torch.empty(1, 4, 6, device=device), 0.9,
                                       True, backend=backend)
    assert torch.equal(bufs[0], before)


@pytest.mark.triton
def test_triton_momentum_stack_normalizes_in_slices_beyond_the_grid_y_limit(monkeypatch):
    # A grid's second axis holds 65535 matrices; with the limit lowered to 2, five matrices take three
    # launches (2 + 2 + 1), each on its slice of the stack and of the partials.
    from fastoptim.triton_kernels import muon_stack

    monkeypatch.setattr(muon_stack, "_MAX_GRID_Y", 2)
    check_momentum_stack("triton", [(200, 200)] * 5, 200, 200, [F32] * 5, [F32] * 5, F32, True, normalize=True,
                         safety=1.01, eps=1e-7)


@pytest.mark.cuda
def test_cuda_momentum_stack_normalizes_beyond_the_grid_y_limit():
    # More matrices than gridDim.y holds (65535): the normalization pass goes in slices.
    count = 70_000
    bufs = [torch.randn(2, 3, device="cuda") for _ in range(count)]
    grads = [torch.randn(2, 3, device="cuda") for _ in range(count)]
    expected_bufs = [b.clone() for b in bufs]
    out = torch.full((count, 2, 3), float("nan"), device="cuda")
    expected = torch.empty_like(out)
    fastoptim.muon_momentum_stack_(expected_bufs, grads, expected, 0.9, True, normalize=True, backend="torch")
    fastoptim.muon_momentum_stack_(bufs, grads, out, 0.9, True, normalize=True, backend="cuda")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
def test_cuda_momentum_stack_binding_checks_the_partials_size():
    from fastoptim import _C

    out = torch.empty(2, 300, 300, device="cuda")  # 90000 elements: two chunks per matrix
    bufs = [torch.zeros(300, 300, device="cuda") for _ in range(2)]
    grads = [torch.ones(300, 300, device="cuda") for _ in range(2)]
    too_small = torch.zeros(2, 1, device="cuda")
    with pytest.raises(RuntimeError, match="partials must have at least 2 columns"):
        _C.muon_momentum_stack_(bufs, grads, out, [0, 1], 0.9, True, too_small)
    assert torch.all(bufs[0] == 0)


# --------------------------------------------------------------------------------------------------
# muon_apply_stack_

HYPER = dict(lr=0.05, weight_decay=0.3, scale=1.7)


def muon_loop(params, updates, backend, lr, weight_decay, scale, cautious):
    m, n = updates.shape[1:]
    for p, u in zip(params, updates):
        fastoptim.muon_apply_(p.view(m, n), u, lr, weight_decay, scale, cautious, backend=backend)


def check_muon_stack(backend, kind, P, m, n, update_dtype=F32, cautious=True, param_dtype=F32):
    """The stack op equals a loop of muon_apply_ on the same backend bit for bit, and the torch backend's
    loop within tolerance; every element moved (the inputs are random, so all of them must)."""
    device = device_for(backend)
    params = bucket(kind, P, m, n, device, param_dtype)
    updates = torch.randn(P, m, n, device=device).to(update_dtype)
    looped, spec, before = ([p.clone() for p in params] for _ in range(3))
    fastoptim.muon_apply_stack_(params, updates, HYPER["lr"], HYPER["weight_decay"], HYPER["scale"], cautious,
                                backend=backend)
    muon_loop(looped, updates, backend, cautious=cautious, **HYPER)
    assert_equal(params, looped)
    muon_loop(spec, updates, "torch", cautious=cautious, **HYPER)
    for got, want in zip(params, spec):
        assert_close(got, want)
    for p, b in zip(params, before):
        if p.dtype == F32 and p.numel():
            assert (p != b).float().mean() > 0.99


BUCKET_SHAPES = shape_params((3, 5), (1, 1), (1, 37), (70, 33), (33, 70), (16, 64))  # (16, 64): whole vectors


@pytest.mark.parametrize("shape", BUCKET_SHAPES)
@pytest.mark.parametrize("P", [1, 7])
def test_apply_stack_equals_a_loop_of_muon_apply(backend, shape, P):
    check_muon_stack(backend, "matrix", P, *shape)


@pytest.mark.parametrize("kind", ["bank", "rows", "conv", "mixed", "offset"])
@pytest.mark.parametrize("cautious", [False, True], ids=["plain", "cautious"])
def test_apply_stack_layouts(backend, kind, cautious):
    check_muon_stack(backend, kind, 5, 12, 16, update_dtype=BF16, cautious=cautious)


@pytest.mark.parametrize("param_dtype, update_dtype", [(BF16, BF16), (F32, BF16), (BF16, F32), (F16, F32)],
                         ids=["bf16-bf16", "fp32-bf16", "bf16-fp32", "fp16-fp32"])
def test_apply_stack_16_bit_storage(backend, param_dtype, update_dtype):
    check_muon_stack(backend, "matrix", 3, 33, 70, update_dtype=update_dtype, param_dtype=param_dtype)


def test_apply_stack_crosses_chunks(backend):
    check_muon_stack(backend, "bank", 2, 130, 257, update_dtype=BF16)


def test_apply_stack_non_contiguous_params_torch():
    check_muon_stack("torch", "transposed", 3, 7, 5)


@pytest.mark.parametrize("shape", shape_params((4, 0), (0, 3)))
def test_apply_stack_empty_matrices(backend, shape):
    device, (m, n) = device_for(backend), shape
    params = [torch.empty(m, n, device=device) for _ in range(3)]
    fastoptim.muon_apply_stack_(params, torch.empty(3, m, n, device=device), 0.1, backend=backend)
    assert all(p.shape == (m, n) for p in params)


def test_apply_stack_empty_list_is_a_no_op(backend):
    fastoptim.muon_apply_stack_([], torch.empty(0, 3, 4, device=device_for(backend)), 0.1, backend=backend)


@pytest.mark.parametrize("scale", [0.0, 1e15])
def test_apply_stack_huge_values_stay_finite_like_torch(backend, scale):
    device = device_for(backend)
    params = [torch.full((5, 6), 3e37, device=device) for _ in range(2)]
    updates = torch.full((2, 5, 6), -1e38 if scale else 0.0, device=device)
    expected = [p.clone() for p in params]
    fastoptim.muon_apply_stack_(params, updates, 0.5, 0.1, 1.0, backend=backend)
    muon_loop(expected, updates, "torch", 0.5, 0.1, 1.0, False)
    for got, want in zip(params, expected):
        assert_close(got, want)
    assert all(torch.isfinite(p).all() for p in params)


def float64_muon(param, update, lr, weight_decay, scale, cautious):
    p, u = param.double(), update.double().view(param.shape)
    decayed = p * (1 - lr * weight_decay)
    if cautious:
        decayed = torch.where(u * p >= 0, decayed, p)
    return decayed - lr * scale * u


def test_apply_stack_torch_tensor_lr_matches_float64_math():
    params = bucket("conv", 4, 6, 9, "cpu")
    updates = torch.randn(4, 6, 9)
    lr, weight_decay = torch.tensor(0.03), torch.tensor(0.7, dtype=torch.float64)
    want = [float64_muon(p, u, 0.03, 0.7, 1.3, True) for p, u in zip(params, updates)]
    fastoptim.muon_apply_stack_(params, updates, lr, weight_decay, 1.3, True, backend="torch")
    for p, w in zip(params, want):
        torch.testing.assert_close(p.double(), w, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("which", ["lr", "weight_decay", "both"])
@pytest.mark.parametrize("scalar_dtype", [F32, torch.float64], ids=["fp32", "fp64"])
def test_apply_stack_tensor_hyper_parameters_match_the_float_path(backend, which, scalar_dtype):
    device = device_for(backend)
    values = dict(lr=0.05, weight_decay=0.3)
    tensors = {k: torch.tensor(v, device=device, dtype=scalar_dtype) if which in (k, "both") else v
               for k, v in values.items()}
    params = bucket("mixed", 4, 12, 10, device)
    updates = torch.randn(4, 12, 10, device=device, dtype=BF16)
    with_floats, with_tensors = [p.clone() for p in params], [p.clone() for p in params]
    fastoptim.muon_apply_stack_(with_floats, updates, **values, scale=1.7, cautious=True, backend=backend)
    fastoptim.muon_apply_stack_(with_tensors, updates, **tensors, scale=1.7, cautious=True, backend=backend)
    for got, want in zip(with_tensors, with_floats):  # 1 - lr·wd may differ in its last bit: a parameter's ulp
        assert_close(got, want)


class CountingKernel:
    """Stands in for a @triton.jit kernel and counts its launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.mark.triton
@pytest.mark.parametrize("P", [1, 7])
def test_triton_apply_stack_launches_do_not_grow_with_the_bucket(P, monkeypatch):
    from fastoptim.triton_kernels import apply_stack

    counter = CountingKernel(apply_stack._muon_apply_stack_kernel)
    monkeypatch.setattr(apply_stack, "_muon_apply_stack_kernel", counter)
    device = device_for("triton")
    params = bucket("mixed", P, 6, 5, device)
    fastoptim.muon_apply_stack_(params, torch.randn(P, 6, 5, device=device), 0.1, backend="triton")
    assert counter.launches == len({p.dtype for p in params})  # one launch per parameter dtype


@pytest.mark.parametrize("backend", KERNELS)
def test_apply_stack_kernels_refuse_what_they_cannot_run_and_change_nothing(backend):
    device = device_for(backend)
    cases = [
        (bucket("transposed", 2, 4, 6, device), "contiguous"),
        (bucket("matrix", 2, 4, 6, device, torch.float64), "float64"),
    ]
    for params, reason in cases:
        before = [p.clone() for p in params]
        with pytest.raises(fastoptim.BackendUnavailableError, match=reason):
            fastoptim.muon_apply_stack_(params, torch.randn(2, 4, 6, device=device), 0.1, backend=backend)
        assert_equal(params, before)


@pytest.mark.cuda
def test_cuda_auto_dispatch_of_apply_stack_falls_back_for_non_contiguous_params():
    device = torch.device("cuda")
    params, updates = bucket("matrix", 2, 4, 6, device), torch.randn(2, 4, 6, device=device)
    assert backends.select("muon_apply_stack_", "auto", device, (params, updates, 0.1, 0.0, 1.0, False)) == "cuda"
    strided = bucket("transposed", 2, 4, 6, device)
    assert backends.select("muon_apply_stack_", "auto", device, (strided, updates, 0.1, 0.0, 1.0, False)) == "torch"


@pytest.mark.parametrize("overrides, exception, text", BUCKET_BAD_INPUT,
                         ids=[f"{case[2]}-{i}" for i, case in enumerate(BUCKET_BAD_INPUT)])
def test_apply_stack_bad_input_raises_naming_the_argument_and_changes_nothing(overrides, exception, text):
    assert_bad_bucket_raises("muon_apply_stack_", overrides, exception, text)


# --------------------------------------------------------------------------------------------------
# torch.library


@pytest.mark.parametrize("backend", KERNELS)  # the torch backend's are among test_dispatch.py's opcheck cases
def test_opcheck(backend):
    device = device_for(backend)

    def r(*shape):
        return torch.randn(*shape, device=device)

    ops = torch.ops.fastoptim
    torch.library.opcheck(ops.muon_momentum_.default, (r(3, 5), r(3, 5), r(3, 5), 0.9, backend))
    torch.library.opcheck(ops.muon_momentum_.default, (r(3, 5), r(3, 5), None, 0.9, backend))
    torch.library.opcheck(ops.muon_apply_.default, (r(3, 5), r(3, 5), 0.1, 0.1, 1.5, True, backend))
    bufs, grads = [r(4, 6) for _ in range(2)], [r(4, 6) for _ in range(2)]
    for normalize, safety in ((False, 1.0), (True, 1.01)):
        torch.library.opcheck(ops.muon_momentum_stack_.default,
                              (bufs, grads, r(2, 4, 6), 0.9, True, normalize, safety, 1e-7, backend))
    lr = torch.tensor(0.1, device=device)
    for lr_value, lr_tensor in ((0.1, None), (0.0, lr)):
        torch.library.opcheck(ops.muon_apply_stack_.default,
                              ([r(4, 6) for _ in range(3)], r(3, 4, 6), lr_value, 0.1, lr_tensor, None, 1.5, True,
                               backend))


def test_the_stack_op_is_exported():
    assert "muon_apply_stack_" in fastoptim.__all__ and "muon_apply_stack_" in fastoptim.ops.__all__
    assert hasattr(torch.ops.fastoptim, "muon_apply_stack_")
