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


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("buf_dtype", DTYPES)
@pytest.mark.parametrize("grad_dtype", DTYPES)
@pytest.mark.parametrize("nesterov", [False, True])
def test_muon_momentum_cuda_matches_torch(shape, buf_dtype, grad_dtype, nesterov):
    buf = torch.randn(shape, device="cuda", dtype=buf_dtype)
    grad = torch.randn(shape, device="cuda", dtype=grad_dtype)
    expected_buf = buf.clone()
    expected = fastoptim.muon_momentum_(expected_buf, grad, 0.9, nesterov, backend="torch")
    out = fastoptim.muon_momentum_(buf, grad, 0.9, nesterov, backend="cuda")
    tol = TOLERANCE[buf_dtype]
    torch.testing.assert_close(buf, expected_buf, rtol=tol, atol=tol)
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)


NORMUON_SHAPES = [(1, 1), (3, 5), (33, 70), (70, 33), (130, 257), (3, 48, 80), (0, 7), (7, 0), (2, 768, 3072)]


@pytest.mark.parametrize("shape", NORMUON_SHAPES, ids=str)
@pytest.mark.parametrize("param_dtype", DTYPES)
@pytest.mark.parametrize("update_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cautious", [False, True])
def test_normuon_step_cuda_matches_torch(shape, param_dtype, update_dtype, cautious):
    param = torch.randn(shape, device="cuda", dtype=param_dtype)
    update = torch.randn(shape, device="cuda", dtype=update_dtype) * torch.rand(shape[:-1] + (1,), device="cuda")
    v = torch.rand(shape[:-1], device="cuda")
    expected_param, expected_v = param.clone(), v.clone()
    args = (0.02, 0.1, 0.9, 1e-8, 1.3, cautious)
    fastoptim.normuon_step_(expected_param, update, expected_v, *args, backend="torch")
    fastoptim.normuon_step_(param, update, v, *args, backend="cuda")
    torch.testing.assert_close(v, expected_v, rtol=1e-5, atol=1e-6)
    tol = TOLERANCE[param_dtype]
    torch.testing.assert_close(param, expected_param, rtol=tol, atol=tol)


