"""Render a pytest-benchmark JSON file as a markdown table (bench/RESULTS.md by default).

    python bench/render.py bench/results/<run>/bench.json [-o bench/RESULTS.md]

One table per benchmark group: each implementation's median time, its throughput (TFLOP/s or GB/s),
the fraction of the ceilings measured in the same run, and its speed-up over the plain-PyTorch
baseline of the group (torch-loop for Newton–Schulz, fastoptim-torch elsewhere).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
from collections import defaultdict

BASELINES = ("torch-loop", "fastoptim-torch")


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return format(value, spec)


def render(data: dict) -> str:
    machine = data.get("machine_info", {})
    first_info = next((b.get("extra_info", {}) for b in data.get("benchmarks", [])), {})
    lines = [
        "# fastoptim benchmark results",
        "",
        f"- device: {first_info.get('device', '?')}",
        f"- measured ceilings: bf16 matmul {_fmt(first_info.get('ceiling_matmul_tflops'), '.1f')} TFLOP/s, "
        f"device copy {_fmt(first_info.get('ceiling_copy_gbs'), '.0f')} GB/s",
        f"- date: {data.get('datetime', '?')}; python {machine.get('python_version', '?')}",
        f"- versions: {first_info.get('versions', '?')}",
    ]
    if first_info.get("device") == "cpu":
        lines.append(
            "- **CPU-only machine: small shapes only.** These numbers check that the benchmarks run; "
            "they say nothing about GPU speed."
        )
    return "\n".join(lines + render_tables(data)) + "\n"


def render_tables(data: dict, level: str = "##") -> list[str]:
    """The lines of one table per benchmark group (headings at `level`), fastest first."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for bench in data.get("benchmarks", []):
        groups[bench.get("group") or bench["name"]].append(bench)
    lines: list[str] = []
    for group in sorted(groups):
        rows = groups[group]
        medians = {r["extra_info"].get("impl", r["name"]): r["stats"]["median"] for r in rows}
        baseline = next((medians[b] for b in BASELINES if b in medians), None)
        lines += [
            "",
            f"{level} {group}",
            "",
            "| implementation | median ms | throughput | of ceiling | speed-up vs baseline |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in sorted(rows, key=lambda r: r["stats"]["median"]):
            info = r["extra_info"]
            if "tflops" in info:
                throughput = f"{info['tflops']:.2f} TFLOP/s"
                fraction = info.get("fraction_of_matmul")
            elif "gbs" in info:
                throughput = f"{info['gbs']:.1f} GB/s"
                fraction = info.get("fraction_of_copy")
            else:
                throughput, fraction = "—", None
            median = r["stats"]["median"]
            speedup = baseline / median if baseline else None
            percent = _fmt(None if fraction is None else 100 * fraction, '.0f')
            lines.append(
                f"| {info.get('impl', r['name'])} | {median * 1e3:.3f} | {throughput} | "
                f"{percent}{'' if percent == '—' else '%'} | {_fmt(speedup, '.2f')}{'x' if speedup else ''} |"
            )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("json", type=pathlib.Path)
    parser.add_argument("-o", "--output", type=pathlib.Path, default=pathlib.Path(__file__).with_name("RESULTS.md"))
    args = parser.parse_args()
    data = json.loads(args.json.read_text())
    args.output.write_text(render(data))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
