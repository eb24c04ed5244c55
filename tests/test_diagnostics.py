"""fastoptim.diagnostics against exact values on matrices with known spectra."""

from __future__ import annotations

import math

import pytest
import torch

import fastoptim
from fastoptim import diagnostics as diag


def random_orthogonal(n: int, generator: torch.Generator, batch: tuple[int, ...] = ()) -> torch.Tensor:
    Q, R = torch.linalg.qr(torch.randn(*batch, n, n, generator=generator, dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(R, dim1=-2, dim2=-1)).unsqueeze(-2)


def with_spectrum(s: torch.Tensor, m: int, n: int, seed: int = 0) -> torch.Tensor:
    """U diag(s) Vᵀ of shape (..., m, n) with random orthogonal U, V; s (..., min(m, n))."""
    g = torch.Generator().manual_seed(seed)
    batch = tuple(s.shape[:-1])
    k = min(m, n)
    U = random_orthogonal(m, g, batch)[..., :, :k]
    V = random_orthogonal(n, g, batch)[..., :, :k]
    return (U * s.unsqueeze(-2)) @ V.mT


SHAPES = [(6, 6), (5, 9), (13, 4)]


@pytest.mark.parametrize("m, n", SHAPES)
def test_orthogonality_error_exact(m, n):
    k = min(m, n)
    s = torch.linspace(0.6, 1.3, k, dtype=torch.float64)
    X = with_spectrum(s, m, n)
    expected = torch.sqrt(((s**2 - 1) ** 2).sum() / k)
    assert diag.orthogonality_error(X).item() == pytest.approx(expected.item(), rel=1e-10)
    assert diag.orthogonality_error(with_spectrum(torch.ones(k, dtype=torch.float64), m, n)).item() < 1e-12


def test_orthogonality_error_batched_and_newton_schulz():
    G = torch.randn(3, 16, 24, generator=torch.Generator().manual_seed(1))
    X = fastoptim.newton_schulz(G, compute_dtype=torch.float32, backend="torch")
    errors = diag.orthogonality_error(X)
    assert errors.shape == (3,)
    for i in range(3):
        s = torch.linalg.svdvals(X[i].double())
        assert errors[i].item() == pytest.approx(torch.sqrt(((s**2 - 1) ** 2).mean()).item(), rel=1e-4)
    assert diag.orthogonality_error(G.double()).min() > errors.max()


@pytest.mark.parametrize("m, n", SHAPES)
@pytest.mark.parametrize("method", ["svd", "power"])
def test_spectra_known(m, n, method):
    k = min(m, n)
    # A gap at both ends so that a fixed number of power iterations converges.
    s = torch.cat([torch.tensor([9.0]), torch.linspace(2.0, 3.0, k - 2), torch.tensor([0.5])]).double()
    s = torch.stack([s, 2 * s])  # a batch of two
    W = with_spectrum(s, m, n, seed=m * n)
    rel = 1e-10 if method == "svd" else 1e-6
    low, high = diag.singular_value_range(W, method=method, iters=60)
    assert low.tolist() == pytest.approx([0.5, 1.0], rel=rel)
    assert high.tolist() == pytest.approx([9.0, 18.0], rel=rel)
    assert diag.condition_number(W, method=method, iters=60).tolist() == pytest.approx([18.0, 18.0], rel=rel)
    assert diag.spectral_norm(W, method=method, iters=60).tolist() == pytest.approx([9.0, 18.0], rel=rel)
    expected_rank = ((s**2).sum(-1) / s[:, 0] ** 2).tolist()
    assert diag.stable_rank(W, method=method, iters=60).tolist() == pytest.approx(expected_rank, rel=rel)


def test_power_iteration_float32_and_seeded():
    s = torch.tensor([4.0, 1.0, 1.0, 0.9, 0.8, 0.7, 0.25]).double()
    W = with_spectrum(s, 7, 20).float()
    a = diag.condition_number(W, iters=80, seed=3)
    b = diag.condition_number(W, iters=80, seed=3)
    assert a.dtype == torch.float32 and torch.equal(a, b)
    assert a.item() == pytest.approx(16.0, rel=1e-3)
    assert diag.stable_rank(W).item() == pytest.approx((s**2).sum().item() / 16.0, rel=1e-4)


def test_rank_deficient_condition_is_huge_or_inf():
    W = with_spectrum(torch.tensor([2.0, 1.0, 0.0]).double(), 3, 5)
    for method in ("svd", "power"):
        assert diag.condition_number(W, method=method).item() > 1e6
    assert diag.condition_number(torch.zeros(2, 3, 3), method="power").tolist() == [math.inf, math.inf]


def test_row_norm_cv_known_rows():
    norms = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    directions = torch.randn(4, 10, generator=g, dtype=torch.float64)
    M = directions / directions.norm(dim=-1, keepdim=True) * norms[:, None]
    expected = (norms.std(correction=0) / norms.mean()).item()
    assert diag.row_norm_cv(M).item() == pytest.approx(expected, rel=1e-12)
    assert diag.row_norm_cv(torch.stack([M, 2 * M])).tolist() == pytest.approx([expected, expected], rel=1e-12)


def test_normuon_row_cv_before_and_after():
    g = torch.Generator().manual_seed(0)
    norms = torch.tensor([0.5, 1.0, 4.0], dtype=torch.float64)
    O = torch.randn(3, 8, generator=g, dtype=torch.float64)
    O = O / O.norm(dim=-1, keepdim=True) * norms[:, None]
    before, after = diag.normuon_row_cv(O)
    assert before.item() == pytest.approx((norms.std(correction=0) / norms.mean()).item(), rel=1e-12)
    assert after.item() < 1e-8
    # A given second moment: v_i = c_i · mean row square, so the normalized norms are norms/sqrt(v) ∝ 1/sqrt(c).
    c = torch.tensor([1.0, 4.0, 16.0], dtype=torch.float64)
    v = c * (norms**2 / 8)
    _, after = diag.normuon_row_cv(O, v, eps=0.0)
    ratio = 1 / c.sqrt()
    assert after.item() == pytest.approx((ratio.std(correction=0) / ratio.mean()).item(), rel=1e-10)


def test_sophia_win_rate_hand_count():
    m = torch.tensor([0.5, -0.5, 2.0, -3.0, 0.0, 0.01])
    h = torch.tensor([10.0, 1.0, 100.0, 10.0, 0.0, -1.0])
    # rho = 0.1: rho·h = 1, 0.1, 10, 1, 0, -0.1 -> max(., eps=1e-3) = 1, 0.1, 10, 1, 1e-3, 1e-3
    # |ratio| = 0.5 (in), 5 (out), 0.2 (in), 3 (out), 0 (in), 10 (out)  -> 3 of 6
    assert diag.sophia_win_rate(m, h, rho=0.1, eps=1e-3).item() == pytest.approx(0.5)
    rate = diag.sophia_win_rate([m, torch.zeros(2)], [h, torch.ones(2)], rho=0.1, eps=1e-3)
    assert rate.item() == pytest.approx(5 / 8)


def test_sophia_win_rate_matches_the_op():
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(30, generator=g), torch.randn(4, 5, generator=g)]
    grads = [torch.randn_like(p) for p in params]
    exp_avgs = [torch.randn_like(p) * 0.1 for p in params]
    hessians = [torch.rand(p.shape, generator=g) for p in params]
    rate = diag.sophia_win_rate(
        [e.lerp(gr, 1 - 0.965) for e, gr in zip(exp_avgs, grads)], hessians, rho=0.5, eps=1e-12
    )
    op = fastoptim.sophia_step_(
        params, grads, exp_avgs, hessians, lr=0.1, beta1=0.965, rho=0.5, eps=1e-12, return_unclipped=True
    )
    assert rate.item() == pytest.approx(op.item())


