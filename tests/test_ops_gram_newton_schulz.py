"""Gram Newton–Schulz (`fastoptim.gram_newton_schulz`, `newton_schulz(method="gram"|"auto")`) on every
backend, its FLOP model (`fastoptim.ns_methods`) and the optimizers' ``ns_method``.

The torch backend is compared with the standard iteration (the same polynomial: near-exact in float64)
and with the float64 polar factor from an SVD; the kernels with the torch backend on the same input
(fp32: by the largest entry, TOLERANCE[float32].matrix; 16 bits: flash-attention's rule against float64).
Gram rounds differently from the standard method in 16 bits, so there the rule is the accuracy one:
Gram's error against the float64 iteration within ERROR_RATIO x the standard method's in the same dtype
(or one bf16 rounding, 2^-8, where the standard method happens to be exact: a 1 x 1 matrix). In fp32
both methods differ from float64 by a few fp32 roundings of products of norm <= ~1.2, so they agree to
TOLERANCE[float32].matrix (1e-4; the observed difference is ~5e-6). Every output and workspace is NaN
before the kernels run.
"""

from __future__ import annotations

import pytest
import torch
from ops_testing import (
    EMPTY,
    ERROR_RATIO,
    MATRICES,
    STACKS,
    assert_matrix_close,
    backend_params,
    device_for,
    poisoned_allocations,
    shape_params,
)

import fastoptim
from fastoptim import ns_methods, ops, reference
from fastoptim.coefficients import resolve

S = 768  # GPT-2 small: the MLP weights are 768 x 3072 (and 3072 x 768)


def run(backend: str, G: torch.Tensor, **kwargs) -> torch.Tensor:
    """gram_newton_schulz (fp32 compute by default) on a backend, with NaN-filled outputs and workspaces."""
    kwargs.setdefault("compute_dtype", torch.float32)
    with poisoned_allocations():
        out = fastoptim.gram_newton_schulz(G, backend=backend, **kwargs)
    assert out.shape == G.shape and out.dtype == kwargs["compute_dtype"]
    assert out.is_contiguous() and out.device == G.device
    return out


def check(backend: str, G: torch.Tensor, **kwargs) -> torch.Tensor:
    """A kernel against the torch backend; the torch backend against the standard iteration in float64."""
    out = run(backend, G, **kwargs)
    if backend != "torch":
        assert_matrix_close(out, run("torch", G, **kwargs))
    else:
        standard = {k: v for k, v in kwargs.items() if k != "restarts"}
        exact = fastoptim.newton_schulz(G.double(), backend="torch", **{**standard, "compute_dtype": torch.float64})
        assert_matrix_close(out, exact)
    return out


