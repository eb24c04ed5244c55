"""What the tests share: the set-up (re-exported by tests/conftest.py, where pytest finds its fixtures and
hooks) and the op correctness tests' backends, shapes, tolerances and helpers (imported by test_ops_*.py
with ``from ops_testing import ...``: a module of its own, because ``conftest`` is also bench/'s name).

Without a GPU, the Triton backend runs in the interpreter on CPU tensors: TRITON_INTERPRET must be
set before any @triton.jit function is defined, so it is set here, before fastoptim is imported.
Tests marked `cuda` skip without a GPU.

The op correctness tests run each op on every backend (the `backend` fixture) and compare it with the
torch backend, the specification, on the same inputs; the torch backend itself is compared with
float64 math. Defined once here for all of them:
- `backend` (torch, triton, cuda; `backend_params` for a subset) and `device_for(backend)`;
- the shape sets (`MATRICES`, `STACKS`, `BLOCKS`, `EMPTY`, `LARGE`; `shape_params`, `large_params`);
- `TOLERANCE`, one row per dtype, and `ERROR_RATIO`, flash-attention's accuracy rule; `dtype_pairs`,
  the storage/input dtype combinations;
- `poisoned_allocations`: outputs and workspaces filled with NaN before a kernel runs;
- the marks `large` (GPU-sized shapes: only for a backend that runs on the GPU), `not_interpreted`
  (cases too slow for, or meaningless in, the Triton interpreter) and `backends(...)` (cases only for
  these backends, e.g. mixed storage dtypes for the kernels), applied as deselection at collection.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import NamedTuple

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()

# --------------------------------------------------------------------------------------------------
# Backends and devices

BACKENDS = ("torch", "triton", "cuda")
_BACKEND_MARKS = {"torch": (), "triton": (pytest.mark.triton,), "cuda": (pytest.mark.cuda,)}


# Cases for the kernels only, e.g. sizes chosen to cross a kernel's block or chunk boundaries (the torch
# backend has none) or mixed storage dtypes (it casts first).
KERNELS_ONLY = pytest.mark.backends("triton", "cuda")


def backend_params(*names: str) -> list:
    """`pytest.param`s for these backends (all three by default), each with its mark: the cuda one is
    marked `cuda`, so it skips without a GPU. Parametrize "backend" with a subset to override the fixture."""
    return [pytest.param(name, id=name, marks=_BACKEND_MARKS[name]) for name in names or BACKENDS]


@pytest.fixture(params=backend_params())
def backend(request) -> str:
    """The backend under test: "torch" (the specification), "triton" or "cuda"."""
    return request.param


def device_for(backend: str) -> torch.device:
    """Where a backend's tests run: torch on the CPU (every device runs it; the CPU is always a test
    device), cuda on the GPU, triton on the GPU when there is one, else on the CPU in the interpreter."""
    if backend == "cuda" or (backend == "triton" and HAS_CUDA):
        return torch.device("cuda")
    return torch.device("cpu")


@pytest.fixture
def triton_device() -> torch.device:
    """Where Triton kernels run in this session: the GPU, or the CPU under the interpreter."""
    return device_for("triton")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "large: GPU-sized case, deselected for a backend whose tests run on the CPU (see device_for)"
    )
    config.addinivalue_line(
        "markers", "not_interpreted: case deselected for the triton backend in the interpreter (no GPU)"
    )
    config.addinivalue_line("markers", "backends(*names): case deselected for the other backends")


def _deselected(item) -> bool:
    callspec = getattr(item, "callspec", None)
    backend = callspec.params.get("backend") if callspec is not None else None
    if backend not in BACKENDS:
        return False
    on_cpu = device_for(backend).type == "cpu"
    if item.get_closest_marker("large") is not None and on_cpu:
        return True
    only = item.get_closest_marker("backends")
    if only is not None and backend not in only.args:
        return True
    return item.get_closest_marker("not_interpreted") is not None and backend == "triton" and on_cpu


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    kept, deselected = [], []
    for item in items:
        if _deselected(item):
            deselected.append(item)
            continue
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)
        kept.append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# --------------------------------------------------------------------------------------------------
# Shapes. An op family takes the sets that make sense for it; `shape_params` gives them readable ids.

# One element, odd sizes wide and tall, 1xN and Nx1, and larger wide and tall matrices.
MATRICES = [(1, 1), (3, 5), (5, 3), (1, 37), (37, 1), (33, 70), (70, 33)]
# Batched: a stack of matrices, and a 4-D one (two leading dimensions).
STACKS = [(3, 48, 80), (2, 3, 5, 7)]
# Across block boundaries: 33410 elements are several 1024-element blocks and three 16384-element
# chunks of the multi-tensor kernels, with tiles of 16 to 128 on both sides; a row longer than a row tile.
BLOCKS = [(130, 257), (1, 2100)]
# No elements: no rows, no columns, an empty stack, empty matrices in 3-D and 4-D stacks.
EMPTY = [(0, 5), (5, 0), (0, 4, 6), (3, 0, 4), (2, 3, 0, 6)]
# GPU sizes (marked `large`): a GPT-2 MLP weight both ways, sizes one past a power of two, an expert bank.
LARGE = [(1024, 4096), (4096, 1024), (4097, 1025), (8, 512, 1536)]


def shape_id(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def shape_params(*shapes: tuple[int, ...], marks=()) -> list:
    """`pytest.param`s of shapes with ids like 33x70; LARGE shapes get the `large` mark."""
    return [
        pytest.param(s, id=shape_id(s), marks=(*marks, pytest.mark.large) if s in LARGE else marks) for s in shapes
    ]


def large_params(*shapes: tuple[int, ...]) -> list:
    """`shape_params` marked `large`: GPU sizes outside LARGE that one test needs."""
    return shape_params(*shapes, marks=(pytest.mark.large,))


# --------------------------------------------------------------------------------------------------
# Tolerances


class Tolerance(NamedTuple):
    rtol: float  # element-wise: |got - want| <= atol + rtol·|want|
    atol: float
    matrix: float | None  # Newton–Schulz (matrix products): max|got - want| <= matrix · max|want|


# One row per dtype: the dtype results are stored in (for a float64 reference: the dtype of the result
# under test). The element-wise ops compute in fp32 whatever they store, so a result differs from the
# torch backend's by about one rounding to the storage dtype; bf16 and fp16 allow two ulps, since the
# Triton interpreter rounds fp32 -> 16 bit toward zero where the GPU and torch round to nearest (inputs
# are N(0, 1): atol covers results that cancel to near zero). fp32 allows for reductions (row and
# Frobenius norms) summed in another order. Newton–Schulz in fp32 is compared by its largest entry;
# in 16 bits it follows flash-attention's rule instead (`ERROR_RATIO`).
TOLERANCE = {
    torch.float64: Tolerance(rtol=1e-12, atol=1e-12, matrix=1e-10),
    torch.float32: Tolerance(rtol=1e-5, atol=1e-6, matrix=1e-4),
    torch.float16: Tolerance(rtol=2e-3, atol=2e-3, matrix=None),
    torch.bfloat16: Tolerance(rtol=2**-6, atol=2e-2, matrix=None),
}
# Flash-attention's accuracy rule: against float64 math, a kernel's error stays within ERROR_RATIO
# times the error of plain PyTorch in the same dtype.
ERROR_RATIO = 2.0


DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
_FP32, _BF16, _FP16 = torch.float32, torch.bfloat16, torch.float16


def dtype_pairs(*pairs: tuple[torch.dtype, torch.dtype], interpreted=((_FP32, _FP32), (_BF16, _BF16)),
                kernels_only: bool = True) -> list:
    """`pytest.param`s of (storage, input) dtype pairs, all nine of fp32/bf16/fp16 by default. Pairs not
    in `interpreted` are `not_interpreted`; with kernels_only, pairs of two different dtypes are for the
    kernels only (the torch backend casts one to the other first, as float64 math would)."""
    pairs = pairs or tuple((a, b) for a in (_FP32, _BF16, _FP16) for b in (_FP32, _BF16, _FP16))
    params = []
    for pair in pairs:
        marks = [] if pair in interpreted else [pytest.mark.not_interpreted]
        if kernels_only and pair[0] != pair[1]:
            marks.append(KERNELS_ONLY)
        params.append(pytest.param(pair, id=f"{DTYPE_NAMES[pair[0]]}-{DTYPE_NAMES[pair[1]]}", marks=marks))
    return params


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype | None = None, equal_nan=False) -> None:
    """got within TOLERANCE[dtype] (default: got's dtype) of want, element by element. want has got's
    dtype (another backend's result) or is float64 math."""
    assert got.shape == want.shape, (got.shape, want.shape)
    assert got.dtype == want.dtype or want.dtype == torch.float64, (got.dtype, want.dtype)
    tolerance = TOLERANCE[dtype or got.dtype]
    torch.testing.assert_close(
        got.double(), want.double(), rtol=tolerance.rtol, atol=tolerance.atol, equal_nan=equal_nan
    )


def assert_matrix_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype = torch.float32) -> None:
    """max|got - want| within TOLERANCE[dtype].matrix of max|want| (no NaN, no inf)."""
    assert got.shape == want.shape, (got.shape, want.shape)
    assert torch.isfinite(got).all()
    if want.numel() == 0:
        return
    scale = want.abs().max().item()
    error = (got.double() - want.double()).abs().max().item()
    assert error <= TOLERANCE[dtype].matrix * max(scale, 1e-30), (error, scale)


def assert_error_within_ratio(got: torch.Tensor, plain: torch.Tensor, exact: torch.Tensor) -> None:
    """Flash-attention's rule, matrix by matrix: the largest relative Frobenius error of got against
    the float64 result `exact` is at most ERROR_RATIO times that of `plain` (PyTorch in got's dtype)."""
    assert torch.isfinite(got).all()

    def relative_errors(x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.matrix_norm(x.double() - exact) / torch.linalg.matrix_norm(exact)

    error, plain_error = relative_errors(got).max().item(), relative_errors(plain).max().item()
    assert error <= ERROR_RATIO * plain_error + 1e-6, (error, plain_error)


def assert_equal(got, want) -> None:
    """Bit for bit, tensor by tensor (lists of tensors)."""
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.shape == b.shape and a.dtype == b.dtype, i
        assert torch.equal(a, b), (i, (a.double() - b.double()).abs().max().item())


# --------------------------------------------------------------------------------------------------
# Poison


@contextlib.contextmanager
def poisoned_allocations() -> Iterator[None]:
    """Within: torch.empty, torch.empty_like and torch.empty_strided return floating tensors filled
    with NaN, so an element of an output or a workspace that no kernel writes shows as NaN in the
    result (on every backend: the ops' own outputs, the launchers' workspaces). Integer tensors (index
    tables) are left as they come."""
    originals = {name: getattr(torch, name) for name in ("empty", "empty_like", "empty_strided")}

    def poisoning(allocate):
        def allocate_poisoned(*args, **kwargs):
            tensor = allocate(*args, **kwargs)
            return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor

        return allocate_poisoned

    for name, allocate in originals.items():
        setattr(torch, name, poisoning(allocate))
    try:
        yield
    finally:
        for name, allocate in originals.items():
            setattr(torch, name, allocate)


# --------------------------------------------------------------------------------------------------
# Shape buckets: the stack ops (muon_apply_stack_, normuon_step_stack_) take the matrices of one shape
# bucket laid out as an optimizer meets them.

BUCKET_KINDS = ("matrix", "bank", "rows", "conv", "mixed", "offset", "transposed")


def bucket(kind: str, P: int, m: int, n: int, device, dtype=torch.float32) -> list[torch.Tensor]:
    """P parameters of m·n elements: separate matrices, the experts of one 3-D bank, row blocks of one
    tall matrix, conv kernels read as (m, n), float32 and bfloat16 storage mixed (one launch per dtype),
    contiguous views one element past 16-byte alignment (the kernels' unvectorized paths), or transposed
    views (not contiguous: only the torch backend takes them)."""
    if kind == "matrix":
        return [torch.randn(m, n, device=device, dtype=dtype) for _ in range(P)]
    if kind == "bank":
        return list(torch.randn(P, m, n, device=device, dtype=dtype).unbind(0))
    if kind == "rows":
        return list(torch.randn(P * m, n, device=device, dtype=dtype).split(m))
    if kind == "conv":
        return [torch.randn((m, n, 1, 1) if i % 2 else (m, 1, n), device=device, dtype=dtype) for i in range(P)]
    if kind == "mixed":
        return [torch.randn(m, n, device=device).to(torch.bfloat16 if i % 3 == 1 else dtype) for i in range(P)]
    if kind == "offset":
        return [torch.randn(m * n + 1, device=device, dtype=dtype)[1:].view(m, n) for _ in range(P)]
    if kind == "transposed":
        return [torch.randn(n, m, device=device, dtype=dtype).mT for _ in range(P)]
    raise ValueError(kind)


def bucket_arguments(op: str) -> dict:
    """Valid keyword arguments of muon_apply_stack_ or normuon_step_stack_ for a bucket of three 4x6 matrices."""
    kwargs = dict(params=[torch.randn(4, 6) for _ in range(3)], updates=torch.randn(3, 4, 6), lr=0.1,
                  weight_decay=0.1, scale=1.0, cautious=False)
    if op == "normuon_step_stack_":
        kwargs.update(second_moments=[torch.rand(4) for _ in range(3)], beta2=0.95, eps=1e-8)
    return kwargs


_BANK = torch.randn(3, 4, 6)
_SHARED = torch.randn(4, 6)
# Bad buckets both stack ops refuse alike: (overrides of bucket_arguments, exception, text of the message).
BUCKET_BAD_INPUT = [
    ({"updates": torch.randn(3, 24)}, ValueError, "updates"),
    ({"updates": torch.randn(2, 4, 6)}, ValueError, "updates"),
    ({"updates": torch.randn(3, 6, 4).mT}, ValueError, "contiguous"),
    ({"updates": torch.randn(3, 4, 6, dtype=torch.complex64)}, TypeError, "updates"),
    ({"updates": torch.zeros(3, 4, 6, dtype=torch.int32)}, TypeError, "updates"),
    ({"params": [torch.randn(4, 6), torch.randn(4, 5), torch.randn(4, 6)]}, ValueError, "params[1]"),
    ({"params": torch.randn(3, 4, 6)}, TypeError, "params"),
    ({"params": [torch.randn(4, 6), torch.zeros(4, 6, dtype=torch.int64), torch.randn(4, 6)]}, TypeError,
     "params[1]"),
    ({"params": [torch.randn(4, 6), torch.randn(4, 6), torch.empty(4, 6, device="meta")]}, ValueError, "params[2]"),
    ({"params": [_SHARED, torch.randn(4, 6), _SHARED]}, ValueError, "params[0] and params[2]"),
    ({"params": [_BANK[0], _BANK[1], _BANK[0]]}, ValueError, "params[0] and params[2]"),
    ({"params": [_BANK.view(-1)[:24].view(4, 6), _BANK.view(-1)[12:36].view(4, 6), _BANK[2]]}, ValueError,
     "params[0] and params[1]"),
    ({"params": [torch.randn(4, 6), torch.zeros(1, 6).expand(4, 6), torch.randn(4, 6)]}, ValueError, "params[1]"),
    ({"params": list(_BANK), "updates": _BANK}, ValueError, "updates"),
    ({"lr": -0.1}, ValueError, "lr"),
    ({"lr": float("nan")}, ValueError, "lr"),
    ({"lr": "0.1"}, TypeError, "lr"),
    ({"lr": torch.tensor([0.1])}, ValueError, "lr"),
    ({"lr": torch.tensor(1)}, TypeError, "lr"),
    ({"lr": torch.tensor(0.1, device="meta")}, ValueError, "lr"),
    ({"weight_decay": torch.ones(2)}, ValueError, "weight_decay"),
    ({"weight_decay": torch.tensor(0.1, dtype=torch.complex64)}, TypeError, "weight_decay"),
    ({"weight_decay": -1.0}, ValueError, "weight_decay"),
    ({"scale": float("inf")}, ValueError, "scale"),
    ({"cautious": 1}, TypeError, "cautious"),
    ({"backend": "tpu"}, ValueError, "backend"),
]


def assert_bad_bucket_raises(op: str, overrides: dict, exception: type, text: str) -> None:
    """The op refuses the bucket with `exception` naming `text`, and changes no tensor."""
    import fastoptim

    kwargs = bucket_arguments(op)
    kwargs.update(overrides)
    tensors = [t for value in kwargs.values() for t in (value if isinstance(value, list) else [value])
               if isinstance(t, torch.Tensor) and t.device.type != "meta"]
    before = [t.clone() for t in tensors]
    with pytest.raises(exception) as info:
        getattr(fastoptim, op)(**kwargs)
    assert text in str(info.value)
    assert_equal(tensors, before)