def test_normuon_step_cuda_unaligned_rows_take_the_scalar_path():
    base = torch.randn(5 * 12 + 1, device="cuda")
    param = base[1:].view(5, 12)  # 4-byte offset: not 16-byte aligned
    update = torch.randn(5, 12, device="cuda")
    v = torch.zeros(5, device="cuda")
    expected_param, expected_v = param.clone(), v.clone()
    fastoptim.normuon_step_(expected_param, update, expected_v, 0.1, 0.0, 0.5, 1e-8, 1.0, backend="torch")
    fastoptim.normuon_step_(param, update, v, 0.1, 0.0, 0.5, 1e-8, 1.0, backend="cuda")
    torch.testing.assert_close(param, expected_param, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("param_dtype", DTYPES)
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("return_unclipped", [False, True])
def test_sophia_step_cuda_matches_torch(param_dtype, state_dtype, return_unclipped):
    # More tensors than one table holds (24) and one tensor larger than a table's blocks (320 x 65536).
    sizes = [0, 1, 7, 65536, 65537, 300_000] + [1000 + i for i in range(30)] + [320 * 65536 + 5]
    params = [torch.randn(n, device="cuda", dtype=param_dtype) for n in sizes]
    grads = [torch.randn(n, device="cuda", dtype=param_dtype) for n in sizes]
    exp_avgs = [torch.randn(n, device="cuda", dtype=state_dtype) for n in sizes]
    hessians = [torch.randn(n, device="cuda", dtype=state_dtype).abs() for n in sizes]
    hessians[2][0] = -1.0
    copies = [[t.clone() for t in group] for group in (params, grads, exp_avgs, hessians)]
    args = (0.05, 0.9, 0.5, 0.1, 1e-12, return_unclipped)
    expected = fastoptim.sophia_step_(*copies, *args, backend="torch")
    got = fastoptim.sophia_step_(params, grads, exp_avgs, hessians, *args, backend="cuda")
    for a, b in zip(params + exp_avgs, copies[0] + copies[2]):
        tol = TOLERANCE[a.dtype]
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    if return_unclipped:
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_sophia_step_cuda_mixed_dtype_lists_are_grouped():
    params = [torch.randn(100, device="cuda"), torch.randn(50, device="cuda", dtype=torch.bfloat16)]
    grads = [torch.randn_like(p) for p in params]
    exp_avgs = [torch.zeros_like(p) for p in params]
    hessians = [torch.rand_like(p) for p in params]
    copies = [[t.clone() for t in group] for group in (params, grads, exp_avgs, hessians)]
    fastoptim.sophia_step_(*copies, 0.1, backend="torch")
    fastoptim.sophia_step_(params, grads, exp_avgs, hessians, 0.1, backend="cuda")
    for a, b in zip(params, copies[0]):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("hessian_dtype", DTYPES)
@pytest.mark.parametrize("estimate_dtype", DTYPES)
def test_hessian_ema_cuda_matches_torch(hessian_dtype, estimate_dtype):
    sizes = [0, 3, 65537] + [10] * 30
    hessians = [torch.rand(n, device="cuda", dtype=hessian_dtype) for n in sizes]
    estimates = [torch.rand(n, device="cuda", dtype=estimate_dtype) for n in sizes]
    expected = [h.clone() for h in hessians]
    fastoptim.hessian_ema_(expected, estimates, 0.99, backend="torch")
    fastoptim.hessian_ema_(hessians, estimates, 0.99, backend="cuda")
    for a, b in zip(hessians, expected):
        tol = TOLERANCE[hessian_dtype]
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


NS_SHAPES = [(1, 1), (3, 5), (5, 3), (33, 70), (70, 33), (130, 257), (3, 48, 80), (2, 3, 20, 17), (0, 4, 6), (4, 0)]


@pytest.mark.parametrize("shape", NS_SHAPES, ids=str)
@pytest.mark.parametrize("schedule", ["jordan", "you", "polar_express"])
def test_newton_schulz_cuda_fp32_matches_torch(shape, schedule):
    G = torch.randn(shape, device="cuda")
    expected = fastoptim.newton_schulz(G, coefficients=schedule, compute_dtype=torch.float32, backend="torch")
    got = fastoptim.newton_schulz(G, coefficients=schedule, compute_dtype=torch.float32, backend="cuda")
    assert got.shape == G.shape and got.dtype == torch.float32 and got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_newton_schulz_cuda_reads_transposed_input_without_a_copy():
    G = torch.randn(3, 80, 48, device="cuda").mT
    expected = fastoptim.newton_schulz(G.contiguous(), compute_dtype=torch.float32, backend="torch")
    torch.testing.assert_close(fastoptim.newton_schulz(G, compute_dtype=torch.float32, backend="cuda"), expected,
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(512, 1024), (1024, 512), (48, 768, 768), (4096, 4096)], ids=str)
@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float16])
def test_newton_schulz_cuda_bf16_accuracy_rule(shape, compute_dtype):
    """Error against a float64 run of the same iteration at most 2x that of the plain-PyTorch iteration."""
    G = torch.randn(shape, device="cuda")
    exact = fastoptim.newton_schulz(G.double(), compute_dtype=torch.float64, backend="torch")
    plain = fastoptim.newton_schulz(G, compute_dtype=compute_dtype, backend="torch")
    got = fastoptim.newton_schulz(G, compute_dtype=compute_dtype, backend="cuda")
    plain_error = (plain.double() - exact).norm()
    error = (got.double() - exact).norm()
    assert error <= 2 * plain_error + 1e-6, (error.item(), plain_error.item())


def test_newton_schulz_cuda_is_graph_capturable():
    G = torch.randn(4, 64, 96, device="cuda")
    expected = fastoptim.newton_schulz(G, backend="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fastoptim.newton_schulz(G, backend="cuda")  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = torch.ops.fastoptim.newton_schulz(G, fastoptim.coefficients.resolve("jordan").flat(), 1.0, 1e-7,
                                                     torch.bfloat16, False, "cuda")
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, expected)


@pytest.mark.parametrize("shape", [(33, 70), (70, 33), (3, 48, 80), (130, 257)], ids=str)
def test_newton_schulz_cuda_symmetric_path_matches_cublas_path(shape, monkeypatch):
    G = torch.randn(shape, device="cuda")
    monkeypatch.setenv("FASTOPTIM_NS_SYMMETRIC", "0")
    cublas = fastoptim.newton_schulz(G, backend="cuda")
    monkeypatch.setenv("FASTOPTIM_NS_SYMMETRIC", "1")
    symmetric = fastoptim.newton_schulz(G, backend="cuda")
    exact = fastoptim.newton_schulz(G.double(), compute_dtype=torch.float64, backend="torch")
    assert (symmetric.double() - exact).norm() <= 2 * (cublas.double() - exact).norm() + 1e-6