def relative_errors(X: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """‖X - exact‖_F / ‖exact‖_F per matrix."""
    return torch.linalg.matrix_norm(X.double() - exact) / torch.linalg.matrix_norm(exact)


def assert_16bit_within_ratio(got: torch.Tensor, standard: torch.Tensor, exact: torch.Tensor) -> None:
    assert torch.isfinite(got).all()
    error, plain = relative_errors(got, exact).max().item(), relative_errors(standard, exact).max().item()
    assert error <= max(ERROR_RATIO * plain, 2**-8), (error, plain)


def ill_conditioned(batch: int, m: int, n: int, smallest: float) -> torch.Tensor:
    """(batch, m, n), m <= n, with singular values log-spaced from `smallest` to 1 (a momentum's spectrum
    decays like this; Gaussian matrices have no small singular values)."""
    U, _ = torch.linalg.qr(torch.randn(batch, m, m, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(batch, n, m, dtype=torch.float64))
    sigma = torch.logspace(torch.log10(torch.tensor(smallest)).item(), 0, m, dtype=torch.float64)
    return ((U * sigma) @ V.mT).float()


# --------------------------------------------------------------------------------------------------
# The FLOP model


def test_flops_hand_counted_at_gpt2_small():
    """768 x 3072, 5 steps, one restart after iteration 2 (the default), in units of s³ (l = 4s).
    standard, per iteration: XXᵀ s²l = 4, A² s³ = 1, B·X 2s²l = 8 -> 13; x5 = 65.
    gram: R 4; it. 1: P 1 + R <- PRP 2 = 3; it. 2: P 1 + Q 1 + restart (QX 8 + XXᵀ 4) = 14;
    it. 3: P 1 + PRP 2 = 3; it. 4: P 1 + Q 1 + PRP 2 = 4; it. 5: P 1 + Q 1 = 2; QX 8 -> 38.
    As full GEMMs (every product 2mnk): standard 5 x (8 + 2 + 8) = 90; gram 8 + 6 + 20 + 6 + 8 + 4 + 8 = 60."""
    cube = S**3
    assert ns_methods.default_restarts(5) == (2,)
    for m, n in ((S, 4 * S), (4 * S, S)):
        assert ns_methods.flops(m, n, 5, "standard") == 65 * cube
        assert ns_methods.flops(m, n, 5, "gram") == 38 * cube
        assert ns_methods.flops(m, n, 5, "gram", (2,)) == 38 * cube
        assert ns_methods.flops(m, n, 5, "standard", symmetric=False) == 90 * cube
        assert ns_methods.flops(m, n, 5, "gram", symmetric=False) == 60 * cube
    saving = 1 - ns_methods.flops(S, 4 * S, 5, "gram") / ns_methods.flops(S, 4 * S, 5, "standard")
    assert 0.36 <= saving <= 0.42, saving  # 27/65 = 41.5%
    assert 1 - 60 / 90 < 0.36  # as full GEMMs (cuBLAS without the symmetric kernel): 33%


def test_flops_hand_counted_small_cases():
    # s = 2, l = 3: s²l = 12, s³ = 8, 2s²l = 24 (symmetric products at half).
    assert ns_methods.flops(2, 3, 3, "standard") == 3 * (12 + 8 + 24)
    # no restart: R 12; it. 1: P 8 + PRP 16; it. 2: P 8 + Q 8 + PRP 16; it. 3: P 8 + Q 8; QX 24.
    assert ns_methods.flops(2, 3, 3, "gram", ()) == 12 + 24 + 32 + 16 + 24
    assert ns_methods.flops(3, 2, 3, "gram", (), symmetric=False) == 24 + 48 + 64 + 32 + 24
    # restart after 1: R 12; it. 1: P 8 + (QX 24 + XXᵀ 12); it. 2: P 8 (Q = P: free); QX 24.
    assert ns_methods.flops(2, 3, 2, "gram", (1,)) == 12 + 8 + 36 + 8 + 24
    assert ns_methods.flops(2, 3, 0, "gram") == ns_methods.flops(2, 3, 0, "standard") == 0
    assert ns_methods.flops(0, 5, 5, "gram") == ns_methods.flops(5, 0, 5, "standard") == 0


def test_default_restarts():
    expected = {0: (), 1: (), 2: (), 3: (), 4: (2,), 5: (2,), 6: (2, 4), 7: (2, 4), 8: (2, 4, 6)}
    for steps, restarts in expected.items():
        assert ns_methods.default_restarts(steps) == restarts
        assert ns_methods.check_restarts(None, steps) == restarts


def test_auto_takes_gram_where_it_has_fewer_flops_both_ways():
    # 5 steps: gram wins as full GEMMs from l/s > 1.5 (8r + 28 < 20r + 10), with symmetric products from l/s > 1.
    assert ns_methods.choose_method(S, S, 5) == "standard"
    assert ns_methods.choose_method(ns_methods.GRAM_MIN_SIZE - 1, 4 * S, 5) == "standard"  # small: see GRAM_MIN_SIZE
    assert ns_methods.choose_method(ns_methods.GRAM_MIN_SIZE, 4 * S, 5) == "gram"
    assert ns_methods.choose_method(S, S * 3 // 2, 5) == "standard"  # a tie as full GEMMs: standard
    assert ns_methods.choose_method(S, S * 3 // 2 + 8, 5) == "gram"
    assert ns_methods.choose_method(4 * S, S, 5) == ns_methods.choose_method(S, 3 * S, 5) == "gram"
    assert ns_methods.choose_method(S, 4 * S, 0) == ns_methods.choose_method(0, 4 * S, 5) == "standard"
    assert ns_methods.op_name("auto", S, 4 * S, 5) == "gram_newton_schulz"
    assert ns_methods.op_name("auto", S, S, 5) == ns_methods.op_name("standard", S, 4 * S, 5) == "newton_schulz"
    for m, n in ((S, 4 * S), (S, S)):
        for symmetric in (True, False):
            gram = ns_methods.flops(m, n, 5, "gram", symmetric=symmetric)
            standard = ns_methods.flops(m, n, 5, "standard", symmetric=symmetric)
            assert (gram < standard) == (m != n)


def test_auto_runs_the_chosen_method(monkeypatch):
    calls = []
    original = ops.gram_newton_schulz
    monkeypatch.setattr(ops, "gram_newton_schulz", lambda *args: calls.append(args[0].shape) or original(*args))
    wide, square = torch.randn(2, 64, 160), torch.randn(64, 64)
    assert torch.equal(ops.newton_schulz(wide, method="auto"), original(wide))
    assert torch.equal(ops.newton_schulz(square, method="auto"), ops.newton_schulz(square))
    assert calls == [wide.shape]


# --------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "kwargs, text",
    [
        ({"method": "fast"}, "method must be one of"),
        ({"method": None}, "method must be one of"),
        ({"method": "gram", "restarts": [0]}, "restarts must hold integers"),
        ({"method": "gram", "restarts": [5]}, "restarts must hold integers"),
        ({"method": "gram", "restarts": [3, 2]}, "restarts must be strictly increasing"),
        ({"method": "gram", "restarts": [2, 2]}, "restarts must be strictly increasing"),
        ({"method": "gram", "restarts": [True]}, "restarts must hold integers"),
        ({"method": "auto", "restarts": "2"}, "restarts must be None or a sequence"),
        ({"restarts": [2]}, "restarts applies to method='gram'"),
        ({"method": "gram", "steps": 2, "restarts": [2]}, "restarts must hold integers"),
    ],
)
def test_bad_method_or_restarts_are_refused_naming_the_argument(kwargs, text):
    G = torch.randn(4, 6)
    before = G.clone()
    with pytest.raises(ValueError, match=text):
        fastoptim.newton_schulz(G, **kwargs)
    assert torch.equal(G, before)
    with pytest.raises(ValueError, match="method must be 'standard' or 'gram'"):
        ns_methods.flops(4, 6, 5, "auto")


def test_gram_op_checks_its_arguments_like_the_standard_one():
    with pytest.raises(ValueError, match="G"):
        fastoptim.gram_newton_schulz(torch.randn(5))
    with pytest.raises(ValueError, match="eps"):
        fastoptim.gram_newton_schulz(torch.randn(4, 6), eps=0.0)
    with pytest.raises(ValueError, match="backend"):
        fastoptim.gram_newton_schulz(torch.randn(4, 6), backend="tpu")
    with pytest.raises(ValueError, match="restarts"):
        fastoptim.gram_newton_schulz(torch.randn(4, 6), restarts=(7,))


# --------------------------------------------------------------------------------------------------
# The reference against float64 math


@pytest.mark.parametrize("coefficients", ["jordan", "you", "polar_express"])
@pytest.mark.parametrize("shape", shape_params(*MATRICES, *STACKS))
def test_reference_is_the_standard_iteration_in_float64(coefficients, shape):
    G = torch.randn(shape, dtype=torch.float64)
    standard = reference.newton_schulz(G, None, coefficients, 1e-7, torch.float64)
    for restarts in (None, (), (1, 3), (1, 2, 3, 4)):
        gram = reference.gram_newton_schulz(G, None, coefficients, 1e-7, torch.float64, restarts=restarts)
        assert_matrix_close(gram, standard, torch.float64)


def test_reference_tall_is_the_transpose_of_wide():
    G = torch.randn(3, 20, 44)
    wide = reference.gram_newton_schulz(G, None, "you", 1e-7, torch.float32)
    tall = reference.gram_newton_schulz(G.mT, None, "you", 1e-7, torch.float32)
    assert torch.equal(tall, wide.mT)


@pytest.mark.parametrize("compute_dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
def test_reference_against_the_polar_factor(compute_dtype):
    """Polar Express converges to the polar factor U Vᵀ: Gram's distance to it (float64, from an SVD)
    is the standard method's in float64 and within ERROR_RATIO of it in fp32 and bf16."""
    G = torch.randn(3, 48, 160)
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    polar = U @ Vh
    standard = reference.newton_schulz(G, 8, "polar_express", 1e-7, compute_dtype)
    gram = reference.gram_newton_schulz(G, 8, "polar_express", 1e-7, compute_dtype)
    error, plain = relative_errors(gram, polar).max().item(), relative_errors(standard, polar).max().item()
    assert plain < {torch.float64: 0.05, torch.float32: 0.05, torch.bfloat16: 0.1}[compute_dtype]
    assert error <= ERROR_RATIO * plain, (error, plain)
    if compute_dtype == torch.float64:
        assert abs(error - plain) < 1e-10
    eye = torch.eye(48, dtype=torch.float64)
    orthogonality = torch.linalg.matrix_norm(gram.double() @ gram.double().mT - eye, ord=2).max().item()
    plain_orthogonality = torch.linalg.matrix_norm(standard.double() @ standard.double().mT - eye, ord=2).max().item()
    assert orthogonality <= ERROR_RATIO * plain_orthogonality + 1e-6, (orthogonality, plain_orthogonality)


@pytest.mark.parametrize("coefficients", ["jordan", "you", "polar_express"])
@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
# Gram sides s >= 16 and vectors: on smaller matrices Gram's 16-bit error can be far larger than the
# standard method's (`fastoptim.ns_methods.GRAM_MIN_SIZE`; auto keeps those on the standard method).
@pytest.mark.parametrize("shape", shape_params((1, 37), (37, 1), (33, 70), (70, 33), (3, 48, 80)))
def test_reference_16bit_error_within_twice_standard(coefficients, compute_dtype, shape):
    G = torch.randn(shape)
    exact = reference.newton_schulz(G.double(), None, coefficients, 1e-7, torch.float64)
    standard = reference.newton_schulz(G, None, coefficients, 1e-7, compute_dtype)
    gram = reference.gram_newton_schulz(G, None, coefficients, 1e-7, compute_dtype)
    assert_16bit_within_ratio(gram, standard, exact)


@pytest.mark.parametrize("coefficients", ["jordan", "you", "polar_express"])
@pytest.mark.parametrize("smallest", [1e-2, 1e-3, 1e-5])
def test_restarts_keep_bfloat16_within_twice_standard_and_their_absence_does_not(coefficients, smallest):
    """What the restarts are for: on ill-conditioned input (singular values down to `smallest`), Q grows
    like 1/σ on the small singular values and amplifies the bf16 rounding of R. With the default restart
    (after iteration 2 of 5) Gram's error against float64 stays within ERROR_RATIO x the standard
    method's; without restarts it is several times larger (10-1000x, measured; asserted: > 4x)."""
    G = ill_conditioned(4, 96, 384, smallest)
    exact = reference.newton_schulz(G.double(), None, coefficients, 1e-7, torch.float64)
    standard = reference.newton_schulz(G, None, coefficients, 1e-7, torch.bfloat16)
    plain = relative_errors(standard, exact).max().item()
    restarted = reference.gram_newton_schulz(G, None, coefficients, 1e-7, torch.bfloat16)
    assert relative_errors(restarted, exact).max().item() <= ERROR_RATIO * plain
    unrestarted = reference.gram_newton_schulz(G, None, coefficients, 1e-7, torch.bfloat16, restarts=())
    error = relative_errors(unrestarted, exact).nan_to_num(float("inf")).max().item()
    assert error > 4 * plain, (error, plain)


def test_restarts_every_other_iteration_keep_eight_steps_stable():
    """8 steps (default restarts after 2, 4, 6): within ERROR_RATIO of the standard method in bf16 on an
    ill-conditioned input where restarting after 2 and 5 alone (segments of three) is far off."""
    G = ill_conditioned(4, 96, 384, 1e-3)
    exact = reference.newton_schulz(G.double(), 8, "jordan", 1e-7, torch.float64)
    plain = relative_errors(reference.newton_schulz(G, 8, "jordan", 1e-7, torch.bfloat16), exact).max().item()
    restarted = reference.gram_newton_schulz(G, 8, "jordan", 1e-7, torch.bfloat16)
    assert relative_errors(restarted, exact).max().item() <= ERROR_RATIO * plain
    sparse = reference.gram_newton_schulz(G, 8, "jordan", 1e-7, torch.bfloat16, restarts=(2, 5))
    assert relative_errors(sparse, exact).nan_to_num(float("inf")).max().item() > 4 * plain


# --------------------------------------------------------------------------------------------------
# Every backend


GRAM_SHAPES = [(1, 1), (5, 3), (1, 37), (37, 1), (20, 36), (36, 20), (2, 24, 40)]


@pytest.mark.parametrize("restarts", [None, (), (1, 3)], ids=["default", "none", "1-3"])
@pytest.mark.parametrize("shape", shape_params(*GRAM_SHAPES))
def test_matches_torch(backend, shape, restarts):
    check(backend, torch.randn(shape, device=device_for(backend)), restarts=restarts)


@pytest.mark.parametrize("steps", [0, 1, 2, 6])
def test_step_counts(backend, steps):
    check(backend, torch.randn(2, 9, 30, device=device_for(backend)), steps=steps, coefficients="polar_express")


@pytest.mark.parametrize("layout", ["transposed", "float64", "bfloat16", "four-dim"])
def test_input_layouts_and_dtypes(backend, layout):
    device = device_for(backend)
    if layout == "transposed":
        G = torch.randn(2, 30, 12, device=device).mT
    elif layout == "four-dim":
        G = torch.randn(2, 2, 7, 11, device=device)
    else:
        G = torch.randn(12, 30, device=device).to(getattr(torch, layout))
    if backend == "cuda" and layout == "float64":  # its prologue reads 32- and 16-bit input only
        with pytest.raises(fastoptim.BackendUnavailableError, match="float64"):
            fastoptim.gram_newton_schulz(G, steps=2, compute_dtype=torch.float32, backend="cuda")
        return
    out = check(backend, G, steps=3)
    if layout == "transposed":
        assert_matrix_close(out, run(backend, G.contiguous(), steps=3))


def test_float64_compute_runs_on_torch_and_is_refused_by_the_kernels(backend):
    G = torch.randn(6, 10, device=device_for(backend))
    if backend == "torch":
        assert run("torch", G, compute_dtype=torch.float64).dtype == torch.float64
        return
    with pytest.raises(fastoptim.BackendUnavailableError, match="float64"):
        fastoptim.gram_newton_schulz(G, compute_dtype=torch.float64, backend=backend)


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", shape_params(*EMPTY))
def test_empty(backend, compute_dtype, shape):
    run(backend, torch.randn(shape, device=device_for(backend)), compute_dtype=compute_dtype)


def test_zero_matrix(backend):
    out = check(backend, torch.zeros(2, 7, 12, device=device_for(backend)))
    assert (out == 0).all()


@pytest.mark.parametrize("shape", shape_params((20, 36), (36, 20)))
def test_normalized_input_is_read_not_written(backend, shape):
    G = torch.randn(shape, device=device_for(backend))
    X0 = G / (torch.linalg.matrix_norm(G, keepdim=True) + 1e-7)
    before = X0.clone()
    out = check(backend, X0, normalized=True)
    assert torch.equal(X0, before) and out.data_ptr() != X0.data_ptr()
    assert_matrix_close(out, run("torch", G))


@pytest.mark.parametrize("backend", backend_params("triton", "cuda"))
@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", shape_params((24, 40), (40, 24)))
def test_kernels_16bit_error_within_twice_standard(backend, compute_dtype, shape):
    """Flash-attention's rule against the float64 iteration, with the standard method in the same dtype
    as the plain result (in the interpreter the 16-bit tiles are upcast to an fp32 tl.dot)."""
    G = torch.randn(shape, device=device_for(backend))
    exact = reference.newton_schulz(G.double().cpu(), None, "jordan", 1e-7, torch.float64).to(G.device)
    standard = reference.newton_schulz(G, None, "jordan", 1e-7, compute_dtype)
    assert_16bit_within_ratio(run(backend, G, compute_dtype=compute_dtype), standard, exact)


def test_newton_schulz_method_gram_is_the_gram_op(backend):
    G = torch.randn(2, 12, 30, device=device_for(backend))
    kwargs = dict(compute_dtype=torch.float32, backend=backend)
    gram = fastoptim.newton_schulz(G, method="gram", restarts=(1,), **kwargs)
    assert torch.equal(gram, fastoptim.gram_newton_schulz(G, restarts=(1,), **kwargs))
    standard = fastoptim.newton_schulz(G, **kwargs)
    assert torch.equal(fastoptim.newton_schulz(G, method="auto", **kwargs), standard)  # s = 12 < GRAM_MIN_SIZE
    assert torch.equal(standard, fastoptim.newton_schulz(G, method="standard", **kwargs))
    assert_matrix_close(gram, standard)


# --------------------------------------------------------------------------------------------------
# Triton internals


def _triton_module():
    pytest.importorskip("triton")
    from fastoptim.triton_kernels import gram_newton_schulz as gram
    from fastoptim.triton_kernels import newton_schulz as standard

    return gram, standard


@pytest.mark.triton
@pytest.mark.parametrize("shape", shape_params((37, 50), (50, 37)))
def test_triton_many_tiles_small_blocks(shape):
    """Blocks of 16: several tiles on each side of every s x s matrix, partial edge tiles, and the
    diagonal kernel over more than one block of its own."""
    gram, standard = _triton_module()
    G = torch.randn(shape, device=device_for("triton"))
    schedule = resolve("you", 4)
    config = standard._Config(block=16, block_k=16, num_warps=4, num_stages=2)
    out = gram._gram_newton_schulz(G, schedule, 1e-7, torch.float32, restarts=(2,), config=config, poison=True)
    assert_matrix_close(out, reference.gram_newton_schulz(G, None, schedule, 1e-7, torch.float32, restarts=(2,)))


@pytest.mark.triton
def test_triton_diagonal_kernel_crosses_its_block(monkeypatch):
    gram, _ = _triton_module()
    monkeypatch.setattr(gram, "_DIAGONAL_BLOCK", 8)
    check("triton", torch.randn(20, 26, device=device_for("triton")), steps=3, restarts=(1,))


@pytest.mark.triton
def test_triton_long_stack_is_launched_in_chunks(monkeypatch):
    gram, _ = _triton_module()
    monkeypatch.setattr(gram, "_MAX_BATCH_PER_LAUNCH", 2)
    check("triton", torch.randn(5, 6, 10, device=device_for("triton")), steps=3)


@pytest.mark.triton
def test_triton_diagonal_kernel_forms_offsets_in_int64():
    import inspect

    gram, _ = _triton_module()
    source = inspect.getsource(gram._add_identity_kernel.fn)
    assert "batch = tl.program_id(1)" in source and "_batch_offset(batch" in source and "_row_offset(" in source


# --------------------------------------------------------------------------------------------------
# cuda internals


def test_cuda_driver_composition_on_cpu():
    """The cuda driver's iteration (`_gram_iterate`, ATen GEMMs) runs on CPU tensors when the symmetric
    kernel is off: it is the reference's iteration (float64: near-exact; fp32: TOLERANCE.matrix)."""
    cuda_backend = pytest.importorskip("fastoptim._cuda_backend", exc_type=ImportError)
    for shape in ((2, 20, 44), (2, 44, 20)):
        for restarts in ((), (2,), (1, 3)):
            for dtype in (torch.float64, torch.float32):
                G = torch.randn(shape)
                schedule = resolve("polar_express", 5)
                X0 = reference.newton_schulz(G, 0, schedule, 1e-7, dtype)
                with poisoned_allocations():
                    got = cuda_backend._gram_iterate(X0, schedule, restarts, False)
                want = reference.gram_newton_schulz(G, None, schedule, 1e-7, dtype, restarts=restarts)
                assert_matrix_close(got, want, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("shape", shape_params((33, 70), (70, 33), (3, 48, 80), (130, 257)))
def test_cuda_symmetric_path_matches_cublas_path(shape, monkeypatch):
    G = torch.randn(shape, device="cuda")
    exact = fastoptim.newton_schulz(G.double(), compute_dtype=torch.float64, backend="torch")
    monkeypatch.setenv("FASTOPTIM_NS_SYMMETRIC", "0")
    cublas = fastoptim.gram_newton_schulz(G, backend="cuda")
    monkeypatch.setenv("FASTOPTIM_NS_SYMMETRIC", "1")
    symmetric = fastoptim.gram_newton_schulz(G, backend="cuda")
    assert (symmetric.double() - exact).norm() <= 2 * (cublas.double() - exact).norm() + 1e-6


@pytest.mark.cuda
@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", shape_params((768, 3072), (3072, 768), (4, 512, 1536)))
def test_cuda_and_triton_16bit_at_gpu_sizes(compute_dtype, shape):
    G = torch.randn(shape, device="cuda")
    exact = reference.newton_schulz(G.double(), None, "jordan", 1e-7, torch.float64)
    standard = reference.newton_schulz(G, None, "jordan", 1e-7, compute_dtype)
    for backend in ("cuda", "triton"):
        assert_16bit_within_ratio(run(backend, G, compute_dtype=compute_dtype), standard, exact)


@pytest.mark.cuda
def test_cuda_is_graph_capturable():
    G = torch.randn(4, 64, 160, device="cuda")
    expected = fastoptim.gram_newton_schulz(G, backend="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fastoptim.gram_newton_schulz(G, backend="cuda")  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = torch.ops.fastoptim.gram_newton_schulz(G, resolve("jordan").flat(), 1.0, 1e-7, torch.bfloat16,
                                                          False, [2], "cuda")
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, expected)


# --------------------------------------------------------------------------------------------------
# torch.library and torch.compile


def test_opcheck():
    jordan = [3.4445, -4.775, 2.0315]
    torch.library.opcheck(ops._gram_newton_schulz_op, (torch.randn(2, 5, 9), jordan * 3, 1.0, 1e-7, torch.float32,
                                                       False, [1], "torch"))
    torch.library.opcheck(ops._gram_newton_schulz_op, (torch.randn(9, 5), jordan * 2, 1.01, 1e-7, torch.bfloat16,
                                                       True, [], "torch"))


def test_torch_compile_traces_method_auto_without_graph_breaks():
    def orthogonalize(G):
        return fastoptim.newton_schulz(G, compute_dtype=torch.float32, method="auto")

    G = torch.randn(64, 160)
    explanation = torch._dynamo.explain(orthogonalize)(G)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(orthogonalize, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(G), fastoptim.gram_newton_schulz(G, compute_dtype=torch.float32))


# --------------------------------------------------------------------------------------------------
# The optimizers' ns_method


def _model(width: int = 64) -> torch.nn.Module:
    """Three hidden matrices: (2.5w, w), (w, 2.5w) and (w, w); w = 64 is GRAM_MIN_SIZE, where auto starts
    taking gram."""
    wide = width * 5 // 2
    return torch.nn.Sequential(torch.nn.Linear(width, wide, bias=False), torch.nn.Linear(wide, width),
                               torch.nn.Linear(width, width))


def _steps(optimizer_class, ns_method: str, ns_dtype: torch.dtype, steps: int = 3, **kwargs) -> tuple:
    torch.manual_seed(0)
    model = _model().double() if ns_dtype == torch.float64 else _model()
    optimizer = optimizer_class(model.parameters(), lr=0.02, ns_method=ns_method, ns_dtype=ns_dtype,
                                backend="torch", **kwargs)
    for _ in range(steps):
        x = torch.randn(8, 64).to(next(model.parameters()).dtype)
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()], optimizer


@pytest.mark.parametrize("optimizer_class", [fastoptim.Muon, fastoptim.NorMuon], ids=["muon", "normuon"])
def test_optimizer_ns_method_end_to_end(optimizer_class):
    """Gram steps equal standard steps in float64 (the same polynomial); in bfloat16 ns_dtype the parameters
    stay within ERROR_RATIO x the standard method's distance from the float64 run."""
    standard, _ = _steps(optimizer_class, "standard", torch.float64)
    for method in ("gram", "auto"):
        gram, optimizer = _steps(optimizer_class, method, torch.float64)
        assert all(group["ns_method"] == method for group in optimizer.param_groups)
        for a, b in zip(gram, standard):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    exact = standard
    standard, _ = _steps(optimizer_class, "standard", torch.bfloat16)
    gram, _ = _steps(optimizer_class, "gram", torch.bfloat16)
    for a, b, want in zip(gram, standard, exact):
        if a.dim() == 2:  # the matrices (the biases take AdamW steps)
            assert (a.double() - want).norm() <= ERROR_RATIO * (b.double() - want).norm()


def test_optimizer_ns_method_runs_gram_where_asked(monkeypatch):
    shapes = []
    original = ops.gram_newton_schulz
    monkeypatch.setattr(ops, "gram_newton_schulz", lambda G, *args: shapes.append(tuple(G.shape)) or original(G, *args))
    _steps(fastoptim.Muon, "auto", torch.float32, steps=1)
    assert sorted(shapes) == [(1, 64, 160), (1, 160, 64)]  # the rectangular buckets; the square one stays standard
    shapes.clear()
    _steps(fastoptim.Muon, "gram", torch.float32, steps=1)
    assert sorted(shapes) == [(1, 64, 64), (1, 64, 160), (1, 160, 64)]
    shapes.clear()
    _steps(fastoptim.NorMuon, "standard", torch.float32, steps=1)
    assert shapes == []


@pytest.mark.parametrize("optimizer_class", [fastoptim.Muon, fastoptim.NorMuon], ids=["muon", "normuon"])
def test_optimizer_ns_method_survives_state_dict(optimizer_class):
    _, optimizer = _steps(optimizer_class, "gram", torch.float32, steps=1)
    saved = optimizer.state_dict()
    assert all(group["ns_method"] == "gram" for group in saved["param_groups"])
    fresh = optimizer_class(_model().parameters(), ns_method="standard")
    fresh.load_state_dict(saved)
    assert all(group["ns_method"] == "gram" for group in fresh.param_groups)


def test_optimizer_refuses_a_bad_ns_method_naming_it():
    with pytest.raises(ValueError, match="ns_method must be one of"):
        fastoptim.Muon(_model().parameters(), ns_method="fast")
    with pytest.raises(ValueError, match="ns_method must be one of"):
        fastoptim.NorMuon([{"params": list(_model().parameters()), "ns_method": "polar"}])


def test_optimizer_ns_restarts_reach_the_op(monkeypatch):
    """ns_restarts goes to every gram call as given (None: the op's default); the standard buckets of
    "auto" get none."""
    seen = []
    original = ops.gram_newton_schulz
    monkeypatch.setattr(ops, "gram_newton_schulz",
                        lambda G, *args, **kwargs: seen.append(args[-1]) or original(G, *args, **kwargs))
    _steps(fastoptim.Muon, "gram", torch.float32, steps=1, ns_restarts=[1, 3])
    assert seen == [(1, 3)] * 3
    seen.clear()
    _steps(fastoptim.NorMuon, "auto", torch.float32, steps=1, ns_restarts=())
    assert seen == [()] * 2  # the two rectangular buckets; the square one runs the standard method
    seen.clear()
    _steps(fastoptim.Muon, "gram", torch.float32, steps=1)
    assert seen == [None] * 3


@pytest.mark.parametrize("optimizer_class", [fastoptim.Muon, fastoptim.NorMuon], ids=["muon", "normuon"])
def test_optimizer_ns_restarts_change_the_16_bit_result_not_the_exact_one(optimizer_class):
    """In float64 the restarts change nothing (the same polynomial); in bfloat16 they change the rounding,
    so the option really arrives (a run without restarts differs from the default one)."""
    exact, _ = _steps(optimizer_class, "gram", torch.float64, steps=2)
    none, _ = _steps(optimizer_class, "gram", torch.float64, steps=2, ns_restarts=())
    for a, b in zip(exact, none):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    default, _ = _steps(optimizer_class, "gram", torch.bfloat16, steps=2)
    none, optimizer = _steps(optimizer_class, "gram", torch.bfloat16, steps=2, ns_restarts=())
    assert any(not torch.equal(a, b) for a, b in zip(default, none) if a.dim() == 2)
    assert all(group["ns_restarts"] == () for group in optimizer.param_groups)
    saved = optimizer.state_dict()
    fresh = optimizer_class(_model().parameters(), ns_method="gram")
    fresh.load_state_dict(saved)
    assert all(group["ns_restarts"] == () for group in fresh.param_groups)


def test_optimizer_refuses_bad_ns_restarts_naming_them():
    params = list(_model().parameters())
    with pytest.raises(ValueError, match="ns_restarts applies to ns_method='gram' or 'auto' only"):
        fastoptim.Muon(params, ns_restarts=[2])
    with pytest.raises(ValueError, match=r"ns_restarts must hold integers r with 1 <= r < steps = 5"):
        fastoptim.NorMuon(params, ns_method="gram", ns_restarts=[5])
    with pytest.raises(ValueError, match="ns_restarts must be strictly increasing"):
        fastoptim.Muon([{"params": params, "ns_method": "auto", "ns_restarts": [3, 2]}])
    with pytest.raises(ValueError, match="ns_restarts must be None or a sequence"):
        fastoptim.Muon(params, ns_method="gram", ns_restarts=2)
    # Checked against the group's own step count, and again at step time (before anything changes).
    fastoptim.Muon(params, ns_method="gram", ns_steps=8, ns_restarts=[2, 4, 6])
    optimizer = fastoptim.Muon(params, ns_method="gram", ns_restarts=[2], backend="torch")
    optimizer.param_groups[0]["ns_method"] = "standard"
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="ns_restarts applies to"):
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, params))
