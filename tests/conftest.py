"""pytest's view of the shared test set-up: the fixtures and hooks live in tests/ops_testing.py (so that
test files can import its helpers by a name no other conftest.py shares) and are re-exported here.
Importing it first sets TRITON_INTERPRET=1 on a machine without a GPU, before fastoptim is imported."""

from ops_testing import (  # noqa: F401
    HAS_CUDA,
    _seed,
    backend,
    pytest_collection_modifyitems,
    pytest_configure,
    triton_device,
)
