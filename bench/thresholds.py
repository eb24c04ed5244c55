"""Dispatch thresholds from measured benchmark rows (a pytest-benchmark JSON of bench/, e.g. a gpu-evidence run).

The CUDA Newton–Schulz driver can compute X Xᵀ and A·A with the upper-triangle tensor-core kernel
(csrc/symmetric_gemm.cu, half the FLOPs) or with cuBLASLt. Which is faster depends on the GPU and the Gram
side s = min(m, n), so dispatch reads a per-architecture table, `fastoptim._cuda_backend.SYMMETRIC_MIN_GRAM`,
filled from measurements, never guessed. This script derives that table from the rows of
bench_newton_schulz.py: per architecture (the rows' ``capability``) and Gram side, the median of
``fastoptim-cuda-symmetric`` against ``fastoptim-cuda`` (the same driver without the symmetric kernel) on the
same shapes. The threshold is the smallest measured s from which the symmetric kernel is faster by at least
MARGIN on every measured shape with that s or larger; None (never) when the largest measured s does not win.

    python bench/thresholds.py bench/results/<run>/bench.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

MARGIN = 0.03  # 3% faster at least: within run-to-run noise the simpler path (cuBLASLt) stays


def _gram_side(shape: str) -> int | None:
    try:
        _, m, n = (int(x) for x in shape.split("x"))
    except (AttributeError, ValueError):
        return None
    return min(m, n)


def symmetric_min_gram(rows: list[dict]) -> dict[str, dict]:
    """{arch: {"min_gram": s or None, "evidence": [(s, shape, cublas median, symmetric median), ...]}} from the
    newton_schulz rows (single shapes, not the GPT-2 stack) that have both implementations."""
    medians: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for row in rows:
        info = row.get("extra_info", {})
        impl, shape, arch = info.get("impl"), info.get("shape"), info.get("capability")
        if not (row.get("group") or "").startswith("newton_schulz ") or arch is None or _gram_side(shape) is None:
            continue
        if impl in ("fastoptim-cuda", "fastoptim-cuda-symmetric"):
            medians[(arch, shape)][impl] = row["stats"]["median"]
    by_arch: dict[str, list[tuple[int, str, float, float]]] = defaultdict(list)
    for (arch, shape), found in medians.items():
        if len(found) == 2:
            by_arch[arch].append((_gram_side(shape), shape, found["fastoptim-cuda"], found["fastoptim-cuda-symmetric"]))
    table = {}
    for arch, evidence in sorted(by_arch.items()):
        evidence.sort()
        threshold = None
        for s, *_ in reversed(evidence):  # the smallest s such that every shape from s up wins
            if all(sym <= (1 - MARGIN) * cublas for side, _, cublas, sym in evidence if side >= s):
                threshold = s
            else:
                break
        table[arch] = {"min_gram": threshold, "evidence": evidence}
    return table


def render(table: dict[str, dict]) -> list[str]:
    """Markdown lines: the derived thresholds and the medians they come from."""
    if not table:
        return ["No architecture has both fastoptim-cuda and fastoptim-cuda-symmetric rows: nothing derived."]
    lines = ["| arch | Gram side s | shape | cuBLASLt median ms | symmetric median ms | symmetric / cuBLASLt |",
             "|---|---:|---|---:|---:|---:|"]
    for arch, entry in table.items():
        for s, shape, cublas, sym in entry["evidence"]:
            lines.append(f"| {arch} | {s} | {shape} | {cublas * 1e3:.3f} | {sym * 1e3:.3f} | {sym / cublas:.2f} |")
    lines.append("")
    for arch, entry in table.items():
        where = f"s >= {entry['min_gram']}" if entry["min_gram"] is not None else "never (None)"
        lines.append(f"- {arch}: `SYMMETRIC_MIN_GRAM[{arch!r}] = {entry['min_gram']!r}`: the symmetric kernel {where}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bench_json")
    args = parser.parse_args(argv)
    with open(args.bench_json) as f:
        rows = json.load(f).get("benchmarks", [])
    print("\n".join(render(symmetric_min_gram(rows))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