@pytest.mark.parametrize("buf_dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("nesterov", [False, True])
def test_muon_momentum_stack_cuda_matches_torch(buf_dtype, out_dtype, nesterov):
    # 30 matrices: more than one table (24 tensors); 300 x 300 = 90000 elements: two chunks each.
    shapes = [(300, 300)] * 29 + [(300, 3, 100)]
    bufs = [torch.randn(s, device="cuda", dtype=buf_dtype) for s in shapes]
    grads = [torch.randn(s, device="cuda", dtype=buf_dtype) for s in shapes]
    grads[3] = grads[3].float()  # a second dtype group
    expected_bufs = [b.clone() for b in bufs]
    out = torch.full((30, 300, 300), float("nan"), device="cuda", dtype=out_dtype)
    expected = torch.empty_like(out)
    fastoptim.muon_momentum_stack_(expected_bufs, grads, expected, 0.9, nesterov, backend="torch")
    fastoptim.muon_momentum_stack_(bufs, grads, out, 0.9, nesterov, backend="cuda")
    tol = max(TOLERANCE[buf_dtype], TOLERANCE[out_dtype])
    for a, b in zip(bufs, expected_bufs):
        torch.testing.assert_close(a, b, rtol=TOLERANCE[buf_dtype], atol=TOLERANCE[buf_dtype])
    torch.testing.assert_close(out.float(), expected.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (33, 70), (300, 300)], ids=str)
def test_muon_momentum_stack_normalize_cuda_matches_torch(out_dtype, shape):
    # 300 x 300 = 90000 elements: two chunks, so a matrix's norm is summed from two partials.
    bufs = [torch.randn(shape, device="cuda") for _ in range(5)]
    grads = [torch.randn(shape, device="cuda") for _ in range(5)]
    grads[1] = grads[1].bfloat16()  # a second dtype group
    expected_bufs = [b.clone() for b in bufs]
    out = torch.full((5, *shape), float("nan"), device="cuda", dtype=out_dtype)
    expected = torch.empty_like(out)
    options = dict(normalize=True, safety=1.01, eps=1e-7)
    fastoptim.muon_momentum_stack_(expected_bufs, grads, expected, 0.9, True, backend="torch", **options)
    fastoptim.muon_momentum_stack_(bufs, grads, out, 0.9, True, backend="cuda", **options)
    tol = TOLERANCE[out_dtype]
    torch.testing.assert_close(out.float(), expected.float(), rtol=tol, atol=tol)
    norms = torch.linalg.matrix_norm(out.float())
    torch.testing.assert_close(norms, torch.full_like(norms, 1 / 1.01), rtol=1e-2, atol=1e-2)


def _ops_on_fresh_inputs(backend: str, seed: int) -> list[torch.Tensor]:
    """Every op once, on the same fresh random inputs for any backend; returns everything it wrote."""
    generator = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, device="cuda", generator=generator).to(dtype)

    results = [fastoptim.newton_schulz(randn(3, 70, 33), compute_dtype=torch.float32, backend=backend)]
    buf, grad = randn(33, 70), randn(33, 70, dtype=torch.bfloat16)
    results += [fastoptim.muon_momentum_(buf, grad, 0.9, True, backend=backend), buf]
    bufs, grads = [randn(33, 70) for _ in range(3)], [randn(33, 70) for _ in range(3)]
    stack = torch.full((3, 33, 70), float("nan"), device="cuda", dtype=torch.bfloat16)
    fastoptim.muon_momentum_stack_(bufs, grads, stack, 0.9, True, backend=backend, normalize=True, safety=1.01)
    results += [stack, *bufs]
    param, update = randn(130, 257), randn(130, 257, dtype=torch.bfloat16)
    fastoptim.muon_apply_(param, update, 0.02, 0.1, 1.5, True, backend=backend)
    v = randn(130).abs()
    fastoptim.normuon_step_(param, update, v, 0.02, 0.1, 0.9, 1e-8, 1.5, True, backend=backend)
    results += [param, v]
    sizes = [1, 7, 65537, 1000]
    params, grads = [randn(n) for n in sizes], [randn(n) for n in sizes]
    exp_avgs, hessians = [randn(n) for n in sizes], [randn(n).abs() for n in sizes]
    fraction = fastoptim.sophia_step_(params, grads, exp_avgs, hessians, 0.01, return_unclipped=True, backend=backend)
    fastoptim.hessian_ema_(hessians, [g * g for g in grads], 0.99, backend=backend)
    return results + params + exp_avgs + hessians + [fraction]


