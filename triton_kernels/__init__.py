"""fastoptim.triton_kernels: the Triton backend (hand-written Triton kernels and their launchers).

OPS maps an op name to its launcher, in the calling convention of the fastoptim::* ops
(fastoptim/ops.py); SUPPORTS maps an op name to a predicate that returns None or the reason a call's
arguments cannot run here. Ops absent from OPS fall through to the torch backend under auto dispatch.
"""

from __future__ import annotations

OPS: dict = {}
SUPPORTS: dict = {}
