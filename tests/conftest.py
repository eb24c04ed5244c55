"""Shared test set-up.

Without a GPU, the Triton backend runs in the interpreter on CPU tensors: TRITON_INTERPRET must be
set before any @triton.jit function is defined, so it is set here, before fastoptim is imported.
Tests marked `cuda` skip without a GPU.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def triton_device() -> torch.device:
    """Where Triton kernels run in this session: the GPU, or the CPU under the interpreter."""
    return torch.device("cuda") if HAS_CUDA else torch.device("cpu")
