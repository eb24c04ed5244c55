"""Compile every Triton kernel of fastoptim.triton_kernels for NVIDIA GPUs, without a GPU.

Run by tests/test_triton_compile.py in a subprocess (TRITON_INTERPRET must be unset: the kernels
are then real JIT functions). The launchers run on CPU (or meta) tensors exactly as they would on
a GPU, but `JITFunction.run` is patched to compile for the chosen target instead of launching
(`warmup=True`), and the CUDA driver is replaced by a stand-in that only names the target. So each
kernel is compiled with the argument types (pointer dtypes, i32/i64 scalars, divisibility
specializations), constexprs and num_warps/num_stages the launchers really produce; triton's own
pipeline then runs through ptxas (bundled with triton) to a cubin.

Prints a JSON line {"kernels": [...]} naming every kernel (JIT function named *_kernel) of the
package, then one JSON line per distinct compiled kernel: target, kernel name, signature, constexprs,
num_warps, num_stages, shared memory (bytes, from triton's metadata) and the registers, stack and
spill bytes read from ptxas' report (`ptxas -v`, printed by triton under knobs.nvidia.dump_ptxas_log) or, for a kernel
found in the cache, from `cuobjdump --dump-resource-usage` of the cubin; a kernel that fails to
compile prints {"arch", "kernel", "constexprs", "error"} (and a launcher that raises otherwise
{"arch", "family", "error"}), and the exit status is 1.

    python tests/_triton_aot.py [--arch 90 --arch 80]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import pkgutil
import re
import subprocess
import sys
import time

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("unset TRITON_INTERPRET: the interpreter compiles nothing")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

# Streaming multiprocessors of an H100 SXM: the launcher sizes the norm reduction's partial sums
# (a constexpr of the scale kernel) from the SM count of the GPU.
H100_SMS = 132


class _TargetDriver:
    """What JITFunction.run asks of the active driver, for a GPU that is not there."""

    def __init__(self) -> None:
        self.target: GPUTarget | None = None

    def get_current_device(self) -> int:
        return self.target.arch  # JITFunction keys its per-device caches on this

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target


_DRIVER = _TargetDriver()
_RECORDS: dict[tuple, dict] = {}
_CALL = [""]  # the launcher call being compiled, for the report
_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _describe(value) -> object:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(value)


def _resources(kernel, ptxas_log: str) -> dict:
    """Registers, stack frame and spill bytes of the kernel's cubin."""
    regs = re.search(r"Used (\d+) registers", ptxas_log)
    if regs:
        stack = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_log)
        return {
            "regs": int(regs.group(1)),
            "stack": int(stack.group(1)),
            "spill_stores": int(stack.group(2)),
            "spill_loads": int(stack.group(3)),
        }
    cubin = kernel.metadata_group[f"{kernel.name}.cubin"]
    usage = subprocess.run(
        [os.path.join(_BIN, "cuobjdump"), "--dump-resource-usage", cubin], capture_output=True, text=True, check=True
    ).stdout
    fields = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", usage))
    # cuobjdump has no spill counts: local memory (LOCAL) is where spills go.
    return {"regs": int(fields["REG"]), "stack": int(fields["STACK"]), "spill_stores": None, "spill_loads": None,
            "local": int(fields["LOCAL"])}


# Instructions counted in each Newton–Schulz kernel's PTX (what makes them fast): 16-byte and 2-byte
# global stores, Hopper's wgmma, Ampere's mma.sync, cp.async, TMA copies. ptxas maps them one to one
# (st.global.v4 -> STG.E.128, wgmma -> HGMMA: checked by hand with nvdisasm); the PTX is already in
# memory, while disassembling every cubin would add about a second per kernel.
_INSTRUCTIONS = {
    "st_global_v4": r"\bst\.global(\.\w+)*\.v4\b", "st_global_b16": r"\bst\.global(\.\w+)*\.b16\b",
    "wgmma": r"\bwgmma\.mma_async\b", "mma_sync": r"\bmma\.sync\b", "cp_async": r"\bcp\.async\.(ca|cg)\b",
    "tma": r"\bcp\.async\.bulk\.tensor\b",
}


def _instructions(kernel) -> dict:
    """Counts of the _INSTRUCTIONS patterns in the kernel's PTX (static counts, not executed ones)."""
    ptx = kernel.asm["ptx"]
    return {"instructions": {name: len(re.findall(pattern, ptx)) for name, pattern in _INSTRUCTIONS.items()}}