def test_noise_scale_from_norms_exact():
    # |G|² = 4, tr Σ = 40: E|G_B|² = 4 + 40/B.
    ns = diag.noise_scale_from_norms(4 + 40 / 8, 4 + 40 / 64, 8, 64)
    assert ns.gradient_sq_norm.item() == pytest.approx(4.0)
    assert ns.trace_covariance.item() == pytest.approx(40.0)
    assert ns.b_simple.item() == pytest.approx(10.0)


def test_gradient_noise_scale_synthetic():
    """Micro-batch gradients G + N(0, Σ/b) with known G and diagonal Σ: B_simple = tr Σ / |G|²."""
    g = torch.Generator().manual_seed(0)
    dim, b, K, trials = 200, 4, 16, 400
    G = torch.full((dim,), 0.1, dtype=torch.float64)  # |G|² = 2
    variances = torch.linspace(0.5, 1.5, dim, dtype=torch.float64)  # tr Σ = 200
    estimates = []
    ema = diag.NoiseScaleEMA(beta=0.99)
    for _ in range(trials):
        noise = torch.randn(K, dim, generator=g, dtype=torch.float64) * (variances / b).sqrt()
        micro = G + noise
        # As lists of per-parameter tensors, split in two "parameters".
        estimate = diag.gradient_noise_scale([[row[:50], row[50:].reshape(15, 10)] for row in micro], b)
        estimates.append(estimate)
        ema.update(estimate)
    trace = torch.stack([e.trace_covariance for e in estimates]).mean().item()
    sq_norm = torch.stack([e.gradient_sq_norm for e in estimates]).mean().item()
    assert trace == pytest.approx(200.0, rel=0.02)
    assert sq_norm == pytest.approx(2.0, rel=0.1)
    assert trace / sq_norm == pytest.approx(100.0, rel=0.12)
    assert ema.b_simple().item() == pytest.approx(100.0, rel=0.5)


