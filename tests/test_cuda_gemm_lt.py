"""The Newton–Schulz drivers' GEMMs on cuBLASLt (csrc/gemm_lt.cu, ``fastoptim._C.gemm_``).

``_C.gemm_(out, p, q, alpha, beta, addend, use_cublaslt)`` computes ``out = alpha·p@q + beta·addend`` for
batched (batch, M, K) @ (batch, K, N), reading the addend and writing out as separate buffers (ATen's
baddbmm copies the addend into out first). It returns whether cuBLASLt ran it; a problem cuBLASLt declines
runs on ATen. The GPU tests compare it with torch's own batched product in the same dtype, for every
transposition (transposes are strides, never copies), odd sizes, size-1 dimensions, strided views and a
batch longer than one cuBLASLt call takes; and the whole driver with cuBLASLt against the ATen driver and
the float64 polar iteration. The build tests run here: this build links cuBLASLt and the import resolves it.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import pathlib
import shutil
import subprocess

import pytest
import torch
from ops_testing import HAS_CUDA

import fastoptim
from fastoptim.coefficients import resolve

_C_SPEC = importlib.util.find_spec("fastoptim._C")
ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _fp32_without_tf32():
    # fp32 products must be fp32 on both sides: TF32 in one of them would be an unfair comparison.
    if not HAS_CUDA:
        yield
        return
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


def _C():
    if _C_SPEC is None:
        pytest.skip("fastoptim._C is not built here (FASTOPTIM_CUDA=0 or no CUDA toolkit)")
    from fastoptim import _C

    return _C


# --------------------------------------------------------------------------------------------------
# The build (no GPU needed)


def test_the_extension_links_cublaslt_and_loads():
    """setup.py found cuBLASLt (torch's nvidia wheels carry it): the extension records libcublasLt as a
    needed library, leaves cublasLtMatmul to it, and importing it (which resolves every symbol: Python
    loads extensions with RTLD_NOW) works on this machine."""
    C = _C()
    if os.environ.get("FASTOPTIM_CUBLASLT", "auto").strip() == "0":
        pytest.skip("built with FASTOPTIM_CUBLASLT=0")
    assert C.HAVE_CUBLASLT is True
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("no readelf here")
    needed = subprocess.run([readelf, "-d", _C_SPEC.origin], capture_output=True, text=True, check=True).stdout
    assert "libcublasLt.so" in needed
    symbols = subprocess.run([readelf, "--dyn-syms", "-W", _C_SPEC.origin], capture_output=True, text=True,
                             check=True).stdout
    undefined = {word.split("@")[0] for line in symbols.splitlines() if " UND " in line for word in line.split()}
    assert {"cublasLtMatmul", "cublasLtMatmulAlgoGetHeuristic", "cublasLtCreate"} <= undefined


def _cublaslt_include() -> pathlib.Path | None:
    """The folder of cublasLt.h that setup.py would use: torch's nvidia wheels, then CUDA_HOME."""
    site = pathlib.Path(torch.__file__).parent.parent
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    for place in [site / "nvidia" / sub for sub in ("cu13", "cublas", "cu12")] + [pathlib.Path(cuda_home)]:
        if (place / "include" / "cublasLt.h").exists():
            return place / "include"
    return None


def test_gemm_lt_mapping_on_a_host_mock_of_cublaslt(tmp_path):
    """csrc/gemm_lt.cu compiled for the host against tests/cublaslt_mock/harness.cpp, which implements the
    cuBLASLt calls it makes with cuBLASLt's column-major semantics and argument checks on host memory: every
    transposition, padded rows and batch gaps, C = D, the alignments told to the heuristic (checked on every
    row of every matrix), the batch chunks, the algorithm cache, the declined path (see the harness)."""
    compiler = shutil.which("g++")
    include = _cublaslt_include()
    cuda_include = pathlib.Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"
    if compiler is None or include is None or not (cuda_include / "cuda_runtime.h").exists():
        pytest.skip("needs g++, the CUDA headers and cublasLt.h (in torch's nvidia wheels or CUDA_HOME)")
    harness = tmp_path / "harness"
    build = subprocess.run(
        [compiler, "-std=c++17", "-O1", "-Wall", "-Werror", "-DFASTOPTIM_HAVE_CUBLASLT", f"-I{ROOT / 'csrc'}",
         f"-I{cuda_include}", "-isystem", str(include), "-x", "c++", str(ROOT / "csrc" / "gemm_lt.cu"), "-x", "c++",
         str(ROOT / "tests" / "cublaslt_mock" / "harness.cpp"), "-o", str(harness)],
        capture_output=True, text=True,
    )
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(harness)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert run.stdout.strip().startswith("ok ")


def test_gemm_refuses_cpu_tensors_naming_them():
    C = _C()
    x = torch.zeros(1, 2, 2)
    with pytest.raises(RuntimeError, match="out must be a CUDA tensor"):
        C.gemm_(x, x.clone(), x.clone(), 1.0, 0.0, None, True)


# --------------------------------------------------------------------------------------------------
# On a GPU

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 1, 1, 1), (3, 7, 5, 9), (2, 64, 96, 128), (1, 129, 255, 100), (4, 768, 768, 768), (1, 1, 300, 17)]


