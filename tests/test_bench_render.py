"""bench/render.py turns a pytest-benchmark JSON into the markdown table the README points to."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest
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


def load_bench(name, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))  # the bench modules import benchutil
    spec = importlib.util.spec_from_file_location(f"evidence_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason=f"torch {torch.__version__} has no torch.optim.Muon")
@pytest.mark.parametrize("shape", [(48, 80), (80, 48)], ids=["wide", "tall"])
def test_torch_optim_muon_row_times_its_newton_schulz(monkeypatch, shape):
    """The benchmark's torch.optim.Muon row calls torch's own iteration with Muon's coefficients: against the
    float64 iteration its bf16 error is that of fastoptim's reference in bf16 (within 2x), where another schedule
    or a missed normalization would be off by tens of percent."""
    from fastoptim import reference

    zeropower = load_bench("benchutil", monkeypatch).torch_optim_muon_ns()
    assert zeropower is not None, "torch.optim.Muon exists but its Newton–Schulz helper was not found"
    G = torch.randn(shape, dtype=torch.float32)
    exact = reference.newton_schulz(G.double(), 5, compute_dtype=torch.float64)
    ours = reference.newton_schulz(G, 5, compute_dtype=torch.bfloat16).double()
    theirs = zeropower(G, 5).double()
    assert theirs.shape == G.shape

    def error(x):
        return float((x - exact).norm() / exact.norm())

    assert error(theirs) <= 2 * error(ours) + 1e-3, (error(theirs), error(ours))
    assert error(ours) < 0.05


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason=f"torch {torch.__version__} has no torch.optim.Muon")
def test_torch_optim_muon_row_falls_back_to_whole_steps(monkeypatch):
    """Where the private helper is unusable the row times torch.optim.Muon steps, one per matrix, built untimed."""
    bench = load_bench("bench_newton_schulz", monkeypatch)
    monkeypatch.setattr(bench, "TORCH_MUON_NS", None)
    G = torch.randn(3, 16, 24)
    call = bench.make_call("torch.optim.Muon", G)
    assert bench.torch_muon_path("torch.optim.Muon") == {"torch_muon": "optimizer steps"}
    call()
    optimizers = call.__closure__[0].cell_contents
    assert len(optimizers) == 3
    for optimizer, g in zip(optimizers, G):
        (param,) = optimizer.param_groups[0]["params"]
        assert not torch.equal(param.detach(), g)  # stepped
        assert torch.equal(optimizer.state[param]["momentum_buffer"], 0.05 * g)  # (1 - momentum) * grad
