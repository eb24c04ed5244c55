"""csrc/ follows the build contract: kernels and launchers without torch headers, one bindings file."""

from __future__ import annotations

import pathlib

CSRC = pathlib.Path(__file__).resolve().parents[1] / "csrc"


def test_only_bindings_includes_torch_headers():
    for path in CSRC.iterdir():
        if path.suffix in (".cu", ".cuh", ".h") :
            text = path.read_text()
            assert "#include <torch" not in text and "#include <ATen" not in text, path.name
    bindings = (CSRC / "bindings.cpp").read_text()
    assert "ATen/cuda/CUDAContext.h" not in bindings  # pulls in cuSPARSE headers; use c10/cuda/CUDAStream.h
    assert [p.name for p in CSRC.glob("*.cpp")] == ["bindings.cpp"]