def _operand(batch, rows, cols, transposed, dtype):
    """A (batch, rows, cols) operand; transposed: the .mT view of a contiguous (batch, cols, rows) tensor."""
    if transposed:
        return torch.randn(batch, cols, rows, device="cuda").to(dtype).mT
    return torch.randn(batch, rows, cols, device="cuda").to(dtype)


def _expected(out, p, q, alpha, beta, addend):
    """torch's own batched product in the operands' dtype (and its error scale: fp32 of the same)."""
    if addend is None:
        low = torch.bmm(p, q) * alpha
    else:
        low = torch.baddbmm(addend, p, q, beta=beta, alpha=alpha)
    exact = alpha * torch.bmm(p.double(), q.double())
    if addend is not None:
        exact = exact + beta * addend.double()
    return low, exact


def _assert_close(got, p, q, alpha, beta, addend):
    low, exact = _expected(got, p, q, alpha, beta, addend)
    assert torch.isfinite(got).all()
    torch_error = (low.double() - exact).abs().max().item()
    error = (got.double() - exact).abs().max().item()
    scale = exact.abs().max().item() + 1.0
    assert error <= 2 * torch_error + 4 * torch.finfo(got.dtype).eps * scale


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("trans_p,trans_q", list(itertools.product([False, True], repeat=2)))
def test_gemm_matches_torch_every_transposition(dtype, shape, trans_p, trans_q):
    C = _C()
    batch, M, K, N = shape
    p = _operand(batch, M, K, trans_p, dtype)
    q = _operand(batch, K, N, trans_q, dtype)
    addend = torch.randn(batch, M, N, device="cuda").to(dtype)
    out = torch.full((batch, M, N), float("nan"), device="cuda", dtype=dtype)
    ran = C.gemm_(out, p, q, 1.5, -0.75, addend, True)
    if all(size % 8 == 0 for size in (M, K, N)):  # 16-byte aligned: cuBLASLt takes it, no silent fallback
        assert ran is C.HAVE_CUBLASLT
    _assert_close(out, p, q, 1.5, -0.75, addend)
    out.fill_(float("nan"))
    C.gemm_(out, p, q, 2.0, 0.0, None, True)  # no addend: beta = 0, the NaNs in out are never read
    _assert_close(out, p, q, 2.0, 0.0, None)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gemm_with_cublaslt_equals_the_aten_path(dtype):
    C = _C()
    p, q = (torch.randn(3, 96, 96, device="cuda").to(dtype) for _ in range(2))
    addend = torch.randn(3, 96, 96, device="cuda").to(dtype)
    lt, aten = torch.empty_like(addend), torch.empty_like(addend)
    C.gemm_(lt, p, q, 2.0315, -4.775, addend, True)
    assert C.gemm_(aten, p, q, 2.0315, -4.775, addend, False) is False
    torch.testing.assert_close(lt, aten, rtol=4 * torch.finfo(dtype).eps, atol=4 * torch.finfo(dtype).eps * 100)


@pytest.mark.cuda
def test_gemm_reads_the_addend_without_writing_it_and_may_write_in_place():
    C = _C()
    p, q = torch.randn(2, 33, 17, device="cuda"), torch.randn(2, 17, 40, device="cuda")
    addend = torch.randn(2, 33, 40, device="cuda")
    before = addend.clone()
    out = torch.empty_like(addend)
    C.gemm_(out, p, q, 1.0, 0.5, addend, True)
    assert torch.equal(addend, before)
    C.gemm_(addend, p, q, 1.0, 0.5, addend, True)  # C = D: in place
    torch.testing.assert_close(addend, out)


