"""muon_apply_stack_ and normuon_step_stack_: a shape bucket's step in one multi-tensor call.

Each backend is compared with a loop of its own per-matrix op (muon_apply_ / normuon_step_): bit for bit
for the torch backend and the Triton kernels (in the interpreter on CPU, or on the GPU), and within a
float tolerance of the torch backend for the cuda backend (marked `cuda`, skipped without a GPU). The torch
backend's tensor-lr path is checked against float64 math.
"""

from __future__ import annotations

import math

import pytest
import torch

import fastoptim
from fastoptim import backends, ops

F32, BF16 = torch.float32, torch.bfloat16
TRITON = pytest.param("triton", marks=pytest.mark.triton)
CUDA = pytest.param("cuda", marks=pytest.mark.cuda)
BACKENDS = ["torch", TRITON, CUDA]
# (m, n): odd, one element, one row, tall, wide, rows of whole 16-byte vectors (the kernels' vector paths);
# LARGE: more than one chunk of the Triton tables (16384 elements) and many row tiles.
SHAPES = [(3, 5), (1, 1), (1, 37), (70, 33), (33, 70), (16, 64)]
LARGE = (130, 257)
HYPER = dict(lr=0.05, weight_decay=0.3, scale=1.7)
NORMUON = dict(beta2=0.9, eps=1e-8)
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2**-7, atol=2e-2),
             torch.float16: dict(rtol=1e-3, atol=1e-3)}


def device_for(backend: str) -> torch.device:
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def bucket(kind: str, P: int, m: int, n: int, device, dtype=torch.float32) -> list[torch.Tensor]:
    """P parameters of m·n elements, laid out as an optimizer meets them."""
    if kind == "matrix":
        return [torch.randn(m, n, device=device, dtype=dtype) for _ in range(P)]
    if kind == "bank":  # one 3-D expert bank: params are bank[e]
        return list(torch.randn(P, m, n, device=device, dtype=dtype).unbind(0))
    if kind == "rows":  # row blocks of one tall matrix
        return list(torch.randn(P * m, n, device=device, dtype=dtype).split(m))
    if kind == "conv":  # conv kernels (m, n, 1, 1) and (m, 1, n) read as (m, n)
        return [torch.randn((m, n, 1, 1) if i % 2 else (m, 1, n), device=device, dtype=dtype) for i in range(P)]
    if kind == "mixed":  # float32 and bfloat16 storage in one bucket (one launch per dtype)
        return [torch.randn(m, n, device=device).to(torch.bfloat16 if i % 3 == 1 else dtype) for i in range(P)]
    if kind == "offset":  # contiguous but one element past 16-byte alignment: the kernels' unvectorized paths
        return [torch.randn(m * n + 1, device=device, dtype=dtype)[1:].view(m, n) for _ in range(P)]
    if kind == "transposed":  # non-contiguous: only the torch backend takes it
        return [torch.randn(n, m, device=device, dtype=dtype).mT for _ in range(P)]
    raise ValueError(kind)


def moments(P: int, m: int, device, kind: str = "separate") -> list[torch.Tensor]:
    if kind == "slices":  # one expert bank's (E, m) state, each expert's rows a 1-D slice
        state = torch.rand(P, m, device=device)
        return [state.view(-1)[e * m : (e + 1) * m] for e in range(P)]
    return [torch.rand(m, device=device) for _ in range(P)]


def clone_all(tensors):
    return [t.clone() for t in tensors]


def assert_equal(got, want):
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape and a.dtype == b.dtype, i
        assert torch.equal(a, b), (i, (a.double() - b.double()).abs().max().item())


def assert_close(got, want):
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b.float(), **TOLERANCE[a.dtype])


def muon_loop(params, updates, backend, lr, weight_decay, scale, cautious):
    m, n = updates.shape[1:]
    for p, u in zip(params, updates):
        fastoptim.muon_apply_(p.view(m, n), u, lr, weight_decay, scale, cautious, backend=backend)


def normuon_loop(params, updates, vs, backend, lr, weight_decay, scale, cautious, beta2, eps):
    m, n = updates.shape[1:]
    for p, u, v in zip(params, updates, vs):
        fastoptim.normuon_step_(p.view(m, n), u, v.view(m), lr, weight_decay, beta2, eps, scale, cautious,
                                backend=backend)


# ---------------------------------------------------------------------------------------------------------
# muon_apply_stack_


