"""Every Triton kernel compiles for real NVIDIA GPUs (sm_90 and sm_80), on a machine without one.

The other Triton tests run the kernels in the interpreter, which accepts code the GPU compiler
rejects. Here tests/_triton_aot.py runs each launcher in a subprocess without TRITON_INTERPRET,
with the launch replaced by an ahead-of-time compilation for the target (triton's own pipeline,
down to a cubin by the ptxas bundled with triton), so each kernel is compiled with the argument
types, constexprs and num_warps/num_stages the launchers really produce: every block config of
the newton_schulz table (fp32, bf16, fp16; wide and tall; sizes multiple of 16 or not), the
normuon tiles, the sophia / hessian_ema / muon_momentum_stack_ dtype groups aligned or not, muon
with and without Nesterov output and cautious decay; every kernel of the package must be among
them. No CUDA driver is needed: a stand-in driver names the target.

The compiled kernels must fit the GPU: shared memory within the per-block limit and registers
within the register file. Registers, spills and shared memory per kernel are printed (`-s`).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
from packaging.version import Version

triton = pytest.importorskip("triton")

HELPER = pathlib.Path(__file__).with_name("_triton_aot.py")
ROOT = HELPER.parents[1]
ARCHES = (90, 80)
# Opt-in dynamic shared memory per block (bytes): 227 KB on H100, 163 KB on A100.
MAX_SHARED = {90: 227 * 1024, 80: 163 * 1024}
REGISTERS_PER_SM = 65536
TIMEOUT_S = 600


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[int, tuple[int, list[dict], list[str], str]]:
    """arch -> (exit status, records of the compiled kernels, names of all kernels, stderr)."""
    if "nvidia" not in triton.backends.backends:
        pytest.skip("triton has no NVIDIA backend")
    if Version(triton.__version__).release < (3, 5):  # triton.knobs, CompiledKernel.metadata_group
        pytest.skip(f"the ahead-of-time helper needs triton >= 3.5, this is triton {triton.__version__}")
    # The launchers' defaults are under test: no interpreter, no FASTOPTIM_TRITON_TMA / _PERSISTENT override.
    env = {key: value for key, value in os.environ.items()
           if key not in ("TRITON_INTERPRET", "FASTOPTIM_TRITON_TMA", "FASTOPTIM_TRITON_PERSISTENT")}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))
    # One process per target, in parallel (compilation is single-threaded).
    processes = {
        arch: subprocess.Popen(
            [sys.executable, str(HELPER), "--arch", str(arch)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for arch in ARCHES
    }
    results = {}
    for arch, process in processes.items():
        try:
            stdout, stderr = process.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
        kernels = next((line["kernels"] for line in lines if "kernels" in line), [])
        records = [line for line in lines if "kernels" not in line]
        results[arch] = (process.returncode, records, kernels, stderr)
    return results


def _table(records: list[dict]) -> str:
    rows = [f"{'kernel':<26} {'warps':>5} {'stages':>6} {'regs':>4} {'spill':>5} {'smem':>6}  first call; constexprs"]
    for r in records:
        spill = r["spill_stores"] if r["spill_stores"] is not None else r["local"]
        constexprs = " ".join(f"{name}={value}" for name, value in r["constexprs"].items())
        rows.append(
            f"{r['kernel']:<26} {r['num_warps']:>5} {r['num_stages']:>6} {r['regs']:>4} {spill:>5} {r['shared']:>6}"
            f"  {r['call']}; {constexprs}"
        )
    return "\n".join(rows)


@pytest.mark.parametrize("arch", ARCHES)
def test_every_kernel_compiles(compiled, arch):
    status, records, kernels, stderr = compiled[arch]
    errors = [r for r in records if "error" in r]
    assert not errors, "\n".join(json.dumps(r) for r in errors)
    assert status == 0, stderr[-4000:]
    assert kernels, "the helper listed no kernels"
    assert not set(kernels) - {r["kernel"] for r in records}, "kernels never launched by the representative calls"
    print(f"\nsm_{arch}: {len(records)} distinct kernels compiled\n{_table(records)}")
    spilling = [r for r in records if r["spill_stores"] or r.get("local")]
    if spilling:
        print(f"sm_{arch}: {len(spilling)} kernels spill registers (slower, but they launch):\n{_table(spilling)}")
    for r in records:
        assert r["cubin_bytes"] > 0, r
        assert r["shared"] <= MAX_SHARED[arch], f"{r['kernel']} needs {r['shared']} bytes of shared memory: {r}"
        threads = r["num_warps"] * 32
        assert threads <= 1024 and r["regs"] * threads <= REGISTERS_PER_SM, f"{r['kernel']} cannot launch: {r}"


# --------------------------------------------------------------------------------------------------
# Newton–Schulz product kernels: what makes them fast (issue 15)

_PRODUCTS = ("_symmetric_product_kernel", "_product_axpy_kernel")


def _shape(call: str) -> tuple[int, ...] | None:
    found = re.search(r"\((\d+(?:, \d+)+)\)", call)
    return tuple(int(size) for size in found.group(1).split(", ")) if found else None


def _products(compiled, arch: int, *, aligned: bool | None = None) -> list[dict]:
    """Records of the Newton–Schulz product kernels compiled for `arch`; `aligned`: only those whose
    first call has m and n multiples of 16 (True) or not (False)."""
    records = [r for r in compiled[arch][1] if r.get("kernel") in _PRODUCTS and "error" not in r]
    if aligned is not None:
        records = [r for r in records if _shape(r["call"]) is not None
                   and all(size % 16 == 0 for size in _shape(r["call"])[-2:]) == aligned]
    return records


def _block(record: dict) -> int:
    return record["constexprs"].get("BLOCK", record["constexprs"].get("BLOCK_M"))


# Bytes of local memory allowed to the capped cA² + bA kernel: triton 3.6 (the GPU machines') leaves 12
# bytes of its epilogue there (three registers stored and reloaded once per CTA after the K loop: SASS
# read by hand); triton 3.8 none.
_CAPPED_ADDEND_SPILL = 0 if Version(triton.__version__).release >= (3, 8) else 16


# Bytes of local memory allowed to a capped kernel that reads through TMA descriptors (sm_90's default for
# aligned 16-bit stacks): on triton 3.8 the capped cA² + bA grid kernel keeps 4 bytes there and the capped
# persistent X Xᵀ kernel 8 (one or two registers stored and reloaded after the K loop); on triton 3.6 (the
# GPU machines') the capped persistent X Xᵀ kernel stores 32 bytes and loads 36 (CI's compat run:
# 'newton_schulz persistent bfloat16 (4, 4096, 1024)'; the compile is deterministic, so more is a regression).
# The persistent launch is opt-in (FASTOPTIM_TRITON_PERSISTENT=1); whether these bytes cost anything is for a
# GPU run to measure.
_CAPPED_TMA_SPILL = 8 if Version(triton.__version__).release >= (3, 8) else 36


def _reads_descriptors(record: dict) -> bool:
    return record["signature"]["p_ptr"].startswith("tensordesc")


def _spill_allowance(record: dict) -> int:
    capped = record["max_registers"] is not None
    if capped and _reads_descriptors(record):
        return _CAPPED_TMA_SPILL
    capped_addend = capped and record["constexprs"].get("HAS_ADDEND") is True
    return _CAPPED_ADDEND_SPILL if capped_addend else 0


def _sixteen_bit(record: dict) -> bool:
    return record["signature"]["out_ptr"] in ("*bf16", "*fp16")


@pytest.mark.parametrize("arch", ARCHES)
def test_newton_schulz_epilogues_store_16_bytes(compiled, arch):
    """Aligned sizes: the symmetric product stores whole tiles and mirrors in 16-byte vectors (PTX
    st.global.v4, SASS STG.E.128), never the 2-byte scalar stores that triangle masks compile to (128 per
    thread before: st.global.b16)."""
    records = _products(compiled, arch, aligned=True)
    symmetric = [r for r in records if r["kernel"] == "_symmetric_product_kernel"]
    assert len(symmetric) >= 10 and any(_sixteen_bit(r) and _block(r) == 128 for r in symmetric)
    for r in records:
        counts = r["instructions"]
        assert counts["st_global_b16"] == 0 and counts["st_global_v4"] > 0, (r["call"], r["constexprs"], counts)


@pytest.mark.parametrize("arch", ARCHES)
def test_newton_schulz_two_ctas_per_sm_where_claimed(compiled, arch):
    """The 16-bit 128 x 128 tiles on sm_90 run under a 128-register cap so two CTAs share an SM: every
    product kernel so compiled stays within it without spilling, keeps its wgmma, and two of its
    CTAs fit the register file and shared memory. sm_80 (mma.sync would spill) is left uncapped."""
    records = _products(compiled, arch, aligned=True)
    capped = [r for r in records if r["max_registers"] is not None]
    if arch == 80:
        assert not capped
        return
    wanted = [r for r in records if _sixteen_bit(r) and _block(r) == 128]
    assert len(wanted) >= 3 and {r["kernel"] for r in wanted} == set(_PRODUCTS)
    assert {id(r) for r in wanted} == {id(r) for r in capped}
    for r in capped:
        assert r["max_registers"] == 128 and r["regs"] <= 128, (r["call"], r["regs"])
        assert r["spill_stores"] <= _spill_allowance(r) and r["spill_loads"] <= _spill_allowance(r), r
        assert 2 * r["regs"] * r["num_warps"] * 32 <= REGISTERS_PER_SM and 2 * r["shared"] <= MAX_SHARED[arch], r
        assert r["instructions"]["wgmma"] > 0, r


@pytest.mark.parametrize("arch", ARCHES)
def test_newton_schulz_aligned_16bit_products_do_not_spill_and_use_tensor_cores(compiled, arch):
    for r in _products(compiled, arch, aligned=True):
        if not _sixteen_bit(r):
            continue
        assert r["spill_stores"] <= _spill_allowance(r) and r["spill_loads"] <= _spill_allowance(r), (
            r["call"], r["constexprs"], r["spill_stores"])
        counts = r["instructions"]
        if arch == 90 and _block(r) >= 64:  # warpgroup MMA needs 64-row tiles and 4 warps
            assert counts["wgmma"] > 0 and counts["mma_sync"] == 0, (r["call"], counts)
        else:
            assert counts["mma_sync"] > 0, (r["call"], counts)


def test_newton_schulz_small_grid_for_a_lone_768x3072(compiled):
    """On 132 SMs one 768 x 3072 matrix (21 Gram tiles of 128) takes 64-row Gram tiles; its update
    (144 tiles of 128) and a stack of 12 (252 Gram tiles) keep 128-row tiles."""
    for call in ("newton_schulz bfloat16 (768, 3072)", "newton_schulz bfloat16 (3072, 768)",
                 "newton_schulz bfloat16 (12, 768, 3072)"):
        records = [r for r in _products(compiled, 90) if call in r["calls"]]
        blocks = {(r["kernel"], r["constexprs"].get("HAS_ADDEND")): _block(r) for r in records}
        gram = 128 if call.endswith("(12, 768, 3072)") else 64
        assert blocks == {("_symmetric_product_kernel", False): gram, ("_symmetric_product_kernel", True): gram,
                          ("_product_axpy_kernel", None): 128}, (call, blocks)


def _forced_pointers(record: dict) -> bool:
    return any("tma=0" in call for call in record["calls"])


@pytest.mark.parametrize("arch", ARCHES)
def test_newton_schulz_sm90_products_read_through_tma(compiled, arch):
    """sm_90, aligned 16-bit stacks: every product kernel takes both operands as tensor descriptors and its
    PTX copies tiles with TMA (cp.async.bulk.tensor; SASS UTMALDG) instead of cp.async, and still issues
    wgmma; FASTOPTIM_TRITON_TMA=0 gives back the cp.async pointer path. sm_80 has no TMA: no descriptor
    and no cp.async.bulk.tensor in any of its kernels."""
    records = _products(compiled, arch, aligned=True)
    if arch == 80:
        assert records and not any(_reads_descriptors(r) or r["instructions"]["tma"] for r in _products(compiled, 80))
        return
    sixteen_bit = [r for r in records if _sixteen_bit(r)]
    descriptors = [r for r in sixteen_bit if not _forced_pointers(r)]
    pointers = [r for r in sixteen_bit if _forced_pointers(r)]
    assert {r["kernel"] for r in descriptors} == set(_PRODUCTS) == {r["kernel"] for r in pointers}
    assert any(r["constexprs"].get("PERSISTENT") for r in descriptors)
    for r in descriptors:
        counts = r["instructions"]
        assert _reads_descriptors(r) and r["signature"]["q_ptr"].startswith("tensordesc"), (r["call"], r["signature"])
        assert counts["tma"] > 0 and counts["cp_async"] == 0, (r["call"], counts)
        if _block(r) >= 64:
            assert counts["wgmma"] > 0 and counts["mma_sync"] == 0, (r["call"], counts)
        assert r["spill_stores"] <= _spill_allowance(r) and r["spill_loads"] <= _spill_allowance(r), (
            r["call"], r["constexprs"], r["regs"], r["spill_stores"])
        assert r["max_registers"] is None or r["regs"] <= r["max_registers"], (r["call"], r["regs"])
    for r in pointers:
        assert not _reads_descriptors(r) and r["instructions"]["tma"] == 0 and r["instructions"]["cp_async"] > 0, r


# Shared memory per SM (bytes): 228 KB on H100, 164 KB on A100.
SHARED_PER_SM = {90: 228 * 1024, 80: 164 * 1024}


@pytest.mark.parametrize("arch", ARCHES)
def test_newton_schulz_persistent_grid_fits_its_resident_ctas(compiled, arch):
    """The persistent launch sizes its grid as SMs x the CTAs per SM of newton_schulz._ctas_per_sm: that many
    CTAs of every compiled persistent kernel must fit an SM's registers and shared memory at once (more
    programs than fit would wait for whole programs to finish: a tail as long as a program's loop)."""
    from fastoptim.triton_kernels import newton_schulz as ns

    persistent = [r for r in _products(compiled, arch) if r["constexprs"].get("PERSISTENT")]
    assert {r["kernel"] for r in persistent} == set(_PRODUCTS)
    assert any(r["max_registers"] for r in persistent) == (arch == 90)
    for r in persistent:
        ctas = ns._ctas_per_sm(ns._Config(_block(r), r["constexprs"]["BLOCK_K"], r["num_warps"], r["num_stages"],
                                          r["max_registers"]))
        assert ctas * r["regs"] * r["num_warps"] * 32 <= REGISTERS_PER_SM, (r["call"], ctas, r["regs"])
        assert ctas * (r["shared"] + 1024) <= SHARED_PER_SM[arch], (r["call"], ctas, r["shared"])