@pytest.mark.cuda
def test_gemm_strided_views_and_size_one_dimensions():
    C = _C()
    base = torch.randn(4, 40, 64, device="cuda", dtype=torch.bfloat16)
    p = base[::2, :, :48]  # batch stride 2·40·64, row stride 64 (not the packed 48)
    q = torch.randn(2, 48, 1, device="cuda", dtype=torch.bfloat16)  # one column: its row stride is arbitrary
    out = torch.empty(2, 40, 1, device="cuda", dtype=torch.bfloat16)
    C.gemm_(out, p, q, 1.0, 0.0, None, True)
    _assert_close(out, p, q, 1.0, 0.0, None)
    addend = torch.randn(2, 40, 64, device="cuda", dtype=torch.bfloat16)[:, :, :1]  # not out's layout: ATen
    assert C.gemm_(out, p, q, 1.0, 1.0, addend, True) is False
    _assert_close(out, p, q, 1.0, 1.0, addend)


@pytest.mark.cuda
def test_gemm_batch_longer_than_one_cublaslt_call():
    C = _C()
    batch = 65535 + 7  # two chunks of different lengths
    p = torch.randn(batch, 4, 3, device="cuda")
    q = torch.randn(batch, 3, 5, device="cuda")
    addend = torch.randn(batch, 4, 5, device="cuda")
    out = torch.full_like(addend, float("nan"))
    C.gemm_(out, p, q, 1.0, 2.0, addend, True)
    _assert_close(out, p, q, 1.0, 2.0, addend)


@pytest.mark.cuda
def test_gemm_refuses_bad_arguments_naming_them():
    C = _C()
    x = torch.zeros(2, 4, 4, device="cuda")
    with pytest.raises(RuntimeError, match="p @ q must have out's shape"):
        C.gemm_(x, torch.zeros(2, 4, 3, device="cuda"), x.clone(), 1.0, 0.0, None, True)
    with pytest.raises(RuntimeError, match="p and q must have out's dtype"):
        C.gemm_(x, x.clone().half(), x.clone(), 1.0, 0.0, None, True)
    with pytest.raises(RuntimeError, match="beta must be 0 without an addend"):
        C.gemm_(x, x.clone(), x.clone(), 1.0, 1.0, None, True)
    with pytest.raises(RuntimeError, match="refer to a single memory location"):
        C.gemm_(x, x, x.clone(), 1.0, 0.0, None, True)
    with pytest.raises(RuntimeError, match="addend and out must have the same shape"):
        C.gemm_(x, x.clone(), x.clone(), 1.0, 1.0, torch.zeros(2, 4, 5, device="cuda"), True)


@pytest.mark.cuda
@pytest.mark.parametrize("compute_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(64, 96), (96, 64), (3, 48, 80), (130, 257), (1, 1000)], ids=str)
def test_newton_schulz_driver_on_cublaslt_matches_aten_and_float64(compute_dtype, shape, monkeypatch):
    G = torch.randn(shape, device="cuda")
    monkeypatch.setenv("FASTOPTIM_NS_CUBLASLT", "0")
    aten = fastoptim.newton_schulz(G, compute_dtype=compute_dtype, backend="cuda")
    monkeypatch.setenv("FASTOPTIM_NS_CUBLASLT", "1")
    lt = fastoptim.newton_schulz(G, compute_dtype=compute_dtype, backend="cuda")
    exact = fastoptim.newton_schulz(G.double(), compute_dtype=torch.float64, backend="torch")
    assert (lt.double() - exact).norm() <= 2 * (aten.double() - exact).norm() + 1e-5
    for method in ("gram",):
        monkeypatch.setenv("FASTOPTIM_NS_CUBLASLT", "0")
        aten = fastoptim.newton_schulz(G, compute_dtype=compute_dtype, backend="cuda", method=method)
        monkeypatch.setenv("FASTOPTIM_NS_CUBLASLT", "1")
        lt = fastoptim.newton_schulz(G, compute_dtype=compute_dtype, backend="cuda", method=method)
        assert (lt.double() - exact).norm() <= 2 * (aten.double() - exact).norm() + 1e-5


@pytest.mark.cuda
def test_newton_schulz_driver_on_cublaslt_is_graph_capturable(monkeypatch):
    monkeypatch.setenv("FASTOPTIM_NS_CUBLASLT", "1")
    G = torch.randn(4, 64, 96, device="cuda")
    flat = resolve("jordan").flat()
    expected = _C().newton_schulz(G, flat, 1.0, 1e-7, torch.bfloat16, False, False, True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        _C().newton_schulz(G, flat, 1.0, 1e-7, torch.bfloat16, False, False, True)  # warm-up: algorithms cached
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _C().newton_schulz(G, flat, 1.0, 1e-7, torch.bfloat16, False, False, True)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, expected)