def check_muon(backend, kind, P, m, n, update_dtype=torch.float32, cautious=True, param_dtype=torch.float32):
    device = device_for(backend)
    params = bucket(kind, P, m, n, device, param_dtype)
    updates = torch.randn(P, m, n, device=device).to(update_dtype)
    expected = clone_all(params)
    before = clone_all(params)
    fastoptim.muon_apply_stack_(params, updates, HYPER["lr"], HYPER["weight_decay"], HYPER["scale"], cautious,
                                backend=backend)
    if backend == "cuda":  # the same formula; compared with the specification within a float tolerance
        muon_loop(expected, updates, "torch", cautious=cautious, **HYPER)
        assert_close(params, expected)
        muon_loop(before, updates, "cuda", cautious=cautious, **HYPER)
        assert_equal(params, before)
    else:
        muon_loop(expected, updates, backend, cautious=cautious, **HYPER)
        assert_equal(params, expected)
        for p, b in zip(params, before):  # every element was written (poison-free inputs: all of them move)
            if p.dtype == torch.float32 and p.numel():
                assert (p != b).float().mean() > 0.99


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m, n", SHAPES, ids=str)
@pytest.mark.parametrize("P", [1, 7])
def test_muon_apply_stack_equals_a_loop_of_muon_apply(backend, m, n, P):
    check_muon(backend, "matrix", P, m, n)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["bank", "rows", "conv", "mixed", "offset"])
@pytest.mark.parametrize("cautious", [False, True])
def test_muon_apply_stack_layouts(backend, kind, cautious):
    check_muon(backend, kind, 5, 12, 16, update_dtype=torch.bfloat16, cautious=cautious)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("param_dtype, update_dtype", [(BF16, BF16), (F32, BF16), (BF16, F32), (torch.float16, F32)])
def test_muon_apply_stack_16_bit_storage(backend, param_dtype, update_dtype):
    check_muon(backend, "matrix", 3, 33, 70, update_dtype=update_dtype, param_dtype=param_dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_muon_apply_stack_crosses_chunks(backend):
    check_muon(backend, "bank", 2, *LARGE, update_dtype=torch.bfloat16)


def test_muon_apply_stack_non_contiguous_params_torch():
    check_muon("torch", "transposed", 3, 7, 5)


# ---------------------------------------------------------------------------------------------------------
# normuon_step_stack_


def check_normuon(backend, kind, P, m, n, update_dtype=torch.float32, cautious=True, moment_kind="separate",
                  param_dtype=torch.float32, update_scale=1.0):
    device = device_for(backend)
    params = bucket(kind, P, m, n, device, param_dtype)
    # Rows of very different size make the row normalization matter.
    updates = (torch.randn(P, m, n, device=device) * torch.rand(P, m, 1, device=device) * update_scale)
    updates = updates.to(update_dtype)
    vs = moments(P, m, device, moment_kind)
    expected, expected_vs = clone_all(params), clone_all(vs)
    args = dict(cautious=cautious, **HYPER, **NORMUON)
    fastoptim.normuon_step_stack_(params, updates, vs, HYPER["lr"], HYPER["weight_decay"], NORMUON["beta2"],
                                  NORMUON["eps"], HYPER["scale"], cautious, backend=backend)
    if backend == "cuda":
        loop_params, loop_vs = clone_all(expected), clone_all(expected_vs)
        normuon_loop(expected, updates, expected_vs, "torch", **args)
        assert_close(params, expected)
        torch.testing.assert_close(torch.stack(vs), torch.stack(expected_vs), rtol=1e-5, atol=1e-6)
        normuon_loop(loop_params, updates, loop_vs, "cuda", **args)
        assert_equal(params, loop_params)
        assert_equal(vs, loop_vs)
    else:
        normuon_loop(expected, updates, expected_vs, backend, **args)
        assert_equal(params, expected)
        assert_equal(vs, expected_vs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m, n", SHAPES, ids=str)
@pytest.mark.parametrize("P", [1, 7])
def test_normuon_step_stack_equals_a_loop_of_normuon_step(backend, m, n, P):
    check_normuon(backend, "matrix", P, m, n)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind, moment_kind", [("bank", "slices"), ("rows", "separate"), ("conv", "separate"),
                                               ("mixed", "slices"), ("offset", "separate")])
@pytest.mark.parametrize("cautious", [False, True])
def test_normuon_step_stack_layouts(backend, kind, moment_kind, cautious):
    check_normuon(backend, kind, 5, 12, 16, update_dtype=torch.bfloat16, cautious=cautious, moment_kind=moment_kind)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("param_dtype, update_dtype", [(BF16, BF16), (F32, BF16), (torch.float16, F32)])
