"""Benchmark helpers: device, shapes, timing that is honest on a GPU, and the ceilings.

- GPU timing synchronizes inside the timed call, and inputs rotate through enough copies to exceed
  the L2 cache (H100: 50 MB), so a kernel cannot be timed on warm cache lines.
- The ceilings are measured once per session on the same device: a large bf16 matmul (TFLOP/s) and a
  large device-to-device copy (GB/s); every row reports its fraction of them.
- On a CPU-only machine every benchmark runs with small shapes (the tables then say "cpu"); in CI
  they run once each under --benchmark-disable, so the files cannot rot.
"""

from __future__ import annotations

import itertools
import os
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
L2_BYTES = 64 * 2**20  # rotate at least this many bytes of inputs (more than an H100/H200's 50 MB L2)


def backends_to_compare(op: str) -> list[str]:
    """Every fastoptim backend that can run `op` on DEVICE (the torch one always)."""
    from fastoptim import backends

    names = []
    for name in backends.NAMES:
        try:
            backends.select(op, name, DEVICE)
        except backends.BackendUnavailableError:
            continue
        if name == "triton" and not HAS_CUDA:
            continue  # the interpreter measures numpy, not a kernel
        names.append(name)
    return names


def ns_flops(batch: int, m: int, n: int, steps: int = 5) -> float:
    """Dense FLOPs of `steps` Newton–Schulz iterations on a (batch, m, n) stack: with Gram side s = min(m, n)
    and long side l = max(m, n), X Xᵀ 2s²l, A·A 2s³, B·X 2s²l per iteration (the same count for every
    implementation: a kernel that skips the symmetric half shows up as a higher TFLOP/s)."""
    s, l = min(m, n), max(m, n)
    return batch * steps * (4 * s * s * l + 2 * s**3)


TORCH_MUON_COEFFICIENTS = (3.4445, -4.775, 2.0315)


def torch_optim_muon_ns():
    """torch.optim.Muon's own per-matrix Newton–Schulz as fn(matrix, steps) -> matrix, or None.

    The private helper torch.optim._muon._zeropower_via_newtonschulz(grad, ns_coefficients, ns_steps, eps)
    (torch 2.9 to 2.14 as read here; other versions add use_addmm, passed as torch.optim.Muon's default so the
    row measures what the optimizer does). None where torch has no torch.optim.Muon, no such helper, or one
    with another required argument: then bench_newton_schulz falls back to whole torch.optim.Muon steps."""
    import inspect

    if not hasattr(torch.optim, "Muon"):
        return None
    try:
        from torch.optim._muon import _zeropower_via_newtonschulz as helper
    except ImportError:
        return None
    try:
        parameters = list(inspect.signature(helper).parameters.values())
        muon_defaults = {name: p.default for name, p in inspect.signature(torch.optim.Muon).parameters.items()}
    except (TypeError, ValueError):
        return None
    extra = {}
    for parameter in parameters[4:]:
        if parameter.name == "use_addmm":
            extra["use_addmm"] = bool(muon_defaults.get("use_addmm", False))
        elif parameter.default is inspect.Parameter.empty:
            return None  # an argument this benchmark does not know how to fill
    if len(parameters) < 4:
        return None
    return lambda matrix, steps: helper(matrix, TORCH_MUON_COEFFICIENTS, steps, 1e-7, **extra)


def synchronize() -> None:
    if HAS_CUDA:
        torch.cuda.synchronize()


def rotating(make_inputs, bytes_each: int):
    """An endless cycle over enough independent input sets to exceed the L2 cache (at most 256 sets:
    a 768x768 bf16 matrix needs 57 to fill 64 MiB)."""
    copies = 1 if not HAS_CUDA else max(1, min(256, -(-L2_BYTES // max(bytes_each, 1))))
    return itertools.cycle([make_inputs() for _ in range(copies)])


def measure_seconds(fn, repeats: int, warmup: int = 1) -> float:
    """Mean seconds per call over `repeats` calls, after `warmup` calls (clocks ramp up, caches fill)."""
    for _ in range(warmup):
        fn()
    synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize()
    return (time.perf_counter() - start) / repeats


def versions() -> str:
    """fastoptim, torch, triton and CUDA versions, for the results' header."""
    import fastoptim

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return (
        f"fastoptim {fastoptim.__version__}, torch {torch.__version__}, triton {triton_version}, "
        f"CUDA {torch.version.cuda or 'none'}"
    )


def record(benchmark, ceilings: dict, *, flops: float | None = None, bytes_moved: float | None = None, **info):
    """Attach throughput and fraction-of-ceiling to a finished benchmark row."""
    info["device"] = ceilings["device"]
    info["capability"] = ceilings.get("capability")  # sm_XY: what dispatch tables are keyed on
    info["versions"] = versions()
    stats = getattr(benchmark, "stats", None)
    median = stats.stats.median if stats is not None and getattr(stats, "stats", None) else None
    info["median_s"] = median
    if median:
        if flops is not None:
            info["tflops"] = flops / median / 1e12
            info["fraction_of_matmul"] = info["tflops"] / ceilings["matmul_tflops"]
        if bytes_moved is not None:
            info["gbs"] = bytes_moved / median / 1e9
            info["fraction_of_copy"] = info["gbs"] / ceilings["copy_gbs"]
    info["ceiling_matmul_tflops"] = ceilings["matmul_tflops"]
    info["ceiling_copy_gbs"] = ceilings["copy_gbs"]
    benchmark.extra_info.update(info)


WARMUP_CALLS = 3 if HAS_CUDA else 0


def timed(fn):
    """The callable pytest-benchmark times: the work, then a device synchronization. On a GPU it first
    runs the work a few times untimed: pytest-benchmark drops only the first call, and a Triton compile
    there would leave the GPU idle (clocks down) and shrink the calibrated rounds to the minimum."""
    for _ in range(WARMUP_CALLS):
        fn()
    synchronize()

    def call():
        out = fn()
        synchronize()
        return out

    return call
