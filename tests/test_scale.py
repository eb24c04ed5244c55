"""Newton–Schulz's normalization at the float32 limits (issue 14, "Scale"), on every backend.

Newton–Schulz is scale-invariant, and its normalization is made overflow-safe by a power-of-two rescale
(`fastoptim.reference.frobenius_normalized`; the kernels rescale only a reduction whose squares overflowed).
Multiplying by a power of two is exact, so with an eps far below every norm here (1e-30) the result for
G·2^k is the result for G *bit for bit*, whether or not ‖G·2^k‖² (or ‖G·2^k‖ itself) overflows: 2^40
overflows nothing, 2^56 / 2^57 only the sum of the per-block partial sums (the CUDA prologue's 16K-element
blocks, the Triton tiles), 2^70 every block's squares, 2^120 the Frobenius norm itself. A float16 bucket
stack is normalized before its cast, so a momentum above 65504 neither overflows nor changes the result.
"""

from __future__ import annotations

import pytest
import torch
from ops_testing import assert_equal, device_for

import fastoptim
from fastoptim import diagnostics, reference

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
TINY_EPS = 1e-30
# 2^k: nothing overflows / only the partial sums' total / every block's squares / the norm itself.
SCALES = [2.0**40, 2.0**56, 2.0**57, 2.0**70, 2.0**120]
# The last shape has several partial sums per matrix: 6 Triton tiles of 32 x 128, or (cuda) 5 blocks of 16K.
SHAPES = [(3, 5, 7), (2, 9, 4), "several partials"]
SEVERAL_PARTIALS = {"cuda": (1, 200, 330)}


def _shape(shape, backend):
    return SEVERAL_PARTIALS.get(backend, (1, 64, 300)) if shape == "several partials" else shape


@pytest.mark.parametrize("dtype", [F32, F64])
def test_reference_normalization_rounds_like_the_plain_formula(dtype):
    U = torch.randn(4, 30, 50, dtype=dtype) * torch.logspace(-3, 3, 4, dtype=dtype)[:, None, None]
    plain = U / (torch.linalg.matrix_norm(U, keepdim=True) * 1.01 + 1e-7)
    assert torch.equal(reference.frobenius_normalized(U, 1.01, 1e-7), plain)


@pytest.mark.parametrize("scale", [1e20, 1e30, 3e38 / 400])
def test_reference_normalization_is_float64_math_beyond_float32_overflow(scale):
    U64 = torch.randn(2, 20, 20, dtype=F64) * scale
    U = U64.float()
    assert torch.isinf(torch.linalg.matrix_norm(U)).all()  # the plain formula would give 0
    want = U.double() / torch.linalg.matrix_norm(U.double(), keepdim=True)
    torch.testing.assert_close(reference.frobenius_normalized(U, 1.0, 1e-7).double(), want, rtol=1e-6, atol=1e-7)


def test_reference_normalization_of_zero_and_non_finite_matrices():
    U = torch.randn(4, 3, 3)
    U[0] = 0
    U[1, 0, 0] = float("inf")
    U[2, 1, 1] = float("nan")
    X = reference.frobenius_normalized(U, 1.0, 1e-7)
    assert torch.equal(X[0], torch.zeros(3, 3))
    assert not torch.isfinite(X[1]).all() or X[1].eq(0).any()  # inf stays non-finite: never a silent number
    assert torch.isnan(X[2]).all()
    torch.testing.assert_close(X[3], U[3] / (torch.linalg.matrix_norm(U[3]) + 1e-7))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("scale", SCALES, ids=lambda s: f"2^{int(torch.tensor(s).log2())}")
def test_newton_schulz_is_bit_for_bit_scale_invariant_up_to_float32_max(backend, shape, scale):
    device = device_for(backend)
    G = torch.randn(_shape(shape, backend), device=device)
    # Two iterations: the normalization is what is under test (and the interpreter is slow).
    want = fastoptim.newton_schulz(G, steps=2, eps=TINY_EPS, compute_dtype=F32, backend=backend)
    got = fastoptim.newton_schulz(G * scale, steps=2, eps=TINY_EPS, compute_dtype=F32, backend=backend)
    assert torch.isfinite(got).all()
    assert_equal(got, want)


@pytest.mark.parametrize("scale", [1e20, 3e38 / 300])
def test_newton_schulz_of_huge_matrices_matches_the_float64_polar_iteration(backend, scale):
    device = device_for(backend)
    G = torch.randn(2, 30, 40, device=device, dtype=F64)
    want = reference.newton_schulz(G, coefficients="polar_express", compute_dtype=F64)
    got = fastoptim.newton_schulz((G * scale).float(), coefficients="polar_express", compute_dtype=F32,
                                  backend=backend)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_newton_schulz_diagnostics_of_a_huge_matrix_are_finite():
    G = torch.randn(16, 24) * 1e20
    X = fastoptim.newton_schulz(G, compute_dtype=F32)
    error = diagnostics.orthogonality_error(X)
    assert torch.isfinite(torch.as_tensor(error)).all()


