"""fastoptim.triton_kernels: the Triton backend (hand-written Triton kernels and their launchers).

One file per op family. Each module exports OPS (op name -> launcher, in the calling convention of
the fastoptim::* ops in fastoptim/ops.py) and SUPPORTS (op name -> predicate on the call's
arguments returning None, or the reason this backend cannot run them). Ops absent here fall through
to the torch backend under auto dispatch.

Importing this package imports triton; `fastoptim.backends` imports it only when the Triton backend
can run (a GPU, or TRITON_INTERPRET=1 for CPU tensors).
"""

from __future__ import annotations

from . import apply_stack, muon, muon_stack, newton_schulz, normuon, sophia

OPS: dict = {}
SUPPORTS: dict = {}
for _module in (newton_schulz, muon, muon_stack, normuon, sophia, apply_stack):
    OPS.update(_module.OPS)
    SUPPORTS.update(_module.SUPPORTS)
