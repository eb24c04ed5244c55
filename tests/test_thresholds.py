"""Dispatch thresholds from measured rows (bench/thresholds.py) and the per-architecture table the CUDA
Newton–Schulz driver reads (`fastoptim._cuda_backend.SYMMETRIC_MIN_GRAM`). CPU only: synthetic rows."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import types

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench_thresholds", ROOT / "bench" / "thresholds.py")
thresholds = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(thresholds)


def row(shape, impl, median, arch="sm_90", group=None):
    return {"group": group or f"newton_schulz {shape} 5 steps", "stats": {"median": median},
            "extra_info": {"impl": impl, "shape": shape, "capability": arch}}


def test_threshold_is_the_smallest_side_from_which_every_shape_wins():
    rows = [
        row("1x768x768", "fastoptim-cuda", 1.0), row("1x768x768", "fastoptim-cuda-symmetric", 1.2),
        row("12x768x3072", "fastoptim-cuda", 1.0), row("12x768x3072", "fastoptim-cuda-symmetric", 0.99),  # < margin
        row("1x2048x2048", "fastoptim-cuda", 1.0), row("1x2048x2048", "fastoptim-cuda-symmetric", 0.8),
        row("1x4096x4096", "fastoptim-cuda", 1.0), row("1x4096x4096", "fastoptim-cuda-symmetric", 0.7),
        row("1x8192x8192", "fastoptim-cuda", 1.0), row("1x8192x8192", "fastoptim-cuda-symmetric", 0.6),
        row("1x8192x8192", "fastoptim-triton", 0.1),  # other implementations do not count
        row("gpt2-small-48", "fastoptim-cuda", 1.0, group="newton_schulz gpt2-small stack"),  # not one shape
        # Another architecture where the kernel loses at the largest size: never.
        row("1x4096x4096", "fastoptim-cuda", 1.0, "sm_80"),
        row("1x4096x4096", "fastoptim-cuda-symmetric", 0.5, "sm_80"),
        row("1x8192x8192", "fastoptim-cuda", 1.0, "sm_80"),
        row("1x8192x8192", "fastoptim-cuda-symmetric", 1.1, "sm_80"),
        # Rows of one implementation only: nothing to compare.
        row("1x1024x1024", "fastoptim-cuda", 1.0, "sm_100"),
    ]
    table = thresholds.symmetric_min_gram(rows)
    assert set(table) == {"sm_80", "sm_90"}
    assert table["sm_90"]["min_gram"] == 2048  # 768 loses (12x768x3072 is within the margin), 2048 up all win
    assert [s for s, *_ in table["sm_90"]["evidence"]] == [768, 768, 2048, 4096, 8192]
    assert table["sm_80"]["min_gram"] is None
    text = "\n".join(thresholds.render(table))
    assert "SYMMETRIC_MIN_GRAM['sm_90'] = 2048" in text and "SYMMETRIC_MIN_GRAM['sm_80'] = None" in text
    assert thresholds.render({})[0].startswith("No architecture")


def test_command_line_reads_a_bench_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"benchmarks": [row("1x4096x4096", "fastoptim-cuda", 2.0),
                                               row("1x4096x4096", "fastoptim-cuda-symmetric", 1.0)]}))
    assert thresholds.main([str(path)]) == 0
    assert "SYMMETRIC_MIN_GRAM['sm_90'] = 4096" in capsys.readouterr().out


def test_the_cuda_driver_reads_its_architectures_threshold(monkeypatch):
    pytest.importorskip("fastoptim._C", reason="fastoptim._C is not built here")
    from fastoptim import _cuda_backend as cuda_backend

    monkeypatch.delenv("FASTOPTIM_NS_SYMMETRIC", raising=False)
    # Stand-ins with what _use_symmetric reads (shape, device): CUDA matrices on a machine without a GPU.
    cuda0 = types.SimpleNamespace(type="cuda", index=0)
    G = types.SimpleNamespace(shape=(4, 2048, 3072), device=cuda0)
    small = types.SimpleNamespace(shape=(4, 1024, 3072), device=cuda0)
    assert cuda_backend.SYMMETRIC_MIN_GRAM == {}  # nothing measured yet: the kernel stays off
    assert not cuda_backend._use_symmetric(G, torch.bfloat16)
    monkeypatch.setattr(cuda_backend, "_arch", lambda index: "sm_90")
    monkeypatch.setattr(cuda_backend, "SYMMETRIC_MIN_GRAM", {"sm_90": 2048, "sm_80": None})
    assert cuda_backend._use_symmetric(G, torch.bfloat16)
    assert not cuda_backend._use_symmetric(small, torch.bfloat16)
    assert not cuda_backend._use_symmetric(G, torch.float32)  # the kernel is 16-bit only
    monkeypatch.setattr(cuda_backend, "_arch", lambda index: "sm_80")
    assert not cuda_backend._use_symmetric(G, torch.bfloat16)
    monkeypatch.setattr(cuda_backend, "_arch", lambda index: "sm_120")  # not in the table: off
    assert not cuda_backend._use_symmetric(G, torch.bfloat16)
    monkeypatch.setenv("FASTOPTIM_NS_SYMMETRIC", "1")
    assert cuda_backend._use_symmetric(small, torch.bfloat16)
