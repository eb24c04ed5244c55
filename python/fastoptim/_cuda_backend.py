"""The cuda backend: thin calls into fastoptim._C (hand-written kernels in csrc/), in the calling
convention of the fastoptim::* ops. SUPPORTS says, per op, which arguments a kernel takes; auto
dispatch moves on to the next backend for the others."""

from __future__ import annotations

import torch

from . import _C

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _elementwise_support(*tensors: torch.Tensor) -> str | None:
    for t in tensors:
        if t.dtype not in _KERNEL_DTYPES:
            return f"its kernels take float32, bfloat16 or float16 tensors, got {t.dtype}"
        if not t.is_contiguous():
            return "its kernels take contiguous tensors"
    return None


def muon_apply_(param, update, lr, weight_decay, scale, cautious) -> None:
    _C.muon_apply_(param, update, lr, weight_decay, scale, cautious)


OPS = {"muon_apply_": muon_apply_}
SUPPORTS = {"muon_apply_": lambda param, update, *_: _elementwise_support(param, update)}