# --------------------------------------------------------------------------------------------------
# Every other kernel is memory-bound: what keeps it at the copy bandwidth (issue 15)

NS_PRODUCT_KERNELS = ("_symmetric_product_kernel", "_product_axpy_kernel")  # matrix-bound; guarded above


@pytest.mark.parametrize("arch", ARCHES)
def test_memory_bound_kernels_do_not_spill_and_keep_two_ctas_per_sm(compiled, arch):
    """The elementwise and reduction kernels (momentum, apply, NorMuon row statistics, Sophia, the stack and
    normalization kernels): no register spills and no stack frame in any compiled configuration (local-memory
    traffic would add to the bytes they exist to minimize), and registers for at least two CTAs per SM, so
    loads of one CTA overlap another's arithmetic."""
    _, records, kernels, _ = compiled[arch]
    memory_bound = [r for r in records if "error" not in r and r["kernel"] not in NS_PRODUCT_KERNELS]
    # Every such kernel of the package was compiled (a kernel missing here would go unguarded).
    assert {r["kernel"] for r in memory_bound} == set(kernels) - set(NS_PRODUCT_KERNELS)
    for r in memory_bound:
        spills = r["spill_stores"] if r["spill_stores"] is not None else r["local"]
        assert spills == 0 and (r["spill_loads"] or 0) == 0 and r["stack"] == 0, \
            f"{r['kernel']} spills ({r['call']}): {r}"
        assert 2 * r["regs"] * r["num_warps"] * 32 <= REGISTERS_PER_SM, f"{r['kernel']} ({r['call']}): {r['regs']} regs"
