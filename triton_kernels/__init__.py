"""fastoptim.triton_kernels: the Triton backend (hand-written Triton kernels and their launchers).

One file per op family. Each launcher is registered as the op's ``triton`` implementation with
``@register_kernel("<op>", "triton", supports=...)`` (`fastoptim._registry`), in the calling
convention of the fastoptim::* ops declared in fastoptim/ops.py; ``supports`` returns None, or the
reason this backend cannot run the call's arguments (auto dispatch then falls through to the next
backend). Importing this package registers every family's kernels.

Importing this package imports triton; `fastoptim.backends` imports it only when the Triton backend
can run (a GPU, or TRITON_INTERPRET=1 for CPU tensors).
"""

from __future__ import annotations

from .._registry import KernelTable, PredicateTable
from . import apply_stack, gram_newton_schulz, muon, muon_stack, newton_schulz, normuon, sophia  # noqa: F401

# Live views of the registered Triton kernels and predicates, for tests that call a launcher or
# route the op through an instrumented one (tests/test_triton_*.py); new code reads fastoptim._registry.
OPS = KernelTable("triton")
SUPPORTS = PredicateTable("triton")
newton_schulz.SUPPORTS = SUPPORTS