def test_optimizer_diagnostics_and_as_floats():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.Linear(8, 3))
    optimizer = fastoptim.Muon(model.parameters(), ns_dtype=torch.float32)
    model(torch.randn(5, 6)).square().mean().backward()
    optimizer.step()
    report = diag.optimizer_diagnostics(optimizer)
    assert set(report) == {"weight_stable_rank_mean", "weight_condition_number_max", "momentum_row_cv_mean"}
    floats = diag.as_floats(report)
    assert all(isinstance(v, float) and math.isfinite(v) for v in floats.values())
    exact = [diag.stable_rank(m.weight.detach(), method="svd").item() for m in (model[0], model[2], model[3])]
    assert floats["weight_stable_rank_mean"] == pytest.approx(sum(exact) / 3, rel=1e-3)

    sophia = fastoptim.SophiaG(model.parameters(), lr=1e-3, rho=0.04, bs=10)
    model(torch.randn(5, 6)).square().mean().backward()
    sophia.step()
    sophia.update_hessian()
    report = diag.as_floats(diag.optimizer_diagnostics(sophia))
    assert 0.0 <= report["sophia_win_rate"] <= 1.0


@pytest.mark.parametrize(
    "call, error, name",
    [
        (lambda: diag.orthogonality_error(torch.ones(3)), ValueError, "X"),
        (lambda: diag.orthogonality_error([[1.0]]), TypeError, "X"),
        (lambda: diag.condition_number(torch.ones(3, 3), method="eig"), ValueError, "method"),
        (lambda: diag.spectral_norm(torch.ones(3, 3), iters=0), ValueError, "iters"),
        (lambda: diag.stable_rank(torch.ones(3, 3, dtype=torch.int64)), TypeError, "W"),
        (lambda: diag.normuon_row_cv(torch.ones(3, 4), torch.ones(4)), ValueError, "second_moment"),
        (lambda: diag.sophia_win_rate(torch.ones(3), torch.ones(4), rho=0.1), ValueError, "hessian"),
        (lambda: diag.sophia_win_rate(torch.ones(3), torch.ones(3), rho=0.0), ValueError, "rho"),
        (lambda: diag.noise_scale_from_norms(1.0, 1.0, 8, 8), ValueError, "batch_big"),
        (lambda: diag.noise_scale_from_norms(torch.ones(2), 1.0, 8, 16), ValueError, "small_sq_norm"),
        (lambda: diag.gradient_noise_scale([torch.ones(3)], 4), TypeError, "micro_grads"),
        (lambda: diag.gradient_noise_scale([torch.ones(3), torch.ones(4)], 4), ValueError, "micro_grads"),
        (lambda: diag.gradient_noise_scale([torch.ones(3), torch.ones(3)], 0), ValueError, "micro_batch_size"),
        (lambda: diag.optimizer_diagnostics("adam"), TypeError, "optimizer"),
    ],
)
def test_bad_input(call, error, name):
    with pytest.raises(error, match=name):
        call()
