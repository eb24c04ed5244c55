"""Triton kernels: Muon's momentum and its parameter update (both memory-bound, one pass each).

    muon_momentum_:  buf <- lerp(buf, grad, 1 - beta);  nesterov_out <- lerp(grad, buf, beta)
    muon_apply_:     p <- p·(1 - lr·wd)  (cautious: only where update·p >= 0);  p <- p - lr·scale·update

K. Jordan et al., "Muon: An optimizer for hidden layers in neural networks" (2024); cautious weight
decay: L. Chen et al. (arXiv:2510.12402). The specification is `fastoptim.reference`; arithmetic is
fp32 whatever the storage dtype (float32, bfloat16 or float16), offsets are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._registry import register_kernel
from ._common import device_guard, lerp, unsupported_tensors

BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def _muon_momentum_kernel(
    buf_ptr, grad_ptr, nesterov_ptr, numel, beta, WRITE_NESTEROV: tl.constexpr, BLOCK: tl.constexpr
):
    """Bytes per element: reads buf and grad, writes buf and (Nesterov) nesterov_out:
    2·|buf| + |grad| (+ |buf|), e.g. 12 (16) bytes in fp32, 6 (8) in bf16."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    buf_dtype = buf_ptr.dtype.element_ty
    buf = tl.load(buf_ptr + offsets, mask=mask).to(tl.float32)
    # The reference first casts grad to buf's dtype (grad.to(buf.dtype)); do the same rounding.
    grad = tl.load(grad_ptr + offsets, mask=mask).to(buf_dtype).to(tl.float32)
    new_buf = lerp(buf, grad, 1.0 - beta).to(buf_dtype)
    tl.store(buf_ptr + offsets, new_buf, mask=mask)
    if WRITE_NESTEROV:
        nesterov = lerp(grad, new_buf.to(tl.float32), beta)
        tl.store(nesterov_ptr + offsets, nesterov.to(nesterov_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _muon_apply_kernel(
    param_ptr, update_ptr, numel, decay, step, CAUTIOUS: tl.constexpr, BLOCK: tl.constexpr
):
    """Bytes per element: reads param and update, writes param: 2·|param| + |update|,
    e.g. 12 bytes in fp32, 10 for fp32 params with a bf16 update."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    param = tl.load(param_ptr + offsets, mask=mask).to(tl.float32)
    update = tl.load(update_ptr + offsets, mask=mask).to(tl.float32)
    decayed = param * decay
    if CAUTIOUS:
        decayed = tl.where(update * param >= 0, decayed, param)
    result = decayed - step * update
    tl.store(param_ptr + offsets, result.to(param_ptr.dtype.element_ty), mask=mask)


def _supports_momentum(buf, grad, nesterov_out, beta) -> str | None:
    return unsupported_tensors(buf=buf, grad=grad, nesterov_out=nesterov_out)


@register_kernel("muon_momentum_", "triton", supports=_supports_momentum)
def muon_momentum_(
    buf: torch.Tensor, grad: torch.Tensor, nesterov_out: torch.Tensor | None, beta: float
) -> None:
    numel = buf.numel()
    if numel == 0:
        return
    grid = (triton.cdiv(numel, BLOCK),)
    with device_guard(buf):
        _muon_momentum_kernel[grid](
            buf,
            grad,
            nesterov_out if nesterov_out is not None else buf,
            numel,
            beta,
            WRITE_NESTEROV=nesterov_out is not None,
            BLOCK=BLOCK,
            num_warps=NUM_WARPS,
        )


def _supports_apply(param, update, lr, weight_decay, scale, cautious) -> str | None:
    return unsupported_tensors(param=param, update=update)


@register_kernel("muon_apply_", "triton", supports=_supports_apply)
def muon_apply_(
    param: torch.Tensor, update: torch.Tensor, lr: float, weight_decay: float, scale: float, cautious: bool
) -> None:
    numel = param.numel()
    if numel == 0:
        return
    grid = (triton.cdiv(numel, BLOCK),)
    with device_guard(param):
        _muon_apply_kernel[grid](
            param,
            update,
            numel,
            1.0 - lr * weight_decay,
            lr * scale,
            CAUTIOUS=cautious,
            BLOCK=BLOCK,
            num_warps=NUM_WARPS,
        )