def _compile_instead_of_launch(self, *args, grid, warmup, **kwargs):
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            kernel = _original_run(self, *args, grid=grid, warmup=True, **kwargs)
    except Exception as error:  # record it and go on: every failing kernel gets reported
        constexprs = {name: _describe(value) for name, value in kwargs.items()}
        key = (_DRIVER.target.arch, self.fn.__name__, str(constexprs), str(error))
        _RECORDS[key] = {"arch": _DRIVER.target.arch, "kernel": self.fn.__name__, "call": _CALL[0],
                         "constexprs": constexprs, "error": f"{type(error).__name__}: {error}"}
        return None
    seconds = time.perf_counter() - start
    key = (_DRIVER.target.arch, kernel.hash)
    if key in _RECORDS:
        if _CALL[0] not in _RECORDS[key]["calls"]:
            _RECORDS[key]["calls"].append(_CALL[0])
    else:
        meta = kernel.metadata
        names = self.arg_names
        _RECORDS[key] = {
            "arch": _DRIVER.target.arch,
            "kernel": self.fn.__name__,
            "call": _CALL[0],
            "calls": [_CALL[0]],  # every launcher call that compiled to this kernel
            "signature": {name: ty for name, ty in kernel.src.signature.items() if ty != "constexpr"},
            "constexprs": {names[path[0]]: _describe(value) for path, value in kernel.src.constants.items()},
            "attrs": {names[path[0]]: attr for path, attr in kernel.src.attrs.items()},
            "num_warps": meta.num_warps,
            "num_stages": meta.num_stages,
            "max_registers": getattr(meta, "maxnreg", None),  # the launch's maxnreg cap, if any
            "shared": meta.shared,
            "cubin_bytes": len(kernel.asm["cubin"]),
            "compile_s": round(seconds, 3),
            **_resources(kernel, log.getvalue()),
            **(_instructions(kernel) if self.fn.__module__.endswith("_ns_kernels") else {}),
        }
    return kernel


_original_run = JITFunction.run


# --------------------------------------------------------------------------------------------------
# Representative calls of every launcher


def _call(description: str, launcher, *args) -> None:
    _CALL[0] = description
    launcher(*args)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _newton_schulz_calls(ns) -> None:
    from fastoptim.coefficients import resolve

    schedule = resolve("jordan", 1)  # one step: every kernel of the iteration is launched once
    # Meta tensors: the launcher's GPU path (no upcast for the interpreter) without memory; their
    # addresses are 0 plus the views' offsets, as on a GPU. Per shape class of the config table
    # (Gram size <= 64, <= 512, larger), wide and tall (their X Xᵀ / XᵀX differ: the unit stride
    # is another argument), plus Gram sizes that are not multiples of 16 (no divisibility hints,
    # and odd workspace offsets: unvectorized loads, a different pipeline).
    aligned = [(4, 32, 96), (4, 96, 32), (4, 256, 768), (4, 768, 256), (4, 1024, 4096), (4, 4096, 1024)]
    unaligned = [(3, 99, 300), (3, 701, 2000)]
    calls = [(dtype, shape) for dtype in (torch.float32, torch.bfloat16) for shape in aligned + unaligned]
    calls += [(torch.float16, shape) for shape in aligned[::2]]  # fp16 takes bf16's path: wide only
    for compute_dtype, shape in calls:
        G = torch.empty(shape, device="meta")
        _call(f"newton_schulz {_name(compute_dtype)} {shape}", ns._newton_schulz, G, schedule, 1e-7, compute_dtype)
    # Other storage dtypes of G: 16-bit (the norm still in fp32) and fp64 (norm in fp64).
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        G = torch.empty((1, 256, 768), dtype=dtype, device="meta")
        _call(f"newton_schulz G {_name(dtype)}", ns._newton_schulz, G, schedule, 1e-7, torch.bfloat16)
    # GPT-2 small's MLP matrix alone and as a stack of 12: the small-grid rule on 132 SMs (64-row Gram
    # tiles for the lone matrix, 128-row tiles for the stack).
    for shape in [(768, 3072), (3072, 768), (12, 768, 3072)]:
        G = torch.empty(shape, device="meta")
        _call(f"newton_schulz bfloat16 {shape}", ns._newton_schulz, G, schedule, 1e-7, torch.bfloat16)
    # One lone matrix: many partial sums for it (NUM_PARTIALS = 256).
    G = torch.empty((8192, 8192), device="meta")
    _call("newton_schulz (8192, 8192)", ns._newton_schulz, G, schedule, 1e-7, torch.bfloat16)