@pytest.mark.parametrize("out_dtype", [F32, BF16, F16], ids=str)
@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_stack_normalization_is_bit_for_bit_scale_invariant(backend, out_dtype, nesterov):
    # Zero buffers: the momentum is (1 - beta)·grad, and for Nesterov a lerp of the two, linear in the
    # gradient, so scaling the gradients by 2^k scales every value exactly and the normalized stack is the same.
    device = device_for(backend)
    # The second crosses the Triton (16K-element) or the CUDA (64K) chunks.
    shapes = [(33, 70), (200, 330) if backend == "cuda" else (130, 130)]
    for m, n in shapes:
        grads = [torch.randn(m, n, device=device) for _ in range(3)]
        results = []
        for scale in [1.0, 2.0**20, 2.0**57, 2.0**70, 2.0**120]:  # fp16 range / partials' total / squares / norm
            bufs = [torch.zeros(m, n, device=device) for _ in grads]
            out = torch.full((3, m, n), float("nan"), dtype=out_dtype, device=device)
            fastoptim.muon_momentum_stack_(bufs, [g * scale for g in grads], out, 0.9, nesterov, normalize=True,
                                           eps=TINY_EPS, backend=backend)
            assert torch.isfinite(out).all(), (scale, out_dtype)
            results.append(out)
        for out in results[1:]:
            assert_equal(out, results[0])


def test_float16_stack_normalizes_before_the_cast(backend):
    device = device_for(backend)
    grads = [torch.randn(40, 50, device=device) * 1e6 for _ in range(2)]  # momentum far above 65504
    bufs = [torch.randn(40, 50, device=device) * 1e6 for _ in range(2)]
    out = torch.full((2, 40, 50), float("nan"), dtype=F16, device=device)
    fastoptim.muon_momentum_stack_(bufs, grads, out, 0.95, True, normalize=True, safety=1.01, backend=backend)
    norms = torch.linalg.matrix_norm(out.double())
    torch.testing.assert_close(norms, torch.full_like(norms, 1 / 1.01), rtol=2e-3, atol=0)
    for b, g, o in zip(bufs, grads, out):  # b is the new buffer: U = lerp(g, b, 0.95)
        U = g.double().lerp(b.double(), 0.95)
        torch.testing.assert_close(o.double(), U / (1.01 * torch.linalg.matrix_norm(U)), rtol=0, atol=1e-3)


@pytest.mark.parametrize("optimizer", ["Muon", "NorMuon"])
@pytest.mark.parametrize("ns_dtype", [F16, BF16], ids=str)
def test_optimizer_step_with_huge_gradients_equals_the_step_with_small_ones(backend, optimizer, ns_dtype):
    device = device_for(backend)
    torch.manual_seed(0)
    weights = [torch.randn(24, 40, device=device), torch.randn(3, 16, 16, device=device)]
    grads = [torch.randn_like(w) for w in weights]
    results = []
    for scale in [1.0, 2.0**30]:  # 2^30: the fp16 momentum would be ~1e9, far beyond 65504
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        opt = getattr(fastoptim, optimizer)(params, lr=0.02, ns_dtype=ns_dtype, backend=backend)
        for step in range(2):
            for p, g in zip(params, grads):
                p.grad = g * scale * (step + 1)
            opt.step()
        assert all(torch.isfinite(p).all() for p in params)
        results.append([p.detach() for p in params])
    for got, want in zip(*results):  # eps aside, the same steps: a 16-bit rounding (of 0.02) apart at most
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("placement", ["shard", "replicate_shard"])
def test_sharded_layouts_move_a_float16_input_in_float32(tmp_path, placement):
    # The sharded (all-to-all) and gathered (all-gather) layouts cast the Newton–Schulz input before Newton–
    # Schulz normalizes it: for a float16 ns_dtype they move it in float32 (distributed.transport_dtype), so a
    # momentum beyond 65504 stays finite and the step is one process's (world size 1: the same code path).
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from fastoptim.distributed import transport_dtype

    assert transport_dtype(F16) == F32 and transport_dtype(BF16) == BF16 and transport_dtype(F32) == F32
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        shape = (1, 1) if placement == "replicate_shard" else (1,)
        mesh = init_device_mesh("cpu", shape)
        placements = [Replicate(), Shard(0)] if placement == "replicate_shard" else [Shard(0)]
        weight = torch.randn(12, 20)
        grad = torch.randn(12, 20) * 1e6
        results = []
        for distributed in (False, True):
            p = torch.nn.Parameter(distribute_tensor(weight.clone(), mesh, placements) if distributed
                                   else weight.clone())
            opt = fastoptim.Muon([p], lr=0.02, ns_dtype=F16, process_group="auto" if distributed else None)
            for _ in range(2):
                p.grad = distribute_tensor(grad, mesh, placements) if distributed else grad.clone()
                opt.step()
            results.append(p.full_tensor() if distributed else p.detach())
        assert torch.isfinite(results[1]).all()
        torch.testing.assert_close(results[1], results[0], rtol=1e-3, atol=1e-4)
    finally:
        dist.destroy_process_group()