def test_cuda_and_triton_backends_agree_on_every_op():
    for seed in (0, 1):
        cuda, triton = _ops_on_fresh_inputs("cuda", seed), _ops_on_fresh_inputs("triton", seed)
        for a, b in zip(cuda, triton):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("steps", [0, 1, 2, 5])
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_newton_schulz_cuda_normalized_input_is_read_not_written(steps, compute_dtype):
    G = torch.randn(3, 48, 80, device="cuda")
    X0 = (G / (torch.linalg.matrix_norm(G, keepdim=True) + 1e-7)).to(compute_dtype)
    before = X0.clone()
    kwargs = dict(steps=steps, compute_dtype=compute_dtype, normalized=True)
    out = fastoptim.newton_schulz(X0, backend="cuda", **kwargs)
    assert torch.equal(X0, before) and out.data_ptr() != X0.data_ptr()
    expected = fastoptim.newton_schulz(before, backend="torch", **kwargs)
    tol = TOLERANCE[compute_dtype]
    torch.testing.assert_close(out.float(), expected.float(), rtol=tol, atol=tol)


def test_sophia_and_hessian_ema_cuda_propagate_nan_and_overflow_like_torch():
    # NaN in the Hessian or the momentum: torch.clamp passes it on (fmaxf/fminf would drop it). An fp16
    # Hessian EMA of an estimate beyond fp16's range is inf, as the reference casts the estimate first.
    params = [torch.randn(64, device="cuda")]
    grads = [torch.randn(64, device="cuda")]
    exp_avgs = [torch.randn(64, device="cuda")]
    hessians = [torch.rand(64, device="cuda")]
    hessians[0][3] = float("nan")
    exp_avgs[0][5] = float("nan")
    copies = [[t.clone() for t in group] for group in (params, grads, exp_avgs, hessians)]
    expected = fastoptim.sophia_step_(*copies, 0.1, return_unclipped=True, backend="torch")
    got = fastoptim.sophia_step_(params, grads, exp_avgs, hessians, 0.1, return_unclipped=True, backend="cuda")
    assert params[0][3].isnan() and params[0][5].isnan()
    torch.testing.assert_close(params[0], copies[0][0], equal_nan=True)
    torch.testing.assert_close(got, expected)
    h = [torch.ones(4, device="cuda", dtype=torch.float16)]
    h_expected = [h[0].clone()]
    estimates = [torch.full((4,), 1e6, device="cuda")]
    fastoptim.hessian_ema_(h_expected, estimates, 0.99, backend="torch")
    fastoptim.hessian_ema_(h, estimates, 0.99, backend="cuda")
    assert h_expected[0].isinf().all() and torch.equal(h[0], h_expected[0])


def test_newton_schulz_cuda_empty_matrices_in_a_4d_stack():
    # view(-1, 0, 6) cannot infer the batch: the binding computes it from the leading sizes.
    G = torch.empty(2, 3, 0, 6, device="cuda")
    out = fastoptim.newton_schulz(G, backend="cuda")
    assert out.shape == G.shape and out.dtype == torch.bfloat16


def test_muon_momentum_stack_normalize_cuda_beyond_the_grid_y_limit():
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


def test_muon_momentum_stack_cuda_binding_checks_the_partials_size():
    from fastoptim import _C

    out = torch.empty(2, 300, 300, device="cuda")  # 90000 elements: two chunks per matrix
    bufs = [torch.zeros(300, 300, device="cuda") for _ in range(2)]
    grads = [torch.ones(300, 300, device="cuda") for _ in range(2)]
    too_small = torch.zeros(2, 1, device="cuda")
    with pytest.raises(RuntimeError, match="partials must have at least 2 columns"):
        _C.muon_momentum_stack_(bufs, grads, out, [0, 1], 0.9, True, too_small)
    assert torch.all(bufs[0] == 0)


def test_newton_schulz_and_normuon_cuda_are_bit_reproducible():
    # No float atomics: per-block partial sums are reduced in a fixed order, so repeated runs on the same
    # inputs agree bit for bit (float atomics make the order, hence the last bits, depend on scheduling).
    G = torch.randn(4, 2048, 3072, device="cuda")
    first = fastoptim.newton_schulz(G, backend="cuda")
    for _ in range(4):
        assert torch.equal(fastoptim.newton_schulz(G, backend="cuda"), first)
    update = torch.randn(4, 2048, 3072, device="cuda", dtype=torch.bfloat16)
    results = []
    for _ in range(5):
        param = torch.ones(4, 2048, 3072, device="cuda")
        second_moment = torch.zeros(4, 2048, device="cuda")
        fastoptim.normuon_step_(param, update, second_moment, 0.02, 0.1, 0.95, 1e-10, 1.0, backend="cuda")
        results.append((param, second_moment))
    for param, second_moment in results[1:]:
        assert torch.equal(param, results[0][0]) and torch.equal(second_moment, results[0][1])