def test_normuon_step_stack_16_bit_storage(backend, param_dtype, update_dtype):
    check_normuon(backend, "matrix", 3, 33, 70, update_dtype=update_dtype, param_dtype=param_dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m, n", [LARGE, (16390, 2)], ids=str)  # many row tiles; more rows than one table chunk
def test_normuon_step_stack_large(backend, m, n):
    check_normuon(backend, "bank", 2, m, n, moment_kind="slices")


def test_normuon_step_stack_non_contiguous_params_torch():
    params = bucket("transposed", 3, 7, 5, "cpu")
    strided_vs = [torch.rand(7, 2)[:, 0] for _ in range(3)]  # 1-D with stride 2
    updates = torch.randn(3, 7, 5)
    expected, expected_vs = [p.contiguous() for p in params], [v.contiguous() for v in strided_vs]
    fastoptim.normuon_step_stack_(params, updates, strided_vs, 0.1, 0.2, backend="torch")
    for p, v, u in zip(expected, expected_vs, updates):
        fastoptim.normuon_step_(p, u, v, 0.1, 0.2, backend="torch")
    assert_equal(params, expected)
    assert_equal(strided_vs, expected_vs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m, n", [(4, 0), (0, 3)], ids=str)
def test_empty_matrices(backend, m, n):
    device = device_for(backend)
    params = [torch.empty(m, n, device=device) for _ in range(3)]
    vs = [torch.rand(m, device=device) + 0.5 for _ in range(3)]
    expected_vs = clone_all(vs)
    updates = torch.empty(3, m, n, device=device)
    fastoptim.muon_apply_stack_(params, updates, 0.1, backend=backend)
    fastoptim.normuon_step_stack_(params, updates, vs, 0.1, beta2=0.5, backend=backend)
    normuon_loop(clone_all(params), updates, expected_vs, "torch", 0.1, 0.0, 1.0, False, 0.5, 1e-10)
    torch.testing.assert_close(vs, expected_vs)  # no columns: v moved halfway toward 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_list_is_a_no_op(backend):
    device = device_for(backend)
    fastoptim.muon_apply_stack_([], torch.empty(0, 3, 4, device=device), 0.1, backend=backend)
    fastoptim.normuon_step_stack_([], torch.empty(0, 3, 4, device=device), [], 0.1, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [0.0, 1e15])
def test_zero_and_huge_values(backend, scale):
    device = device_for(backend)
    check_normuon(backend, "matrix", 3, 33, 70, update_scale=scale)
    params = [torch.full((5, 6), 3e37, device=device) for _ in range(2)]
    updates = torch.full((2, 5, 6), -1e38 if scale else 0.0, device=device)
    expected = clone_all(params)
    fastoptim.muon_apply_stack_(params, updates, 0.5, 0.1, 1.0, backend=backend)
    muon_loop(expected, updates, "torch", 0.5, 0.1, 1.0, False)
    assert_close(params, expected)
    assert all(torch.isfinite(p).all() for p in params)


# ---------------------------------------------------------------------------------------------------------
# lr and weight_decay as 0-dim tensors


def float64_muon(param, update, lr, weight_decay, scale, cautious):
    p, u = param.double(), update.double().view(param.shape)
    decayed = p * (1 - lr * weight_decay)
    if cautious:
        decayed = torch.where(u * p >= 0, decayed, p)
    return decayed - lr * scale * u


def test_torch_backend_tensor_lr_matches_float64_math():
    params = bucket("conv", 4, 6, 9, "cpu")
    updates = torch.randn(4, 6, 9)
    lr, weight_decay = torch.tensor(0.03), torch.tensor(0.7, dtype=torch.float64)
    want = [float64_muon(p, u, 0.03, 0.7, 1.3, True) for p, u in zip(params, updates)]
    fastoptim.muon_apply_stack_(params, updates, lr, weight_decay, 1.3, True, backend="torch")
    for p, w in zip(params, want):
        torch.testing.assert_close(p.double(), w, rtol=1e-6, atol=1e-7)
    # NorMuon: the normalized update from the float64 reference, then the same step formula.
    params = bucket("matrix", 3, 5, 8, "cpu")
    vs = moments(3, 5, "cpu")
    params64, vs64 = [p.double() for p in params], [v.double() for v in vs]
    fastoptim.normuon_step_stack_(params64, updates[:3, :5, :8].contiguous().double(), vs64, 0.03, 0.7, backend="torch")
    fastoptim.normuon_step_stack_(params, updates[:3, :5, :8].contiguous(), vs, torch.tensor(0.03),
                                  torch.tensor(0.7), backend="torch")
    for got, want in zip(params + vs, params64 + vs64):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["lr", "weight_decay", "both"])
@pytest.mark.parametrize("scalar_dtype", [torch.float32, torch.float64])
def test_tensor_hyper_parameters_match_the_float_path(backend, which, scalar_dtype):
    device = device_for(backend)
    values = dict(lr=0.05, weight_decay=0.3)
    tensors = {k: torch.tensor(v, device=device, dtype=scalar_dtype) if which in (k, "both") else v
               for k, v in values.items()}
    params = bucket("mixed", 4, 12, 10, device)
    updates = torch.randn(4, 12, 10, device=device, dtype=torch.bfloat16)
    with_floats, with_tensors = clone_all(params), clone_all(params)
    fastoptim.muon_apply_stack_(with_floats, updates, **values, scale=1.7, cautious=True, backend=backend)
    fastoptim.muon_apply_stack_(with_tensors, updates, **tensors, scale=1.7, cautious=True, backend=backend)
    assert_close(with_tensors, with_floats)  # 1 - lr·wd may differ in its last bit: one ulp of a parameter
    vs = moments(4, 12, device, "slices")
    vs_floats, vs_tensors = clone_all(vs), clone_all(vs)
    fastoptim.normuon_step_stack_(with_floats, updates, vs_floats, **values, backend=backend)
    fastoptim.normuon_step_stack_(with_tensors, updates, vs_tensors, **tensors, backend=backend)
    assert_close(with_tensors, with_floats)
    assert_equal(vs_tensors, vs_floats)  # the row moments do not depend on lr


def test_compiled_step_with_a_tensor_lr_compiles_once():
    from torch._dynamo.testing import CompileCounterWithBackend

    def step(params, vs, updates, lr, weight_decay):
        fastoptim.muon_apply_stack_(params, updates, lr, weight_decay, 2.0, True)
        fastoptim.normuon_step_stack_(params, updates, vs, lr, weight_decay)

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    params, vs = bucket("matrix", 3, 4, 6, "cpu"), moments(3, 4, "cpu")
    eager_params, eager_vs = clone_all(params), clone_all(vs)
    lr, weight_decay = torch.tensor(0.0), torch.tensor(0.1)
    for value in (0.1, 0.02, 0.3, 1e-3, 0.05):
        lr.fill_(value)
        updates = torch.randn(3, 4, 6)
        compiled(params, vs, updates, lr, weight_decay)
        step(eager_params, eager_vs, updates, lr, weight_decay)
        assert_equal(params, eager_params)
        assert_equal(vs, eager_vs)
    assert counter.frame_count == 1


# ---------------------------------------------------------------------------------------------------------
# Launches, fallbacks, bad input, torch.library


class CountingKernel:
    """Stands in for a @triton.jit kernel and counts its launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.mark.triton
@pytest.mark.parametrize("P", [1, 7])
def test_triton_launches_do_not_grow_with_the_bucket(P, monkeypatch):
    from fastoptim.triton_kernels import apply_stack

    names = ("_muon_apply_stack_kernel", "_row_stats_stack_kernel", "_norm_ratio_kernel", "_apply_stack_kernel")
    counters = {name: CountingKernel(getattr(apply_stack, name)) for name in names}
    for name, counter in counters.items():
        monkeypatch.setattr(apply_stack, name, counter)
    device = device_for("triton")
    params, vs = bucket("mixed", P, 6, 5, device), moments(P, 6, device, "slices")
    updates = torch.randn(P, 6, 5, device=device)
    fastoptim.muon_apply_stack_(params, updates, 0.1, backend="triton")
    fastoptim.normuon_step_stack_(params, updates, vs, 0.1, backend="triton")
    groups = len({p.dtype for p in params})  # one launch per parameter dtype
    assert [counters[name].launches for name in names] == [groups, groups, 1, groups]


@pytest.mark.triton
def test_triton_workspaces_need_no_zeroing(monkeypatch):
    # Partial sums and norm ratios live in torch.empty buffers: poisoned with NaN, nothing changes.
    empty = torch.empty

    def poisoned(*args, **kwargs):
        tensor = empty(*args, **kwargs)
        return tensor.fill_(math.nan) if tensor.is_floating_point() else tensor

    monkeypatch.setattr(torch, "empty", poisoned)
    check_normuon("triton", "bank", 3, 33, 70, moment_kind="slices")


@pytest.mark.parametrize("backend", [TRITON, CUDA])
def test_kernel_backends_refuse_what_they_cannot_run_and_change_nothing(backend):
    device = device_for(backend)
    cases = [
        (bucket("transposed", 2, 4, 6, device), torch.randn(2, 4, 6, device=device), "contiguous"),
        (bucket("matrix", 2, 4, 6, device, torch.float64), torch.randn(2, 4, 6, device=device), "float64"),
    ]
    for params, updates, reason in cases:
        vs = moments(2, 4, device)
        before = clone_all(params + vs)
        with pytest.raises(fastoptim.BackendUnavailableError, match=reason):
            fastoptim.muon_apply_stack_(params, updates, 0.1, backend=backend)
        with pytest.raises(fastoptim.BackendUnavailableError, match=reason):
            fastoptim.normuon_step_stack_(params, updates, vs, 0.1, backend=backend)
        assert_equal(params + vs, before)


@pytest.mark.cuda
def test_auto_dispatch_on_cuda_falls_back_for_non_contiguous_params():
    device = torch.device("cuda")
    params, updates = bucket("matrix", 2, 4, 6, device), torch.randn(2, 4, 6, device=device)
    assert backends.select("muon_apply_stack_", "auto", device, (params, updates, 0.1, 0.0, 1.0, False)) == "cuda"
    strided = bucket("transposed", 2, 4, 6, device)
    assert backends.select("muon_apply_stack_", "auto", device, (strided, updates, 0.1, 0.0, 1.0, False)) == "torch"
    vs = [torch.rand(4, device=device, dtype=torch.float64) for _ in range(2)]
    args = (params, updates, vs, 0.1, 0.0, 0.95, 1e-10, 1.0, False)
    assert backends.select("normuon_step_stack_", "auto", device, args) != "cuda"  # float64 row moments


@pytest.mark.cuda
def test_cuda_tensor_lr_step_is_graph_capturable():
    device = torch.device("cuda")
    params, vs = bucket("bank", 4, 64, 96, device), moments(4, 64, device, "slices")
    updates = torch.randn(4, 64, 96, device=device, dtype=torch.bfloat16)
    lr = torch.tensor(0.1, device=device)
    expected, expected_vs = clone_all(params), clone_all(vs)

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
    assert_close(params, expected)
    torch.testing.assert_close(torch.stack(vs), torch.stack(expected_vs), rtol=1e-5, atol=1e-6)


def valid_arguments(op: str):
    params = [torch.randn(4, 6) for _ in range(3)]
    kwargs = dict(params=params, updates=torch.randn(3, 4, 6), lr=0.1, weight_decay=0.1, scale=1.0, cautious=False)
    if op == "normuon_step_stack_":
        kwargs.update(second_moments=[torch.rand(4) for _ in range(3)], beta2=0.95, eps=1e-8)
    return kwargs


BANK = torch.randn(3, 4, 6)
SHARED = torch.randn(4, 6)
BAD = [
    # (ops it applies to, overrides, exception, text the message must contain)
    ("both", {"updates": torch.randn(3, 24)}, ValueError, "updates"),
    ("both", {"updates": torch.randn(2, 4, 6)}, ValueError, "updates"),
    ("both", {"updates": torch.randn(3, 6, 4).mT}, ValueError, "contiguous"),
    ("both", {"updates": torch.randn(3, 4, 6, dtype=torch.complex64)}, TypeError, "updates"),
    ("both", {"updates": torch.zeros(3, 4, 6, dtype=torch.int32)}, TypeError, "updates"),
    ("both", {"params": [torch.randn(4, 6), torch.randn(4, 5), torch.randn(4, 6)]}, ValueError, "params[1]"),
    ("both", {"params": torch.randn(3, 4, 6)}, TypeError, "params"),
    ("both", {"params": [torch.randn(4, 6), torch.zeros(4, 6, dtype=torch.int64), torch.randn(4, 6)]}, TypeError,
     "params[1]"),
    ("both", {"params": [torch.randn(4, 6), torch.randn(4, 6), torch.empty(4, 6, device="meta")]}, ValueError,
     "params[2]"),
    ("both", {"params": [SHARED, torch.randn(4, 6), SHARED]}, ValueError, "params[0] and params[2]"),
    ("both", {"params": [BANK[0], BANK[1], BANK[0]]}, ValueError, "params[0] and params[2]"),
    ("both", {"params": [BANK.view(-1)[:24].view(4, 6), BANK.view(-1)[12:36].view(4, 6), BANK[2]]}, ValueError,
     "params[0] and params[1]"),
    ("both", {"params": [torch.randn(4, 6), torch.zeros(1, 6).expand(4, 6), torch.randn(4, 6)]}, ValueError,
     "params[1]"),
    ("both", {"params": list(BANK), "updates": BANK}, ValueError, "updates"),
    ("both", {"lr": -0.1}, ValueError, "lr"),
    ("both", {"lr": math.nan}, ValueError, "lr"),
    ("both", {"lr": "0.1"}, TypeError, "lr"),
    ("both", {"lr": torch.tensor([0.1])}, ValueError, "lr"),
    ("both", {"lr": torch.tensor(1)}, TypeError, "lr"),
    ("both", {"lr": torch.tensor(0.1, device="meta")}, ValueError, "lr"),
    ("both", {"weight_decay": torch.ones(2)}, ValueError, "weight_decay"),
    ("both", {"weight_decay": torch.tensor(0.1, dtype=torch.complex64)}, TypeError, "weight_decay"),
    ("both", {"weight_decay": -1.0}, ValueError, "weight_decay"),
    ("both", {"scale": math.inf}, ValueError, "scale"),
    ("both", {"cautious": 1}, TypeError, "cautious"),
    ("both", {"backend": "tpu"}, ValueError, "backend"),
    ("normuon_step_stack_", {"second_moments": [torch.rand(4), torch.rand(4)]}, ValueError, "second_moments"),
    ("normuon_step_stack_", {"second_moments": [torch.rand(4), torch.rand(4), torch.rand(6)]}, ValueError,
     "second_moments[2]"),
    ("normuon_step_stack_", {"second_moments": [torch.rand(4), torch.rand(4), torch.rand(4).to(torch.int32)]},
     TypeError, "second_moments[2]"),
    ("normuon_step_stack_", {"second_moments": [torch.rand(4), torch.rand(4), torch.empty(4, device="meta")]},
     ValueError, "second_moments[2]"),
    ("normuon_step_stack_", {"params": [SHARED, torch.randn(4, 6), torch.randn(4, 6)],
                             "second_moments": [SHARED.view(-1)[:4], torch.rand(4), torch.rand(4)]}, ValueError,
     "params[0] and second_moments[0]"),
    ("normuon_step_stack_", {"beta2": 1.0}, ValueError, "beta2"),
    ("normuon_step_stack_", {"eps": 0.0}, ValueError, "eps"),
]
BAD_CASES = [(op, *case[1:]) for case in BAD for op in
             (("muon_apply_stack_", "normuon_step_stack_") if case[0] == "both" else (case[0],))]


@pytest.mark.parametrize("op, overrides, exception, text", BAD_CASES,
                         ids=[f"{c[0]}-{c[3]}-{i}" for i, c in enumerate(BAD_CASES)])
def test_bad_input_raises_naming_the_argument_and_changes_nothing(op, overrides, exception, text):
    kwargs = valid_arguments(op)
    kwargs.update(overrides)
    tensors = [t for value in kwargs.values() for t in (value if isinstance(value, list) else [value])
               if isinstance(t, torch.Tensor) and t.device.type != "meta"]
    before = clone_all(tensors)
    with pytest.raises(exception) as info:
        getattr(fastoptim, op)(**kwargs)
    assert text in str(info.value)
    for t, b in zip(tensors, before):
        assert torch.equal(t, b)


def test_the_ops_are_exported():
    for name in ("muon_apply_stack_", "normuon_step_stack_"):
        assert name in fastoptim.__all__ and name in ops.__all__
        assert hasattr(torch.ops.fastoptim, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    device = device_for(backend)

    def fresh():
        params = bucket("matrix", 3, 4, 6, device)
        return params, torch.randn(3, 4, 6, device=device), moments(3, 4, device)

    lr = torch.tensor(0.1, device=device)
    for lr_value, lr_tensor in ((0.1, None), (0.0, lr)):
        params, updates, vs = fresh()
        torch.library.opcheck(ops._muon_apply_stack_op, (params, updates, lr_value, 0.1, lr_tensor, None, 1.5, True,
                                                         backend))
        params, updates, vs = fresh()
        torch.library.opcheck(ops._normuon_step_stack_op, (params, updates, vs, lr_value, 0.0, lr_tensor,
                                                           torch.tensor(0.2, device=device), 0.95, 1e-8, 1.5, True,
                                                           backend))
