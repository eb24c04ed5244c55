"""bench/render.py turns a pytest-benchmark JSON into the markdown table the README points to."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_render():
    spec = importlib.util.spec_from_file_location("bench_render", ROOT / "bench" / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(group, impl, median, **info):
    extra = {"impl": impl, "device": "NVIDIA H100", "ceiling_matmul_tflops": 700.0, "ceiling_copy_gbs": 3000.0,
             "versions": "fastoptim 0.1.0, torch 2.11.0, triton 3.6.0, CUDA 13.0"}
    return {"group": group, "name": f"test[{impl}]", "stats": {"median": median}, "extra_info": {**extra, **info}}


def test_render_orders_rows_and_computes_speedups():
    data = {
        "datetime": "2026-11-25T10:00:00",
        "machine_info": {"python_version": "3.11"},
        "benchmarks": [
            row("ns 4096", "torch-loop", 0.010, tflops=100.0, fraction_of_matmul=100 / 700),
            row("ns 4096", "fastoptim-cuda", 0.005, tflops=200.0, fraction_of_matmul=200 / 700),
            row("sophia", "fastoptim-torch", 0.002, gbs=1500.0, fraction_of_copy=0.5),
        ],
    }
    text = load_render().render(data)
    assert "NVIDIA H100" in text and "700.0 TFLOP/s" in text and "3000 GB/s" in text
    assert "torch 2.11.0, triton 3.6.0" in text and "CPU-only" not in text
    ns = text.split("## ns 4096")[1].split("##")[0]
    assert ns.index("fastoptim-cuda") < ns.index("torch-loop")  # fastest first
    assert "| fastoptim-cuda | 5.000 | 200.00 TFLOP/s | 29% | 2.00x |" in ns
    assert "| fastoptim-torch | 2.000 | 1500.0 GB/s | 50% | 1.00x |" in text


def test_bench_json_from_a_real_run_renders(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "bench" / "bench_steps.py"),
         "-k", "muon_apply", "--benchmark-enable", "--benchmark-min-rounds=1", "--benchmark-max-time=0.05",
         f"--benchmark-json={out}"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    text = load_render().render(json.loads(out.read_text()))
    assert "## muon_apply" in text and "fastoptim-torch" in text and "GB/s" in text
    assert "torch " in text and ("CPU-only machine" in text) == (not torch.cuda.is_available())
