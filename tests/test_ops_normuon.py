"""normuon_step_ and normuon_step_stack_ on every backend.

Each kernel is compared with the torch backend on the same inputs, the torch backend with float64
math (TOLERANCE of the storage dtype); updates have rows of very different size, so the row
normalization matters. Workspaces are NaN before a kernel runs (`poisoned_allocations`). The stack op
equals a loop of normuon_step_ on the same backend bit for bit. Tests of one backend's internals are
marked and named for it.
"""

from __future__ import annotations

import pytest
import torch
from ops_testing import (
    BLOCKS,
    BUCKET_BAD_INPUT,
    EMPTY,
    KERNELS_ONLY,
    LARGE,
    MATRICES,
    STACKS,
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

# --------------------------------------------------------------------------------------------------
# normuon_step_


def check_step(backend, shape, param_dtype, update_dtype, *, weight_decay=0.1, moment_dtype=F32, scale=1.0,
               lr=0.05, cautious=False):
    device = device_for(backend)
    param = torch.randn(shape, device=device).to(param_dtype)
    rows = torch.rand(shape[:-1] + (1,), device=device)
    update = (torch.randn(shape, device=device) * rows * scale).to(update_dtype)
    second_moment = (torch.rand(shape[:-1], device=device) * scale**2).to(moment_dtype)
    spec = [param.clone(), update.clone(), second_moment.clone()]
    args = dict(lr=lr, weight_decay=weight_decay, beta2=0.9, eps=1e-10, scale=3.0, cautious=cautious)
    with poisoned_allocations():
        fastoptim.normuon_step_(param, update, second_moment, **args, backend=backend)
    if backend == "torch":
        spec = [t.double() for t in spec]
    fastoptim.normuon_step_(*spec, **args, backend="torch")
    assert_close(second_moment, spec[2], moment_dtype)
    # A bf16 second moment changes the row scales by up to a bf16 ulp, hence the parameters.
    assert_close(param, spec[0], BF16 if moment_dtype == BF16 else param_dtype)
    assert torch.isfinite(param).all() and torch.isfinite(second_moment).all()


@pytest.mark.parametrize("shape", shape_params(*MATRICES, *STACKS, *LARGE)
                         + shape_params(*BLOCKS, marks=(KERNELS_ONLY,)))
@pytest.mark.parametrize("weight_decay, cautious", [(0.0, False), (0.1, False), (5.0, True)],
                         ids=["no-decay", "decay", "cautious"])
def test_step_matches_torch(backend, shape, weight_decay, cautious):
    # A large decay makes a wrongly decayed coordinate stand out.
    check_step(backend, shape, F32, F32, weight_decay=weight_decay, lr=0.1, cautious=cautious)


STORAGE_PAIRS = [(BF16, BF16), (F16, F16), (F32, BF16), (BF16, F32), (F16, F32), (F16, BF16)]
INTERPRETED_STORAGE_SHAPES = [(3, 5), (33, 70), (70, 33), (3, 48, 80)]
STORAGE_SHAPES = [
    *shape_params(*INTERPRETED_STORAGE_SHAPES),
    *shape_params(*(s for s in MATRICES + STACKS if s not in INTERPRETED_STORAGE_SHAPES),
                  marks=(pytest.mark.not_interpreted,)),
    *shape_params(*BLOCKS, marks=(KERNELS_ONLY, pytest.mark.not_interpreted)),
    *shape_params(*LARGE), *large_params((2, 768, 3072)),
]


@pytest.mark.parametrize("shape", STORAGE_SHAPES)
@pytest.mark.parametrize("dtypes", dtype_pairs(*STORAGE_PAIRS, interpreted=((BF16, BF16), (F32, BF16),
                                                                             (BF16, F32))))
@pytest.mark.parametrize("cautious", [False, True], ids=["plain", "cautious"])
def test_step_16_bit_storage(backend, shape, dtypes, cautious):
    check_step(backend, shape, *dtypes, cautious=cautious)


@pytest.mark.parametrize("backend", backend_params("torch", "triton"))  # cuda takes an fp32 second moment only
def test_step_bf16_second_moment(backend):
    check_step(backend, (33, 70), F32, F32, moment_dtype=BF16)


@pytest.mark.parametrize("scale", [0.0, 1e-30])
def test_zeros_and_tiny_updates_give_finite_results(backend, scale):
    check_step(backend, (33, 70), F32, F32, scale=scale)


@pytest.mark.parametrize("shape", shape_params(*EMPTY))
def test_empty(backend, shape):
    check_step(backend, shape, F32, F32)


def test_row_scale_is_applied_per_row(backend):
    # Rows of very different size: after the step every row of lr·scale·Ô has about the same RMS.
    device = device_for(backend)
    update = torch.randn(6, 40, device=device) * torch.logspace(-3, 3, 6, device=device)[:, None]
    param = torch.zeros(6, 40, device=device)
    second_moment = torch.zeros(6, device=device)
    fastoptim.normuon_step_(param, update, second_moment, lr=1.0, beta2=0.0, scale=1.0, backend=backend)
    row_rms = param.pow(2).mean(dim=1).sqrt()
    torch.testing.assert_close(row_rms, row_rms.mean().expand(6), rtol=1e-4, atol=0)
    torch.testing.assert_close(torch.linalg.matrix_norm(param), torch.linalg.matrix_norm(update), rtol=1e-4, atol=0)


@pytest.mark.parametrize("shape", shape_params((4, 0), (2, 3, 0)))
def test_no_columns_moves_second_moment_toward_zero(backend, shape):
    device = device_for(backend)
    param = torch.empty(shape, device=device)
    second_moment = torch.rand(shape[:-1], device=device) + 0.5
    expected = second_moment.clone()
    fastoptim.normuon_step_(param, param.clone(), second_moment, lr=0.1, beta2=0.9, backend=backend)
    fastoptim.normuon_step_(param.clone(), param.clone(), expected, lr=0.1, beta2=0.9, backend="torch")
    torch.testing.assert_close(second_moment, expected)
    assert (second_moment < 0.9 * 1.5 + 1e-6).all()


@pytest.mark.not_interpreted  # the interpreter runs programs one after another: nothing to race
@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("shape", shape_params((3, 130, 257)) + large_params((4, 2048, 3072)))
def test_deterministic(backend, shape):
    # No float atomics: per-block partial sums are reduced in a fixed order, so repeated runs on the same
    # inputs agree bit for bit (float atomics make the order, hence the last bits, depend on scheduling).
    device = device_for(backend)
    update = torch.randn(shape, device=device, dtype=BF16)
    results = []
    for _ in range(5):
        param = torch.ones(shape, device=device)
        second_moment = torch.zeros(shape[:-1], device=device)
        fastoptim.normuon_step_(param, update, second_moment, 0.02, 0.1, 0.95, 1e-10, 1.0, backend=backend)
        results.append((param, second_moment))
    for param, second_moment in results[1:]:
        assert torch.equal(param, results[0][0]) and torch.equal(second_moment, results[0][1])


@pytest.mark.parametrize("backend", KERNELS)
def test_float64_is_refused_and_left_unchanged(backend):
    device = device_for(backend)
    param = torch.randn(3, 5, dtype=torch.float64, device=device)
    second_moment = torch.rand(3, dtype=torch.float64, device=device)
    before = [param.clone(), second_moment.clone()]
    with pytest.raises(fastoptim.BackendUnavailableError, match="float64"):
        fastoptim.normuon_step_(param, param.clone(), second_moment, lr=0.1, backend=backend)
    assert_equal([param, second_moment], before)


@pytest.mark.parametrize("backend", KERNELS)
def test_non_contiguous_is_refused(backend):
    device = device_for(backend)
    param, second_moment = torch.randn(3, 5, device=device), torch.rand(3, device=device)
    before = [param.clone(), second_moment.clone()]
    with pytest.raises(fastoptim.BackendUnavailableError, match="contiguous"):
        fastoptim.normuon_step_(param, torch.randn(5, 3, device=device).mT, second_moment, lr=0.1, backend=backend)
    assert_equal([param, second_moment], before)


@pytest.mark.cuda
def test_cuda_unaligned_rows_take_the_scalar_path():
    base = torch.randn(5 * 12 + 1, device="cuda")
    param = base[1:].view(5, 12)  # 4-byte offset: not 16-byte aligned
    update = torch.randn(5, 12, device="cuda")
    v = torch.zeros(5, device="cuda")
    expected_param, expected_v = param.clone(), v.clone()
    fastoptim.normuon_step_(expected_param, update, expected_v, 0.1, 0.0, 0.5, 1e-8, 1.0, backend="torch")
    fastoptim.normuon_step_(param, update, v, 0.1, 0.0, 0.5, 1e-8, 1.0, backend="cuda")
    torch.testing.assert_close(param, expected_param, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# normuon_step_stack_

HYPER = dict(lr=0.05, weight_decay=0.3, scale=1.7)
NORMUON = dict(beta2=0.9, eps=1e-8)


def moments(P: int, m: int, device, kind: str = "separate") -> list[torch.Tensor]:
    if kind == "slices":  # one expert bank's (E, m) state, each expert's rows a 1-D slice
        state = torch.rand(P, m, device=device)
        return [state.view(-1)[e * m : (e + 1) * m] for e in range(P)]
    return [torch.rand(m, device=device) for _ in range(P)]


def normuon_loop(params, updates, vs, backend, lr, weight_decay, scale, cautious, beta2, eps):
    m, n = updates.shape[1:]
    for p, u, v in zip(params, updates, vs):
        fastoptim.normuon_step_(p.view(m, n), u, v.view(m), lr, weight_decay, beta2, eps, scale, cautious,
                                backend=backend)


def check_stack(backend, kind, P, m, n, update_dtype=F32, cautious=True, moment_kind="separate", param_dtype=F32,
                update_scale=1.0):
    """The stack op (NaN-filled workspaces) equals a loop of normuon_step_ on the same backend bit for
    bit, and the torch backend's loop within tolerance."""
    device = device_for(backend)
    params = bucket(kind, P, m, n, device, param_dtype)
    updates = torch.randn(P, m, n, device=device) * torch.rand(P, m, 1, device=device) * update_scale
    updates = updates.to(update_dtype)
    vs = moments(P, m, device, moment_kind)
    looped, looped_vs = [p.clone() for p in params], [v.clone() for v in vs]
    spec, spec_vs = [p.clone() for p in params], [v.clone() for v in vs]
    args = dict(cautious=cautious, **HYPER, **NORMUON)
    with poisoned_allocations():
        fastoptim.normuon_step_stack_(params, updates, vs, HYPER["lr"], HYPER["weight_decay"], NORMUON["beta2"],
                                      NORMUON["eps"], HYPER["scale"], cautious, backend=backend)
    normuon_loop(looped, updates, looped_vs, backend, **args)
    assert_equal(params, looped)
    assert_equal(vs, looped_vs)
    normuon_loop(spec, updates, spec_vs, "torch", **args)
    for got, want in zip(params + vs, spec + spec_vs):
        assert_close(got, want)


BUCKET_SHAPES = shape_params((3, 5), (1, 1), (1, 37), (70, 33), (33, 70), (16, 64))  # (16, 64): whole vectors


@pytest.mark.parametrize("shape", BUCKET_SHAPES)
@pytest.mark.parametrize("P", [1, 7])
def test_stack_equals_a_loop_of_normuon_step(backend, shape, P):
    check_stack(backend, "matrix", P, *shape)


@pytest.mark.parametrize("kind, moment_kind", [("bank", "slices"), ("rows", "separate"), ("conv", "separate"),
                                               ("mixed", "slices"), ("offset", "separate")],
                         ids=["bank", "rows", "conv", "mixed", "offset"])
@pytest.mark.parametrize("cautious", [False, True], ids=["plain", "cautious"])
def test_stack_layouts(backend, kind, moment_kind, cautious):
    check_stack(backend, kind, 5, 12, 16, update_dtype=BF16, cautious=cautious, moment_kind=moment_kind)


@pytest.mark.parametrize("param_dtype, update_dtype", [(BF16, BF16), (F32, BF16), (F16, F32)],
                         ids=["bf16-bf16", "fp32-bf16", "fp16-fp32"])
def test_stack_16_bit_storage(backend, param_dtype, update_dtype):
    check_stack(backend, "matrix", 3, 33, 70, update_dtype=update_dtype, param_dtype=param_dtype)


@pytest.mark.parametrize("shape", shape_params((130, 257), (16390, 2)))  # many row tiles; more rows than a chunk
def test_stack_large(backend, shape):
    check_stack(backend, "bank", 2, *shape, moment_kind="slices")


def test_stack_non_contiguous_params_torch():
    params = bucket("transposed", 3, 7, 5, "cpu")
    strided_vs = [torch.rand(7, 2)[:, 0] for _ in range(3)]  # 1-D with stride 2
    updates = torch.randn(3, 7, 5)
    expected, expected_vs = [p.contiguous() for p in params], [v.contiguous() for v in strided_vs]
    fastoptim.normuon_step_stack_(params, updates, strided_vs, 0.1, 0.2, backend="torch")
    for p, v, u in zip(expected, expected_vs, updates):
        fastoptim.normuon_step_(p, u, v, 0.1, 0.2, backend="torch")
    assert_equal(params, expected)
    assert_equal(strided_vs, expected_vs)


@pytest.mark.parametrize("shape", shape_params((4, 0), (0, 3)))
def test_stack_empty_matrices(backend, shape):
    device, (m, n) = device_for(backend), shape
    params = [torch.empty(m, n, device=device) for _ in range(3)]
    vs = [torch.rand(m, device=device) + 0.5 for _ in range(3)]
    expected_vs = [v.clone() for v in vs]
    updates = torch.empty(3, m, n, device=device)
    fastoptim.normuon_step_stack_(params, updates, vs, 0.1, beta2=0.5, backend=backend)
    normuon_loop([p.clone() for p in params], updates, expected_vs, "torch", 0.1, 0.0, 1.0, False, 0.5, 1e-10)
    torch.testing.assert_close(vs, expected_vs)  # no columns: v moved halfway toward 0


def test_stack_empty_list_is_a_no_op(backend):
    fastoptim.normuon_step_stack_([], torch.empty(0, 3, 4, device=device_for(backend)), [], 0.1, backend=backend)


@pytest.mark.parametrize("scale", [0.0, 1e15])
def test_stack_zero_and_huge_updates(backend, scale):
    check_stack(backend, "matrix", 3, 33, 70, update_scale=scale)


def test_stack_torch_tensor_lr_matches_float64_math():
    # The normalized update from the float64 reference, then the same step formula.
    params, vs = bucket("matrix", 3, 5, 8, "cpu"), moments(3, 5, "cpu")
    updates = torch.randn(3, 5, 8)
    params64, vs64 = [p.double() for p in params], [v.double() for v in vs]
    fastoptim.normuon_step_stack_(params64, updates.double(), vs64, 0.03, 0.7, backend="torch")
    fastoptim.normuon_step_stack_(params, updates, vs, torch.tensor(0.03), torch.tensor(0.7), backend="torch")
    for got, want in zip(params + vs, params64 + vs64):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("which", ["lr", "weight_decay", "both"])
@pytest.mark.parametrize("scalar_dtype", [F32, torch.float64], ids=["fp32", "fp64"])
def test_stack_tensor_hyper_parameters_match_the_float_path(backend, which, scalar_dtype):
    device = device_for(backend)
    values = dict(lr=0.05, weight_decay=0.3)
    tensors = {k: torch.tensor(v, device=device, dtype=scalar_dtype) if which in (k, "both") else v
               for k, v in values.items()}
    params = bucket("mixed", 4, 12, 10, device)
    updates = torch.randn(4, 12, 10, device=device, dtype=BF16)
    vs = moments(4, 12, device, "slices")
    with_floats, with_tensors = [p.clone() for p in params], [p.clone() for p in params]
    vs_floats, vs_tensors = [v.clone() for v in vs], [v.clone() for v in vs]
    fastoptim.normuon_step_stack_(with_floats, updates, vs_floats, **values, backend=backend)
    fastoptim.normuon_step_stack_(with_tensors, updates, vs_tensors, **tensors, backend=backend)
    for got, want in zip(with_tensors, with_floats):  # 1 - lr·wd may differ in its last bit: a parameter's ulp
        assert_close(got, want)
    assert_equal(vs_tensors, vs_floats)  # the row moments do not depend on lr


def test_compiled_bucket_step_with_a_tensor_lr_compiles_once():
    from torch._dynamo.testing import CompileCounterWithBackend

    def step(params, vs, updates, lr, weight_decay):
        fastoptim.muon_apply_stack_(params, updates, lr, weight_decay, 2.0, True)
        fastoptim.normuon_step_stack_(params, updates, vs, lr, weight_decay)

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    params, vs = bucket("matrix", 3, 4, 6, "cpu"), moments(3, 4, "cpu")
    eager_params, eager_vs = [p.clone() for p in params], [v.clone() for v in vs]
    lr, weight_decay = torch.tensor(0.0), torch.tensor(0.1)
    for value in (0.1, 0.02, 0.3, 1e-3, 0.05):
        lr.fill_(value)
        updates = torch.randn(3, 4, 6)
        compiled(params, vs, updates, lr, weight_decay)
        step(eager_params, eager_vs, updates, lr, weight_decay)
        assert_equal(params, eager_params)
        assert_equal(vs, eager_vs)
    assert counter.frame_count == 1


class CountingKernel:
    """Stands in for a @triton.jit kernel and counts its launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.mark.triton
@pytest.mark.parametrize("P", [1, 7])
def test_triton_stack_launches_do_not_grow_with_the_bucket(P, monkeypatch):
    from fastoptim.triton_kernels import apply_stack

    names = ("_row_stats_stack_kernel", "_norm_ratio_kernel", "_apply_stack_kernel")
    counters = {name: CountingKernel(getattr(apply_stack, name)) for name in names}
    for name, counter in counters.items():
        monkeypatch.setattr(apply_stack, name, counter)
    device = device_for("triton")
    params, vs = bucket("mixed", P, 6, 5, device), moments(P, 6, device, "slices")
    fastoptim.normuon_step_stack_(params, torch.randn(P, 6, 5, device=device), vs, 0.1, backend="triton")
    groups = len({p.dtype for p in params})  # one launch per parameter dtype; the norms in one launch
    assert [counters[name].launches for name in names] == [groups, 1, groups]


@pytest.mark.parametrize("backend", KERNELS)
def test_stack_kernels_refuse_what_they_cannot_run_and_change_nothing(backend):
    device = device_for(backend)
    cases = [
        (bucket("transposed", 2, 4, 6, device), "contiguous"),
        (bucket("matrix", 2, 4, 6, device, torch.float64), "float64"),
    ]
    for params, reason in cases:
        vs = moments(2, 4, device)
        before = [t.clone() for t in params + vs]
        with pytest.raises(fastoptim.BackendUnavailableError, match=reason):
            fastoptim.normuon_step_stack_(params, torch.randn(2, 4, 6, device=device), vs, 0.1, backend=backend)
        assert_equal(params + vs, before)


@pytest.mark.cuda
def test_cuda_auto_dispatch_of_the_stack_falls_back_for_float64_row_moments():
    device = torch.device("cuda")
    params, updates = bucket("matrix", 2, 4, 6, device), torch.randn(2, 4, 6, device=device)
    vs = [torch.rand(4, device=device, dtype=torch.float64) for _ in range(2)]
    args = (params, updates, vs, 0.1, 0.0, 0.95, 1e-10, 1.0, False)
    assert backends.select("normuon_step_stack_", "auto", device, args) != "cuda"


@pytest.mark.cuda
def test_cuda_tensor_lr_bucket_step_is_graph_capturable():
    device = torch.device("cuda")
    params, vs = bucket("bank", 4, 64, 96, device), moments(4, 64, device, "slices")
    updates = torch.randn(4, 64, 96, device=device, dtype=BF16)
    lr = torch.tensor(0.1, device=device)
    expected, expected_vs = [p.clone() for p in params], [v.clone() for v in vs]

    def step():
        fastoptim.muon_apply_stack_(params, updates, lr, 0.1, 1.0, True, backend="cuda")
        fastoptim.normuon_step_stack_(params, updates, vs, lr, 0.1, backend="cuda")

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for value in (0.1, 0.2):
        lr.fill_(value)
        fastoptim.muon_apply_stack_(expected, updates, lr, 0.1, 1.0, True, backend="torch")
        fastoptim.normuon_step_stack_(expected, updates, expected_vs, lr, 0.1, backend="torch")
    # The warm-up took one step at 0.1; the graph replays with the values lr holds at replay time.
    lr.fill_(0.2)
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(params + vs, expected + expected_vs):
        assert_close(got, want)


_SHARED = torch.randn(4, 6)
STACK_BAD_INPUT = BUCKET_BAD_INPUT + [
    ({"second_moments": [torch.rand(4), torch.rand(4)]}, ValueError, "second_moments"),
    ({"second_moments": [torch.rand(4), torch.rand(4), torch.rand(6)]}, ValueError, "second_moments[2]"),
    ({"second_moments": [torch.rand(4), torch.rand(4), torch.rand(4).to(torch.int32)]}, TypeError,
     "second_moments[2]"),
    ({"second_moments": [torch.rand(4), torch.rand(4), torch.empty(4, device="meta")]}, ValueError,
     "second_moments[2]"),
    ({"params": [_SHARED, torch.randn(4, 6), torch.randn(4, 6)],
      "second_moments": [_SHARED.view(-1)[:4], torch.rand(4), torch.rand(4)]}, ValueError,
     "params[0] and second_moments[0]"),
    ({"beta2": 1.0}, ValueError, "beta2"),
    ({"eps": 0.0}, ValueError, "eps"),
]


@pytest.mark.parametrize("overrides, exception, text", STACK_BAD_INPUT,
                         ids=[f"{case[2]}-{i}" for i, case in enumerate(STACK_BAD_INPUT)])
def test_stack_bad_input_raises_naming_the_argument_and_changes_nothing(overrides, exception, text):
    assert_bad_bucket_raises("normuon_step_stack_", overrides, exception, text)


# --------------------------------------------------------------------------------------------------
# torch.library


@pytest.mark.parametrize("backend", KERNELS)  # the torch backend's are among test_dispatch.py's opcheck cases
def test_opcheck(backend):
    device = device_for(backend)
    ops = torch.ops.fastoptim
    param, update = torch.randn(2, 3, 5, device=device), torch.randn(2, 3, 5, device=device)
    second_moment = torch.rand(2, 3, device=device)
    torch.library.opcheck(ops.normuon_step_.default,
                          (param, update, second_moment, 0.1, 0.1, 0.9, 1e-8, 1.0, True, backend))
    lr = torch.tensor(0.1, device=device)
    for lr_value, lr_tensor in ((0.1, None), (0.0, lr)):
        params, updates = bucket("matrix", 3, 4, 6, device), torch.randn(3, 4, 6, device=device)
        torch.library.opcheck(ops.normuon_step_stack_.default,
                              (params, updates, moments(3, 4, device), lr_value, 0.0, lr_tensor,
                               torch.tensor(0.2, device=device), 0.95, 1e-8, 1.5, True, backend))


def test_the_stack_op_is_exported():
    assert "normuon_step_stack_" in fastoptim.__all__ and "normuon_step_stack_" in fastoptim.ops.__all__
    assert hasattr(torch.ops.fastoptim, "normuon_step_stack_")