@contextlib.contextmanager
def _environment(**values: str):
    """The launchers' environment switches (FASTOPTIM_TRITON_TMA, FASTOPTIM_TRITON_PERSISTENT) set for a call."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _newton_schulz_launch_calls(ns) -> None:
    """The other launch paths of the product kernels (the calls above take the defaults: descriptors on
    sm_90 where legal, the grid launch): the persistent launch, with descriptors or pointers; on sm_90 the
    pointer path that FASTOPTIM_TRITON_TMA=0 forces; and a float32 stack with descriptors forced."""
    from fastoptim.coefficients import resolve

    schedule = resolve("jordan", 1)
    persistent = [(dtype, shape) for dtype in (torch.bfloat16, torch.float32)
                  for shape in [(4, 256, 768), (4, 1024, 4096), (4, 4096, 1024), (3, 99, 300)]]
    persistent += [(torch.bfloat16, (12, 768, 3072)), (torch.bfloat16, (48, 768, 768))]
    with _environment(**{ns.PERSISTENT_ENV: "1"}):
        for compute_dtype, shape in persistent:
            G = torch.empty(shape, device="meta")
            _call(f"newton_schulz persistent {_name(compute_dtype)} {shape}", ns._newton_schulz, G, schedule, 1e-7,
                  compute_dtype)
    with _environment(**{ns.TMA_ENV: "0"}):
        for shape in [(4, 256, 768), (4, 1024, 4096), (4, 4096, 1024)]:
            G = torch.empty(shape, device="meta")
            _call(f"newton_schulz tma=0 bfloat16 {shape}", ns._newton_schulz, G, schedule, 1e-7, torch.bfloat16)
    with _environment(**{ns.TMA_ENV: "1"}):
        G = torch.empty((4, 256, 768), device="meta")
        _call("newton_schulz tma=1 float32 (4, 256, 768)", ns._newton_schulz, G, schedule, 1e-7, torch.float32)


def _gram_newton_schulz_calls(gram) -> None:
    from fastoptim.coefficients import resolve

    # Three steps with a restart after the first: every kernel of the Gram iteration (the s x s products,
    # the diagonal a·I, the products with X) is launched; wide and tall, 16-bit and fp32, GPT-2's shape.
    schedule = resolve("jordan", 3)
    for compute_dtype in (torch.bfloat16, torch.float32):
        for shape in [(4, 256, 768), (4, 768, 256), (768, 3072)]:
            G = torch.empty(shape, device="meta")
            _call(f"gram_newton_schulz {_name(compute_dtype)} {shape}", gram._gram_newton_schulz, G, schedule, 1e-7,
                  compute_dtype, False, (1,))


def _muon_calls(muon) -> None:
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    calls = [(4096, first, second) for first in dtypes for second in dtypes]
    calls += [(4097, dtype, dtype) for dtype in dtypes[:2]]  # an element count not a multiple of 16
    for numel, buf_dtype, grad_dtype in calls:
        for nesterov in (False, True):
            buf = torch.zeros(numel, dtype=buf_dtype)
            out = torch.empty(numel, dtype=buf_dtype) if nesterov else None
            description = f"muon_momentum_ {numel} {_name(buf_dtype)} {_name(grad_dtype)} nesterov={nesterov}"
            _call(description, muon.muon_momentum_, buf, torch.zeros(numel, dtype=grad_dtype), out, 0.95)
    for numel, param_dtype, update_dtype in calls:
        for cautious in (False, True):
            param, update = torch.zeros(numel, dtype=param_dtype), torch.zeros(numel, dtype=update_dtype)
            description = f"muon_apply_ {numel} {_name(param_dtype)} {_name(update_dtype)} cautious={cautious}"
            _call(description, muon.muon_apply_, param, update, 0.02, 0.1, 1.0, cautious)
    # Past 2^31 elements the element count is an int64 argument.
    huge = torch.empty(2**31 + 16, device="meta")
    _call("muon_momentum_ 2^31+16", muon.muon_momentum_, huge, huge, None, 0.95)
    _call("muon_apply_ 2^31+16", muon.muon_apply_, huge, huge, 0.02, 0.1, 1.0, False)


def _muon_stack_calls(muon_stack) -> None:
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    # (buf, grad, stack) dtypes, Nesterov on and off, a bucket of three 64 x 96 matrices (every
    # address 16-byte aligned) or of three 3 x 5 (the stack's slices are not: ALIGNED=False).
    groups = [(f32, f32, f32), (f32, f32, bf16), (bf16, bf16, bf16), (f32, bf16, bf16), (f16, f16, f16)]
    for dtypes in groups:
        for nesterov, normalize in ((False, False), (True, False), (True, True)):
            for m, n in [(64, 96), (3, 5)]:
                bufs = [torch.zeros((m, n), dtype=dtypes[0]) for _ in range(3)]
                grads = [torch.zeros((m, n), dtype=dtypes[1]) for _ in range(3)]
                out = torch.empty((3, m, n), dtype=dtypes[2])
                description = (
                    f"muon_momentum_stack_ {'/'.join(map(_name, dtypes))} {(3, m, n)} nesterov={nesterov} "
                    f"normalize={normalize}"
                )
                _call(description, muon_stack.muon_momentum_stack_, bufs, grads, out, 0.95, nesterov, normalize)


def _normuon_calls(normuon) -> None:
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    # Tiles (row stats = apply): (1, 1), (8, 4), (64, 64), (256, 16), (16, 256), (8, 1) with n = 0
    # (row stats only), and (4, 1024) with 16384 row tiles per matrix (a 1024-wide norm reduction).
    shapes = [(1, 1), (7, 3), (64, 64), (4096, 16), (300, 200), (5, 0), (65536, 1024)]
    # (param, update, v) dtypes: fp32 with and without cautious decay, and bf16 for every shape;
    # the other storage combinations on two shapes.
    calls = [(shape, (f32, f32, f32), cautious) for shape in shapes for cautious in (False, True)]
    calls += [(shape, (bf16, bf16, f32), False) for shape in shapes]
    calls += [(shape, storage, True) for shape in [(64, 64), (300, 200)]
              for storage in [(bf16, bf16, bf16), (f16, f32, f16), (f32, bf16, f32)]]
    for (m, n), dtypes, cautious in calls:
        param = torch.empty((2, m, n), dtype=dtypes[0], device="meta")
        update = torch.empty((2, m, n), dtype=dtypes[1], device="meta")
        v = torch.empty((2, m), dtype=dtypes[2], device="meta")
        description = f"normuon_step_ {(2, m, n)} {'/'.join(map(_name, dtypes))} cautious={cautious}"
        _call(description, normuon.normuon_step_, param, update, v, 0.02, 0.1, 0.95, 1e-8, 1.0, cautious)


def _sophia_calls(sophia) -> None:
    def tensors(dtype, misaligned):
        # CPU tensors: the launcher reads their addresses; a one-element offset breaks 16-byte alignment.
        sizes = (5000, 40000, 1)
        return [torch.zeros(size + 1, dtype=dtype)[1:] if misaligned else torch.zeros(size, dtype=dtype)
                for size in sizes]

    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    groups = [(f32, f32, f32, f32), (bf16, bf16, f32, f32), (bf16, bf16, bf16, bf16), (f16, f16, f16, f16),
              (f32, bf16, f32, bf16)]
    # Every dtype group aligned or not, with the unclipped count; without it for fp32 only.
    calls = [(dtypes, misaligned, True) for dtypes in groups for misaligned in (False, True)]
    calls += [(groups[0], misaligned, False) for misaligned in (False, True)]
    for dtypes, misaligned, count in calls:
        lists = [tensors(dtype, misaligned) for dtype in dtypes]
        out = torch.empty((), dtype=f32) if count else None
        description = f"sophia_step_ {'/'.join(map(_name, dtypes))} misaligned={misaligned} count={count}"
        _call(description, sophia.sophia_step_, *lists, out, 1e-4, 0.965, 0.04, 0.1, 1e-15)
    for dtypes in [(f32, f32), (bf16, bf16), (f32, bf16), (f16, f32)]:
        for misaligned in (False, True):
            description = f"hessian_ema_ {'/'.join(map(_name, dtypes))} misaligned={misaligned}"
            _call(description, sophia.hessian_ema_, *(tensors(dtype, misaligned) for dtype in dtypes), 0.99)


def _apply_stack_calls(apply_stack) -> None:
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    # CPU tensors: the chunk tables read their addresses. Buckets of three 64 x 96 matrices (every address
    # 16-byte aligned) or 3 x 5 (ALIGNED=False); lr and weight decay as numbers or 0-dim tensors.
    lr_tensor, wd_tensor = torch.tensor(0.02), torch.tensor(0.1, dtype=torch.float64)
    hyper = [(0.02, 0.1), (lr_tensor, 0.1), (0.02, wd_tensor), (lr_tensor, wd_tensor)]
    for param_dtype, update_dtype in [(f32, f32), (f32, bf16), (bf16, bf16), (f16, f32)]:
        for m, n in [(64, 96), (3, 5)]:
            for cautious in (False, True):
                for lr, weight_decay in hyper if (cautious and m == 64) else hyper[:1]:
                    params = [torch.zeros((m, n), dtype=param_dtype) for _ in range(3)]
                    updates = torch.zeros((3, m, n), dtype=update_dtype)
                    description = (f"muon_apply_stack_ {_name(param_dtype)}/{_name(update_dtype)} {(3, m, n)} "
                                   f"cautious={cautious} tensors={type(lr).__name__}/{type(weight_decay).__name__}")
                    _call(description, apply_stack.muon_apply_stack_, params, updates, lr, weight_decay, 1.0, cautious)
    # normuon's tiles, a matrix with more rows than one table chunk (16384), n = 0 (row statistics only).
    shapes = [(1, 1), (7, 3), (64, 64), (4096, 16), (300, 200), (5, 0), (20000, 2)]
    calls = [(shape, (f32, f32, f32), cautious, 0.02) for shape in shapes for cautious in (False, True)]
    calls += [(shape, (f32, bf16, bf16), False, lr_tensor) for shape in shapes]
    calls += [((64, 64), (bf16, f16, f32), True, lr_tensor), ((300, 200), (bf16, f32, bf16), True, 0.02)]
    for (m, n), (v_dtype, param_dtype, update_dtype), cautious, lr in calls:
        params = [torch.zeros((m, n), dtype=param_dtype) for _ in range(3)]
        second_moments = [torch.zeros(m, dtype=v_dtype) for _ in range(3)]
        updates = torch.zeros((3, m, n), dtype=update_dtype)
        description = (f"normuon_step_stack_ {(3, m, n)} {_name(v_dtype)}/{_name(param_dtype)}/{_name(update_dtype)} "
                       f"cautious={cautious} lr={type(lr).__name__}")
        _call(description, apply_stack.normuon_step_stack_, params, updates, second_moments, lr, 0.1, 0.95, 1e-8, 1.0,
              cautious)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 90 (default: 90 and 80)")
    parser.add_argument(
        "--only", action="append",
        help="a family: newton_schulz, newton_schulz_launch, gram_newton_schulz, muon, muon_stack, normuon, sophia, "
        "apply_stack (default: all)",
    )
    options = parser.parse_args()

    from triton import knobs

    knobs.nvidia.dump_ptxas_log = True  # printed (captured above) only when ptxas runs
    driver.set_active(_DRIVER)
    JITFunction.run = _compile_instead_of_launch

    import fastoptim.triton_kernels as package
    from fastoptim.triton_kernels import (
        apply_stack,
        gram_newton_schulz,
        muon,
        muon_stack,
        newton_schulz,
        normuon,
        sophia,
    )

    newton_schulz._target_programs = lambda device: newton_schulz._REDUCTION_PROGRAMS_PER_SM * H100_SMS
    newton_schulz._multiprocessor_count = lambda device: H100_SMS  # the small-grid rule's SM count
    newton_schulz._arch = lambda device: _DRIVER.target.arch  # the register cap is for sm_90
    families = {
        "newton_schulz": lambda: _newton_schulz_calls(newton_schulz),
        "newton_schulz_launch": lambda: _newton_schulz_launch_calls(newton_schulz),
        "gram_newton_schulz": lambda: _gram_newton_schulz_calls(gram_newton_schulz),
        "muon": lambda: _muon_calls(muon),
        "muon_stack": lambda: _muon_stack_calls(muon_stack),
        "normuon": lambda: _normuon_calls(normuon),
        "sophia": lambda: _sophia_calls(sophia),
        "apply_stack": lambda: _apply_stack_calls(apply_stack),
    }
    # Every module of the package, so that a kernel added later and not launched here shows.
    names = [info.name for info in pkgutil.iter_modules(package.__path__)]
    modules = [importlib.import_module(f"{package.__name__}.{name}") for name in names]
    kernels = sorted(
        {name for module in modules for name, value in vars(module).items()
         if isinstance(value, JITFunction) and name.endswith("_kernel")}
    )
    print(json.dumps({"kernels": kernels}))  # every launchable kernel, to check that none was missed
    failures = 0
    for arch in options.arch or (90, 80):
        _DRIVER.target = GPUTarget("cuda", arch, 32)
        for name in options.only or families:
            try:
                families[name]()
            except Exception as error:  # report every family, then fail
                failures += 1
                print(json.dumps({"arch": arch, "family": name, "error": f"{type(error).__name__}: {error}"}))
    for record in _RECORDS.values():
        print(json.dumps(record))
        failures += "error" in record
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
