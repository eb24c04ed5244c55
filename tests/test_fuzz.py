"""Property-based fuzzing of the ops (hypothesis): ops x backends x dtypes x shapes x magnitudes.

Invariants: finite in -> finite out; Newton–Schulz is scale invariant; a rejected call changes nothing;
a non-finite matrix stays in its own matrix; the Triton backend (the interpreter on CPU, fp32) equals the
torch backend. Bounded for CI: FASTOPTIM_FUZZ_EXAMPLES (default 12 per property) and derandomized, so a
CI run is reproducible; set FASTOPTIM_FUZZ_EXAMPLES=500 for a long local hunt.

Magnitudes reach 1e20 and 1e30 for Newton–Schulz too: its normalization is overflow-safe in every backend
(tests/test_scale.py pins the exact behaviour at the float32 limits).
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastoptim
from fastoptim import backends

EXAMPLES = int(os.environ.get("FASTOPTIM_FUZZ_EXAMPLES", "12"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=EXAMPLES <= 50,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

TRITON_OK = backends.available()["triton"].available
BACKENDS = ["torch"] + (["triton"] if TRITON_OK and not torch.cuda.is_available() else [])
DEVICE = torch.device("cpu")

sizes = st.integers(min_value=0, max_value=9) | st.sampled_from([1, 17, 33])
magnitudes = st.sampled_from([0.0, 1e-30, 1e-3, 1.0, 1e3, 1e20])
ns_magnitudes = st.sampled_from([0.0, 1e-30, 1e-3, 1.0, 1e3, 1e20, 1e30])


def _tensor(shape, magnitude, seed, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * magnitude).to(dtype)


def _finite(*tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


# --------------------------------------------------------------------------------------------------
# Newton–Schulz


@FUZZ
@given(
    batch=st.sampled_from([(), (1,), (3,)]),
    m=sizes,
    n=sizes,
    magnitude=ns_magnitudes,
    seed=st.integers(0, 2**16),
    backend=st.sampled_from(BACKENDS),
)
def test_newton_schulz_finite_scale_invariant_and_backends_agree(batch, m, n, magnitude, seed, backend):
    G = _tensor((*batch, m, n), magnitude, seed)
    X = fastoptim.newton_schulz(G, compute_dtype=torch.float32, backend=backend)
    assert X.shape == G.shape and X.dtype == torch.float32
    assert _finite(X)
    if backend != "torch":
        want = fastoptim.newton_schulz(G, compute_dtype=torch.float32, backend="torch")
        torch.testing.assert_close(X, want, rtol=1e-4, atol=1e-5)
    if magnitude >= 1e-3 and G.numel():  # far above eps: the normalization removes the scale
        scaled = fastoptim.newton_schulz(G * 1024.0, compute_dtype=torch.float32, backend=backend)
        torch.testing.assert_close(scaled, X, rtol=1e-4, atol=1e-5)


@FUZZ
@given(m=sizes, n=sizes, seed=st.integers(0, 2**16), poison=st.sampled_from([float("nan"), float("inf")]))
def test_newton_schulz_nonfinite_matrix_stays_in_its_matrix(m, n, seed, poison):
    G = _tensor((3, m, n), 1.0, seed)
    if G[1].numel():
        G[1].view(-1)[0] = poison
    X = fastoptim.newton_schulz(G, compute_dtype=torch.float32)
    alone = fastoptim.newton_schulz(G[[0, 2]], compute_dtype=torch.float32)
    assert _finite(X[[0, 2]])
    # CPU batched matmul may round a matrix differently by batch size: equal to float32 rounding
    torch.testing.assert_close(X[[0, 2]], alone, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# The elementwise and multi-tensor steps


@FUZZ
@given(
    count=st.integers(1, 4),
    m=sizes,
    n=sizes,
    magnitude=magnitudes,
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
    cautious=st.booleans(),
    seed=st.integers(0, 2**16),
    backend=st.sampled_from(BACKENDS),
)
def test_apply_stacks_finite_and_backends_agree(count, m, n, magnitude, dtype, cautious, seed, backend):
    if backend == "triton" and dtype == torch.float64:
        backend = "torch"  # the kernels take 16/32-bit storage (auto dispatch falls back to torch)
    params = [_tensor((m, n), magnitude, seed + i, dtype) for i in range(count)]
    updates = _tensor((count, m, n), 1.0, seed + 100)
    second = [torch.rand(m, generator=torch.Generator().manual_seed(seed)) for _ in range(count)]
    a = [p.clone() for p in params]
    fastoptim.muon_apply_stack_(a, updates, 0.02, 0.1, 1.5, cautious, backend=backend)
    b = [p.clone() for p in params]
    v = [s.clone() for s in second]
    fastoptim.normuon_step_stack_(b, updates, v, 0.02, 0.1, 0.95, 1e-10, 1.5, cautious, backend=backend)
    assert _finite(*a, *b, *v)
    if backend != "torch":
        a_ref = [p.clone() for p in params]
        fastoptim.muon_apply_stack_(a_ref, updates, 0.02, 0.1, 1.5, cautious, backend="torch")
        b_ref = [p.clone() for p in params]
        v_ref = [s.clone() for s in second]
        fastoptim.normuon_step_stack_(b_ref, updates, v_ref, 0.02, 0.1, 0.95, 1e-10, 1.5, cautious, backend="torch")
        tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
        for got, want in zip(a + b + v, a_ref + b_ref + v_ref):
            torch.testing.assert_close(got, want, rtol=tol, atol=tol * max(magnitude, 1.0))


@FUZZ
@given(
    count=st.integers(1, 3),
    m=sizes,
    n=sizes,
    magnitude=magnitudes,
    nesterov=st.booleans(),
    normalize=st.booleans(),
    out_dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**16),
    backend=st.sampled_from(BACKENDS),
)
def test_momentum_stack_finite_and_backends_agree(
    count, m, n, magnitude, nesterov, normalize, out_dtype, seed, backend
):
    if not normalize:
        out_dtype = torch.float32  # a 16-bit stack cannot hold a 1e20 momentum unless it is normalized
    bufs = [_tensor((m, n), magnitude, seed + i) for i in range(count)]
    grads = [_tensor((m, n), magnitude, seed + 50 + i) for i in range(count)]
    results = {}
    for name in {backend, "torch"}:
        b = [t.clone() for t in bufs]
        out = torch.full((count, m, n), float("nan"), dtype=out_dtype)
        fastoptim.muon_momentum_stack_(b, grads, out, 0.95, nesterov, backend=name, normalize=normalize)
        assert _finite(*b, out)
        if normalize and out.numel():  # every matrix ends with norm 1, or 0 for a zero (or underflowed) one
            norms = torch.linalg.matrix_norm(out.double())
            assert bool(((norms - 1).abs() < 1e-2).logical_or(norms < 1e-6).all()), norms
        results[name] = (b, out)
    b, out = results[backend]
    b_ref, out_ref = results["torch"]
    # A 16-bit stack: one rounding of the stored dtype apart at most (the value cast, then divided).
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[out_dtype]
    atol = tol if normalize else tol * max(magnitude, 1.0)
    torch.testing.assert_close(out.float(), out_ref.float(), rtol=tol, atol=atol)
    for got, want in zip(b, b_ref):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


@FUZZ
@given(
    shapes=st.lists(st.tuples(sizes, sizes), min_size=1, max_size=4),
    magnitude=magnitudes,
    rho=st.sampled_from([1e-3, 0.04, 10.0]),
    seed=st.integers(0, 2**16),
    backend=st.sampled_from(BACKENDS),
)
def test_sophia_finite_and_backends_agree(shapes, magnitude, rho, seed, backend):
    params = [_tensor(s, magnitude, seed + i) for i, s in enumerate(shapes)]
    grads = [_tensor(s, magnitude, seed + 10 + i) for i, s in enumerate(shapes)]
    hessians = [_tensor(s, magnitude, seed + 20 + i).abs() for i, s in enumerate(shapes)]
    results = {}
    for name in {backend, "torch"}:
        p = [t.clone() for t in params]
        m = [torch.zeros_like(t) for t in params]
        h = [t.clone() for t in hessians]
        fraction = fastoptim.sophia_step_(p, grads, m, h, 1e-3, rho=rho, return_unclipped=True, backend=name)
        fastoptim.hessian_ema_(h, grads, 0.99, backend=name)
        assert _finite(*p, *m, *h, fraction) and 0.0 <= float(fraction) <= 1.0
        results[name] = p + m + h
    for got, want in zip(results[backend], results["torch"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * max(magnitude, 1.0))


# --------------------------------------------------------------------------------------------------
# A rejected call changes nothing


BAD_CALLS = {
    "updates of another count": lambda p, u, v: fastoptim.muon_apply_stack_(p, u[:-1], 0.1),
    "negative lr": lambda p, u, v: fastoptim.muon_apply_stack_(p, u, -0.1),
    "nan lr": lambda p, u, v: fastoptim.normuon_step_stack_(p, u, v, float("nan")),
    "beta2 of 1": lambda p, u, v: fastoptim.normuon_step_stack_(p, u, v, 0.1, beta2=1.0),
    "second moment too long": lambda p, u, v: fastoptim.normuon_step_stack_(p, u, [*v[:-1], torch.zeros(99)], 0.1),
    "the same param twice": lambda p, u, v: fastoptim.muon_apply_stack_([p[0], p[0], *p[2:]], u, 0.1),
    "integer param": lambda p, u, v: fastoptim.muon_apply_stack_([p[0].long(), *p[1:]], u, 0.1),
    "unknown backend": lambda p, u, v: fastoptim.muon_apply_stack_(p, u, 0.1, backend="jax"),
    "non-contiguous updates": lambda p, u, v: fastoptim.muon_apply_stack_(p, u.transpose(1, 2), 0.1),
}


@FUZZ
@given(
    bad=st.sampled_from(sorted(BAD_CALLS)),
    m=st.integers(2, 6),
    n=st.integers(2, 6),
    seed=st.integers(0, 2**16),
)
def test_a_rejected_call_changes_nothing(bad, m, n, seed):
    if bad == "non-contiguous updates":
        n = m  # a transposed (P, n, m) stack of the same shape
    params = [_tensor((m, n), 1.0, seed + i) for i in range(3)]
    updates = _tensor((3, m, n), 1.0, seed + 9)
    second = [torch.rand(m) for _ in range(3)]
    before = [t.clone() for t in (*params, updates, *second)]
    with pytest.raises((ValueError, TypeError)):
        BAD_CALLS[bad](params, updates, second)
    for t, b in zip((*params, updates, *second), before):
        assert torch.equal(t, b), bad
